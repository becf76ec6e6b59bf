"""Held-out question answering: ARC (easy, challenge) and BoolQ, answered
by choosing one of the given options.

Files under <data_dir>/qa: <item>_test.jsonl (ARC: its test split; BoolQ:
its labelled dev split), one example per line in either
  the common form  {"question", "choices": [str], "answer": one of choices,
                    "context": optional passage}
  or the release's own: ARC {"question": {"stem", "choices": [{"text",
  "label"}]}, "answerKey"}; BoolQ {"question", "passage", "answer": bool}.
Registered `qa_<item>_direct` (split test; zero-shot: the passage, the
question and an OPTIONS block as the FLAN templates write it; target = the
answer's text; metric `exact_match`) and `qa_<item>_direct_rank` (the
options scored by log-likelihood; `rank_accuracy`); mixtures `qa_direct`,
`qa_direct_rank`.
"""

import json
import os
from typing import Dict, List, Mapping

import seqio

from moe_jax.text import text_lines
from tasks import data_dir
from tasks import metrics
from tasks import suites
from tasks.templates import OPTION_BULLET, OPTIONS_HEADER

ITEMS = ("arc_easy", "arc_challenge", "boolq")
BOOLQ_CHOICES = ("no", "yes")

Question = Dict[str, object]  # question, choices: [str], answer, context


def _common_form(record: Mapping[str, object]) -> Question:
  """A record in the common form, from any of the accepted forms."""
  question = record.get("question")
  if isinstance(question, dict):  # ARC's release
    choices = {c["label"]: c["text"] for c in question["choices"]}
    return {"question": question["stem"], "choices": list(choices.values()),
            "answer": choices[record["answerKey"]], "context": ""}
  if isinstance(record.get("answer"), bool):  # BoolQ's release
    return {"question": question, "choices": list(BOOLQ_CHOICES),
            "answer": BOOLQ_CHOICES[record["answer"]],
            "context": record.get("passage", "")}
  return {"question": question, "choices": list(record["choices"]),
          "answer": record["answer"], "context": record.get("context", "")}


def read_jsonl(path: str) -> List[Question]:
  """The examples of one file; ValueError names the file and line of a
  malformed one (its answer must be one of its choices)."""
  out = []
  for lineno, line in text_lines(path):
    if not line.strip():
      continue
    try:
      q = _common_form(json.loads(line))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{path}:{lineno}: expected {{question, choices, "
                       "answer[, context]}, or ARC's or BoolQ's own fields "
                       f"({type(e).__name__}: {e})") from e
    if not isinstance(q["question"], str) or q["answer"] not in q["choices"]:
      raise ValueError(f"{path}:{lineno}: the answer {q['answer']!r} is not "
                       f"one of the choices {q['choices']!r}")
    out.append(q)
  return out


def prompt(q: Question) -> str:
  """[passage, blank line,] the question, then its OPTIONS block."""
  options = "".join(OPTION_BULLET + c for c in q["choices"])
  context = f"{q['context']}\n\n" if q["context"] else ""
  return f"{context}{q['question']}\n{OPTIONS_HEADER}{options}"


def examples(item: str) -> List[Dict[str, object]]:
  path = data_dir.require_file(os.path.join("qa", f"{item}_test.jsonl"),
                               f"{item} test questions (JSONL: question, "
                               "choices, answer[, context])")
  return [{"inputs": prompt(q), "targets": q["answer"],
           "options": q["choices"]} for q in read_jsonl(path)]


def register(features: Mapping[str, seqio.Feature]) -> None:
  suites.register_suite(
      "qa", ITEMS, {"direct": None},
      lambda item, _, split: examples(item), splits=("test",),
      metric_fns=[metrics.exact_match], features=features,
      rank_modes=["direct"])
