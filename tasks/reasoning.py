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

import json
import os
from typing import Dict, List, Mapping

import seqio

from tasks import data_dir
from tasks import metrics
from tasks import suites

ITEMS = ("gsm8k", "svamp", "asdiv")
MODES = {"direct": False, "cot": True}
COT_TRIGGER = "Let's think step by step."
GSM8K_MARK = "####"


def target_number(answer: str) -> str:
  """The final number of an answer field, as text without separators."""
  final = answer.rsplit(GSM8K_MARK, 1)[-1].strip().replace(",", "")
  float(final)  # ValueError when not a number.
  return final


def read_jsonl(path: str) -> List[Dict[str, str]]:
  """{"question", "answer" (the final number)} per line; ValueError names
  the file and the 1-based line."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        rows.append({"question": str(record["question"]),
                     "answer": target_number(str(record["answer"]))})
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}:{lineno}: expected {{\"question\", "
                         f"\"answer\"}} with a numeric final answer "
                         f"({type(e).__name__}: {e})") from e
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
