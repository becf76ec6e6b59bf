"""MMLU (57 subjects), 0-shot and 5-shot, from the public CSV release.

Files under <data_dir>/mmlu: data/{dev,val,test}/<subject>_<split>.csv,
headerless rows question,A,B,C,D,answer. Registered tasks
`mmlu_<subject>_{0,5}shot` (splits validation = val, test = test; shots are
the first 5 dev rows) and mixtures `mmlu_0shot`, `mmlu_5shot`: the target is
the answer letter, the metric letter accuracy on generated text. Rank
classification: `mmlu_<subject>_{0,5}shot_rank` and mixtures
`mmlu_{0,5}shot_rank` score the four letters after the same prompt
(`rank_accuracy`).
"""

import csv
import io
import os
from typing import Dict, List, Mapping

import seqio

from moe_jax import paths
from tasks import data_dir
from tasks import metrics
from tasks import suites

SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics",
    "clinical_knowledge", "college_biology", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology",
    "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging",
    "human_sexuality", "international_law", "jurisprudence",
    "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios",
    "nutrition", "philosophy", "prehistory", "professional_accounting",
    "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions")
LETTERS = ("A", "B", "C", "D")
SPLIT_DIRS = {"dev": "dev", "validation": "val", "test": "test"}
SHOT_COUNTS = (0, 5)

Question = Dict[str, object]  # question: str, options: [4] str, answer: str


def read_csv(path: str) -> List[Question]:
  """Parses one headerless MMLU CSV; ValueError names file and line."""
  out = []
  text = paths.as_path(path).read_bytes().decode("utf-8")
  reader = csv.reader(io.StringIO(text, newline=""))
  for row in reader:
    if len(row) != 6 or row[5].strip() not in LETTERS:
      raise ValueError(f"{path}:{reader.line_num}: expected question,A,B,C,"
                       f"D,answer with answer in {LETTERS}, got {row!r}")
    out.append({"question": row[0], "options": row[1:5],
                "answer": row[5].strip()})
  return out


def load(subject: str, split: str) -> List[Question]:
  d = SPLIT_DIRS[split]
  rel = os.path.join("mmlu", "data", d, f"{subject}_{d}.csv")
  return read_csv(data_dir.require_file(rel, f"MMLU {subject} {split}"))


def format_question(q: Question, with_answer: bool) -> str:
  lines = [q["question"]] + [f"{l}. {o}" for l, o in zip(LETTERS,
                                                          q["options"])]
  lines.append("Answer:" + (f" {q['answer']}" if with_answer else ""))
  return "\n".join(lines)


def prompt(subject: str, q: Question, shots: List[Question]) -> str:
  """Header, solved shots, then the question ending in "Answer:"."""
  header = ("The following are multiple choice questions (with answers) "
            f"about {subject.replace('_', ' ')}.")
  blocks = [header] + [format_question(s, True) for s in shots]
  return "\n\n".join(blocks + [format_question(q, False)])


def examples(subject: str, split: str, num_shots: int
             ) -> List[Dict[str, object]]:
  shots = load(subject, "dev")[:num_shots] if num_shots else []
  return [{"inputs": prompt(subject, q, shots), "targets": q["answer"],
           "options": list(LETTERS)} for q in load(subject, split)]


def register(features: Mapping[str, seqio.Feature]) -> None:
  suites.register_suite(
      "mmlu", SUBJECTS, {f"{shots}shot": shots for shots in SHOT_COUNTS},
      lambda subject, shots, split: examples(subject, split, shots),
      splits=("validation", "test"), metric_fns=[metrics.letter_exact_match],
      features=features, rank_modes=[f"{s}shot" for s in SHOT_COUNTS])
