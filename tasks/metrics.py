"""Metrics for instruction and eval tasks: exact match, rank classification,
answer extraction. Pure Python; scores are percentages."""

import re
from typing import Dict, Optional, Sequence

import numpy as np


def exact_match(targets: Sequence[str], predictions: Sequence[str]
                ) -> Dict[str, float]:
  """Percentage of predictions equal to their target after strip()."""
  hits = [t.strip() == p.strip() for t, p in zip(targets, predictions)]
  return {"exact_match": 100.0 * float(np.mean(hits)) if hits else 0.0}


_ANSWER_IS = re.compile(r"answer is\s*:?\s*(.+?)\s*\.?\s*$",
                        re.IGNORECASE | re.DOTALL)


def extract_answer(text: str) -> str:
  """The final answer of a (possibly chain-of-thought) response.

  Takes the text after the last "answer is" (trailing period dropped) when
  present, else the whole stripped response.
  """
  text = text.strip()
  idx = text.lower().rfind("answer is")
  if idx >= 0:
    m = _ANSWER_IS.match(text[idx:])
    if m:
      return m.group(1).strip()
  return text


def extracted_exact_match(targets: Sequence[str], predictions: Sequence[str]
                          ) -> Dict[str, float]:
  """Exact match after `extract_answer` on each prediction."""
  return exact_match(targets, [extract_answer(p) for p in predictions])


def answer_letter(text: str) -> str:
  """First A-D letter standing alone at the start of a response ("" if none)."""
  m = re.match(r"\s*\(?([A-D])\b", text)
  return m.group(1) if m else ""


def letter_exact_match(targets: Sequence[str], predictions: Sequence[str]
                       ) -> Dict[str, float]:
  """Percentage of predictions whose leading answer letter is the target's."""
  hits = [answer_letter(p) == t.strip() for t, p in zip(targets, predictions)]
  return {"letter_accuracy": 100.0 * float(np.mean(hits)) if hits else 0.0}


def option_rank_accuracy(targets: Sequence[tuple[int, bool]],
                         scores: Sequence[float]) -> Dict[str, float]:
  """Rank classification from one scored row per (example, option).

  targets: (example index, whether this row's option is correct) per row.
  scores: the log-likelihood of each row's option.
  An example counts as right when its highest-scoring option is correct.
  """
  best: Dict[int, tuple[float, bool]] = {}
  for (idx, correct), score in zip(targets, scores):
    if idx not in best or score > best[idx][0]:
      best[idx] = (score, bool(correct))
  hits = [correct for _, correct in best.values()]
  return {"rank_accuracy": 100.0 * float(np.mean(hits)) if hits else 0.0}


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> Optional[float]:
  """The last number of a response's final answer (`extract_answer`), with
  thousands separators dropped; None when it has no number."""
  found = _NUMBER.findall(extract_answer(text))
  return float(found[-1].replace(",", "")) if found else None


def final_number_accuracy(targets: Sequence[str],
                          predictions: Sequence[str]) -> Dict[str, float]:
  """Percentage of predictions whose final number equals the target's
  (GSM8K-style exact match on the final number; 1e-6 tolerance)."""
  hits = []
  for target, prediction in zip(targets, predictions):
    want, got = final_number(target), final_number(prediction)
    hits.append(want is not None and got is not None and
                abs(want - got) <= 1e-6)
  return {"number_accuracy": 100.0 * float(np.mean(hits)) if hits else 0.0}


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def yes_no(text: str) -> Optional[str]:
  """"yes" or "no": the first such word of a response's final answer
  (`extract_answer`), lowercased; None when it has neither."""
  m = _YES_NO.search(extract_answer(text))
  return m.group(1).lower() if m else None


def yes_no_accuracy(targets: Sequence[str], predictions: Sequence[str]
                    ) -> Dict[str, float]:
  """Percentage of predictions whose final yes/no (`yes_no`) is the
  target's (StrategyQA-style questions)."""
  hits = [yes_no(p) is not None and yes_no(p) == yes_no(t)
          for t, p in zip(targets, predictions)]
  return {"yes_no_accuracy": 100.0 * float(np.mean(hits)) if hits else 0.0}
