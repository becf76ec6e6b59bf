"""Held-out math reasoning: GSM8K-style word problems, answer a number.

Files under <data_dir>/reasoning: <item>_test.jsonl, one {"question",
"answer"} object per line. The answer is either a number or GSM8K's
"<worked solution> #### <number>"; the target is that final number.
Registered `reasoning_<item>_{direct,cot}` (split test; zero-shot, the CoT
prompt ending in "Let's think step by step.") and mixtures
`reasoning_direct`, `reasoning_cot`; metric `number_accuracy`
(`metrics.final_number_accuracy`: the last number of the response's final
answer equals the target's).
"""

import os
from typing import Dict, List, Mapping

import seqio

from tasks import data_dir
from tasks import file_sources
from tasks import metrics
from tasks import suites

ITEMS = ("gsm8k", "svamp", "asdiv")
MODES = {"direct": False, "cot": True}
COT_TRIGGER = "Let's think step by step."
GSM8K_MARK = "####"
FIELDS = ("question", "answer")


def target_number(answer: str) -> str:
  """The final number of an answer field, as text without separators."""
  final = answer.rsplit(GSM8K_MARK, 1)[-1].strip().replace(",", "")
  float(final)  # ValueError when not a number.
  return final


def read_jsonl(path: str) -> List[Dict[str, str]]:
  """{"question", "answer" (the final number)} per example; ValueError names
  the file and the line (malformed JSON) or example (answer not a number)."""
  rows = []
  for i, r in enumerate(file_sources.read_lines(path, FIELDS), 1):
    try:
      rows.append({"question": r["question"],
                   "answer": target_number(r["answer"])})
    except ValueError as e:
      raise ValueError(f"{path}: example {i}: the answer {r['answer']!r} "
                       "does not end in a number") from e
  return rows


def examples(item: str, cot: bool) -> List[Dict[str, str]]:
  rows = read_jsonl(data_dir.require_file(
      os.path.join("reasoning", f"{item}_test.jsonl"),
      f"{item} test problems (JSONL: question, answer)"))
  trigger = " " + COT_TRIGGER if cot else ""
  return [{"inputs": f"Q: {r['question']}\nA:{trigger}",
           "targets": r["answer"]} for r in rows]


def register(features: Mapping[str, seqio.Feature]) -> None:
  suites.register_suite(
      "reasoning", ITEMS, MODES,
      lambda item, cot, split: examples(item, cot), splits=("test",),
      metric_fns=[metrics.final_number_accuracy], features=features)
