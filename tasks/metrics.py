"""Metrics for instruction and eval tasks: exact match, rank classification,
answer extraction. Pure Python; scores are percentages."""

import re
from typing import Dict, Sequence

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


def rank_classification(option_scores: Sequence[Sequence[float]],
                        labels: Sequence[int]) -> Dict[str, float]:
  """Accuracy of argmax over per-option log-likelihoods.

  option_scores: [examples][options] log-likelihood of each option's text.
  labels: index of the correct option per example.
  """
  hits = [int(np.argmax(s)) == y for s, y in zip(option_scores, labels)]
  return {"rank_accuracy": 100.0 * float(np.mean(hits)) if hits else 0.0}


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
