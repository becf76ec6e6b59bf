"""Held-out reasoning: GSM8K-style word problems (answer a number) and
StrategyQA (answer yes or no).

Files under <data_dir>/reasoning: <item>_test.jsonl, one {"question",
"answer"} object per line. For the math items the answer is a number or
GSM8K's "<worked solution> #### <number>", and the target is that final
number; for StrategyQA it is a JSON boolean or "yes"/"no" (any case), and
the target is "yes" or "no". Registered `reasoning_<item>_{direct,cot}`
(split test; zero-shot, the CoT prompt ending in "Let's think step by
step.") and mixtures `reasoning_direct`, `reasoning_cot`. Metrics:
`number_accuracy` (`metrics.final_number_accuracy`: the last number of the
response's final answer equals the target's) and, for StrategyQA,
`yes_no_accuracy` (`metrics.yes_no_accuracy`); StrategyQA also has the
rank task `reasoning_strategyqa_direct_rank` (options yes, no).
"""

import os
from typing import Callable, Dict, List, Mapping

import seqio

from tasks import data_dir
from tasks import file_sources
from tasks import metrics
from tasks import suites

MATH_ITEMS = ("gsm8k", "svamp", "asdiv")
YES_NO_ITEMS = ("strategyqa",)
ITEMS = MATH_ITEMS + YES_NO_ITEMS
MODES = {"direct": False, "cot": True}
COT_TRIGGER = "Let's think step by step."
GSM8K_MARK = "####"
FIELDS = ("question", "answer")
YES_NO = ("yes", "no")
_BOOLEANS = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}


def target_number(answer: str) -> str:
  """The final number of an answer field, as text without separators;
  ValueError when it does not end in a number."""
  final = answer.rsplit(GSM8K_MARK, 1)[-1].strip().replace(",", "")
  try:
    float(final)
  except ValueError:
    raise ValueError(f"the answer {answer!r} does not end in a number "
                     f"(a number, or a solution then '{GSM8K_MARK} "
                     "<number>')") from None
  return final


def target_yes_no(answer: str) -> str:
  """"yes" or "no" of an answer field (a boolean or yes/no, any case)."""
  key = answer.strip().lower()
  if key not in _BOOLEANS:
    raise ValueError(f"the answer {answer!r} is not yes/no or a boolean")
  return _BOOLEANS[key]


def target_of(item: str) -> Callable[[str], str]:
  return target_yes_no if item in YES_NO_ITEMS else target_number


def read_jsonl(path: str, item: str) -> List[Dict[str, str]]:
  """{"question", "answer" (the target)} per example; ValueError names
  the file and the line (malformed JSON) or example (bad answer)."""
  target, rows = target_of(item), []
  for i, r in enumerate(file_sources.read_lines(path, FIELDS), 1):
    try:
      rows.append({"question": r["question"], "answer": target(r["answer"])})
    except ValueError as e:
      raise ValueError(f"{path}: example {i}: {e}") from e
  return rows


def examples(item: str, cot: bool) -> List[Dict[str, object]]:
  rows = read_jsonl(data_dir.require_file(
      os.path.join("reasoning", f"{item}_test.jsonl"),
      f"{item} test problems (JSONL: question, answer)"), item)
  trigger = " " + COT_TRIGGER if cot else ""
  options = {"options": list(YES_NO)} if item in YES_NO_ITEMS else {}
  return [{"inputs": f"Q: {r['question']}\nA:{trigger}",
           "targets": r["answer"], **options} for r in rows]


def register(features: Mapping[str, seqio.Feature]) -> None:
  suites.register_suite(
      "reasoning", ITEMS, MODES,
      lambda item, cot, split: examples(item, cot), splits=("test",),
      metric_fns=[metrics.final_number_accuracy],
      item_metric_fns={i: [metrics.yes_no_accuracy] for i in YES_NO_ITEMS},
      features=features, rank_modes=["direct"], rank_items=YES_NO_ITEMS)
