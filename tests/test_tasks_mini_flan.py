"""mini_flan: determinism, independently solved targets, packed batches."""

import re

import numpy as np
import pytest

from tasks import mini_flan_generators as gen
from tasks import objectives


def _word_in(q, *patterns):
  for pattern in patterns:
    m = re.search(pattern, q)
    if m:
      return m.group(1)
  raise AssertionError(f"no pattern of {patterns} in {q!r}")


def _yes(flag):
  return "yes" if flag else "no"


def _solve(name, inputs):
  """Independent solver: parses the last prompt and computes the answer."""
  q = inputs.split(gen.FEWSHOT_SEPARATOR)[-1].split(gen.OPTIONS_HEADER)[0]
  nums = [int(x) for x in re.findall(r"-?\d+", q)]
  words = lambda: q.split(": ", 1)[1].split() if ": " in q else q.split(
      ". ", 1)[1].split()
  if name == "add":
    return str(nums[0] + nums[1])
  if name == "multiply":
    return str(nums[0] * nums[1])
  if name == "subtract":
    a, b = re.findall(r"(\d+)", q)[:2]
    return str(int(b) - int(a)) if q.startswith("Subtract") else str(
        int(a) - int(b))
  if name == "max_of":
    return str(max(nums))
  if name == "sort_numbers":
    return " ".join(map(str, sorted(nums)))
  if name == "sort_descending":
    return " ".join(map(str, sorted(nums, reverse=True)))
  if name == "count_even":
    return str(sum(1 for x in nums if x % 2 == 0))
  if name == "parity":
    return "even" if nums[0] % 2 == 0 else "odd"
  if name == "sign":
    return "positive" if nums[0] > 0 else "negative" if nums[0] else "zero"
  if name == "is_sorted":
    return _yes(nums == sorted(nums))
  if name == "reverse_word":
    return _word_in(q, r"Spell '(\w+)'", r"letters of (\w+)\.")[::-1]
  if name == "uppercase":
    return _word_in(q, r"Write '(\w+)'", r"Uppercase: (\w+)").upper()
  if name == "drop_vowels":
    w = _word_in(q, r"vowels from '(\w+)'", r"o, u in (\w+)\.")
    return re.sub("[aeiou]", "", w)
  if name == "palindrome":
    w = _word_in(q, r"Is '(\w+)' a palindrome", r"Does (\w+) read")
    return _yes(w == w[::-1])
  if name == "first_letters":
    return "".join(w[0] for w in words())
  if name == "sort_words":
    return " ".join(sorted(words()))
  if name == "count_words":
    return str(len(words()))
  if name == "count_letter":
    m = re.search(r"does '(\w)' occur in '(\w+)'|letter (\w) in (\w+)\.", q)
    c, w = (m.group(1), m.group(2)) if m.group(1) else (m.group(3),
                                                         m.group(4))
    return str(w.count(c))
  if name in ("lookup", "reverse_lookup"):
    table = dict(re.findall(r"([a-z])=(\d+)", q))
    if name == "lookup":
      return table[_word_in(q, r"what is ([a-z])\?", r"Value of ([a-z])\?")]
    value = _word_in(q, r"has value (\d+)\?", r"maps to (\d+)\?")
    return next(k for k, v in table.items() if v == value)
  if name == "location_entailment":
    here, asked = re.findall(r"at the (\w+)", q)
    return _yes(here == asked)
  if name == "comparison_entailment":
    a, x, b, y = re.search(r"(\w+) has (\d+) apples and (\w+) has (\d+)",
                           q).groups()
    counts = {a: int(x), b: int(y)}
    bigger = re.search(r"(\w+) has more apples", q).group(1)
    other = b if bigger == a else a
    return _yes(counts[bigger] > counts[other])
  if name == "word_topic":
    return _TOPIC_OF[_word_in(q, r"is '(\w+)'\?", r"word (\w+):")]
  if name == "review_sentiment":
    adjective = re.search(r"was (\w+)\.", q).group(1)
    return "positive" if adjective in _POSITIVE else "negative"
  if name == "antonym":
    return _OPPOSITE[_word_in(q, r"opposite of '(\w+)'", r"Opposite of (\w+):")]
  raise AssertionError(f"no solver for {name}")


_TOPIC_OF = {**dict.fromkeys("cat dog horse mouse tiger sheep goat duck".split(),
                             "animal"),
             **dict.fromkeys("red blue green yellow purple white black "
                             "brown".split(), "color"),
             **dict.fromkeys("bread rice soup cheese apple pasta cake "
                             "egg".split(), "food"),
             **dict.fromkeys("hammer saw drill wrench shovel axe rake "
                             "knife".split(), "tool")}
_POSITIVE = set("great lovely superb fun wonderful pleasant good "
                "excellent".split())
_OPPOSITE = {a: b for pair in ("hot cold", "big small", "fast slow", "up down",
                               "open closed", "light dark", "early late",
                               "happy sad", "full empty", "old new", "wet dry",
                               "hard soft")
             for a, b in (pair.split(), pair.split()[::-1])}


@pytest.mark.parametrize("task", gen.TASKS, ids=lambda t: t.name)
def test_deterministic_and_targets_right(task):
  a = list(gen.generate_examples(task, "train", 3, 20, num_shots=1))
  b = list(gen.generate_examples(task, "train", 3, 20, num_shots=1))
  assert a == b
  c = list(gen.generate_examples(task, "test", 3, 20))
  assert a != c
  noopt = list(gen.generate_examples(task, "test", 3, 20, num_shots=2,
                                     with_options=False))
  for ex in a + c + noopt:
    assert ex["targets"] == _solve(task.name, ex["inputs"]), ex


def test_span_corruption_roundtrip():
  rng = np.random.default_rng(0)
  ids = np.arange(3, 43, dtype=np.int32)
  mask = objectives.noise_mask(len(ids), rng)
  out = objectives.span_corrupt_ids(ids, mask, vocab_size=259)
  np.testing.assert_array_equal(np.sort(np.concatenate(
      [out["inputs"][out["inputs"] < 200], out["targets"][out["targets"] < 200]
       ])), ids)


def _rank_accuracy(task_name, score):
  """Runs seqio's evaluator on a rank task with `score(row) -> float`."""
  seqio = pytest.importorskip("seqio")
  import tasks  # noqa: F401  (registers mini_flan)
  evaluator = seqio.Evaluator(
      task_name, seqio.EncDecFeatureConverter(pack=False),
      eval_split="validation", sequence_length={"inputs": 64, "targets": 8},
      use_memory_cache=False, async_compute_metrics=False)
  task = seqio.get_mixture_or_task(task_name)
  rows = list(task.get_dataset({"inputs": 64, "targets": 8},
                               split="validation", shuffle=False,
                               try_in_mem_cache=False).as_numpy_iterator())

  def score_fn(dataset, model_feature_shapes=None):
    del model_feature_shapes
    return [(int(i), score(rows[int(i)])) for i, _ in dataset]

  future, _ = evaluator.evaluate(compute_metrics=True, step=0,
                                 predict_fn=None, score_fn=score_fn)
  return future.result()[task_name]["rank_accuracy"], rows


def test_rank_task_scores_every_option_of_an_example():
  oracle, rows = _rank_accuracy("mini_flan_sign_rank",
                                lambda r: float(r["is_correct"]))
  assert oracle == 100.0
  examples = {int(r["idx"]) for r in rows}
  assert len(rows) == 3 * len(examples)  # positive, negative, zero
  assert sum(r["is_correct"] for r in rows) == len(examples)

  # Always picking "zero" is right only for the examples whose sign is zero.
  zero, _ = _rank_accuracy("mini_flan_sign_rank",
                           lambda r: float(r["targets_pretokenized"] == b"zero"))
  truth = [r["targets_pretokenized"] for r in rows if r["is_correct"]]
  assert zero == pytest.approx(100.0 * truth.count(b"zero") / len(examples))


def test_main_job_trains_on_held_in_and_evaluates_both_parts():
  import seqio
  from tasks import mini_flan  # registers mini_flan

  def names(mixture):
    return {t.name for t in seqio.get_mixture_or_task(mixture).tasks}

  assert not set(mini_flan.MAIN_HELD_IN) & set(mini_flan.MAIN_HELD_OUT)
  assert names("mini_flan_main") == {
      f"mini_flan_{t}_zs" for t in mini_flan.MAIN_HELD_IN}
  for part, members in (("held_in", mini_flan.MAIN_HELD_IN),
                        ("held_out", mini_flan.MAIN_HELD_OUT)):
    assert names(f"mini_flan_main_{part}") == {
        f"mini_flan_{t}_{kind}" for t in members for kind in (
            ("zs", "rank") if gen.TASKS_BY_NAME[t].has_options else ("zs",))}
  assert names("mini_flan_main_eval") == (names("mini_flan_main_held_in") |
                                          names("mini_flan_main_held_out"))
  trained = {gen.TASKS_BY_NAME[t].cluster for t in mini_flan.MAIN_HELD_IN}
  assert not trained & {gen.TASKS_BY_NAME[t].cluster
                        for t in mini_flan.MAIN_HELD_OUT}
