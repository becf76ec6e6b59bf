"""BIG-Bench Hard (27 tasks), 3-shot direct and chain-of-thought.

Files under <data_dir>/bbh in the public release layout: bbh/<task>.json
({"examples": [{"input", "target"}]}) and cot-prompts/<task>.txt (a task
description, a "-----" line, then three "Q: ... A: Let's think step by step.
... So the answer is X." exemplars). Direct prompts keep each exemplar's
question and its final answer only. Registered `bbh_<task>_{direct,cot}`
(split test) and mixtures `bbh_direct`, `bbh_cot`; metric: exact match after
`metrics.extract_answer`. Rank classification (direct prompts):
`bbh_<task>_direct_rank`, mixture `bbh_direct_rank`, over the task's
options -- the "(A)".."(R)" lines of a multiple-choice input, or the label
set of a two-way task; the free-form tasks (FREE_FORM_TASKS) have none.
"""

import json
import os
import re
from typing import Dict, List, Mapping

import seqio

from moe_jax import paths
from tasks import data_dir
from tasks import metrics
from tasks import suites

TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding",
    "disambiguation_qa", "dyck_languages", "formal_fallacies",
    "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects",
    "movie_recommendation", "multistep_arithmetic_two", "navigate",
    "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names",
    "salient_translation_error_detection", "snarks", "sports_understanding",
    "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects", "web_of_lies", "word_sorting")
MODES = ("direct", "cot")
# Two-way tasks: the targets they use, as the release writes them.
LABELS = {"boolean_expressions": ("True", "False"),
          "causal_judgement": ("Yes", "No"),
          "formal_fallacies": ("valid", "invalid"),
          "navigate": ("Yes", "No"),
          "sports_understanding": ("yes", "no"),
          "web_of_lies": ("Yes", "No")}
FREE_FORM_TASKS = ("dyck_languages", "multistep_arithmetic_two",
                   "object_counting", "word_sorting")
_OPTION_LINE = re.compile(r"^(\([A-R]\))", re.MULTILINE)
COT_TRIGGER = "Let's think step by step."
_EXEMPLAR_ANSWER = re.compile(r"A: Let's think step by step\..*?So the answer "
                              r"is (.*?)\.?(?=\n\nQ:|\s*$)", re.DOTALL)


def read_examples(path: str) -> List[Dict[str, str]]:
  try:
    data = json.loads(paths.as_path(path).read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
  rows = data.get("examples") if isinstance(data, dict) else None
  if not isinstance(rows, list):
    raise ValueError(f"{path}: expected {{\"examples\": [...]}}")
  for i, r in enumerate(rows):
    if not isinstance(r, dict) or not {"input", "target"} <= set(r):
      raise ValueError(f"{path}: example {i} lacks input/target")
  return [{"input": r["input"], "target": str(r["target"])} for r in rows]


def read_cot_prompt(path: str) -> str:
  """The exemplars of a cot-prompts file (text after the "-----" line)."""
  text = paths.as_path(path).read_text(encoding="utf-8")
  if "-----" not in text:
    raise ValueError(f"{path}: expected a '-----' line before the exemplars")
  return text.split("-----", 1)[1].strip()


def direct_prompt(cot_prompt: str) -> str:
  """The CoT exemplars with each reasoning replaced by its final answer."""
  return _EXEMPLAR_ANSWER.sub(lambda m: f"A: {m.group(1)}", cot_prompt)


def options(task: str, question: str) -> List[str]:
  """Candidate targets of one `task` question (empty for free-form tasks)."""
  if task in LABELS:
    return list(LABELS[task])
  return _OPTION_LINE.findall(question)


def examples(task: str, mode: str) -> List[Dict[str, object]]:
  cot = read_cot_prompt(data_dir.require_file(
      os.path.join("bbh", "cot-prompts", f"{task}.txt"),
      f"BBH chain-of-thought prompts for {task}"))
  shots = cot if mode == "cot" else direct_prompt(cot)
  answer = " " + COT_TRIGGER if mode == "cot" else ""
  rows = read_examples(data_dir.require_file(
      os.path.join("bbh", "bbh", f"{task}.json"), f"BBH examples for {task}"))
  return [{"inputs": f"{shots}\n\nQ: {r['input']}\nA:{answer}",
           "targets": r["target"], "options": options(task, r["input"])}
          for r in rows]


def register(features: Mapping[str, seqio.Feature]) -> None:
  suites.register_suite(
      "bbh", TASKS, {mode: mode for mode in MODES},
      lambda task, mode, split: examples(task, mode), splits=("test",),
      metric_fns=[metrics.extracted_exact_match], features=features,
      rank_modes=["direct"],
      rank_items=[t for t in TASKS if t not in FREE_FORM_TASKS])
