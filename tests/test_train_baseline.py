"""The constant-answer baseline of eval tasks and the summary lines that
print it beside each score."""

import pytest
import seqio
import tensorflow as tf

from tasks import metrics, suites
from tasks.mini_flan import output_features
from moe_jax.train import baseline, summary

ROWS = [("Is 4 even?", "yes", ("yes", "no")),
        ("Is 3 even?", "no", ("yes", "no")),
        ("Is 8 even?", "yes", ("yes", "no")),
        ("Is 6 even?", "yes", ("yes", "no")),
        ("Is 5 even?", "no", ("yes", "no")),
        ("Is 5 odd?", "maybe", ("yes", "no", "maybe"))]
EM, RANK, MIXTURE = "baseline_test_em", "baseline_test_rank", "baseline_test"
LENGTHS = {"inputs": 16, "targets": 8}


def _text(split, shuffle_files, seed=None):
  del split, shuffle_files, seed
  return tf.data.Dataset.from_tensor_slices(
      {"inputs": [r[0] for r in ROWS], "targets": [r[1] for r in ROWS]})


def _options(split, shuffle_files, seed=None):
  del split, shuffle_files, seed
  return suites.option_rows(
      [{"inputs": i, "targets": t, "options": o} for i, t, o in ROWS], RANK)


@pytest.fixture(scope="module", autouse=True)
def _registered():
  preprocessors = [seqio.preprocessors.tokenize,
                   seqio.preprocessors.append_eos_after_trim]
  seqio.TaskRegistry.add(
      EM, source=seqio.FunctionDataSource(_text, splits=("validation",)),
      preprocessors=preprocessors, output_features=output_features(),
      metric_fns=[metrics.exact_match])
  seqio.TaskRegistry.add(
      RANK, source=seqio.FunctionDataSource(_options,
                                            splits=("validation",)),
      preprocessors=preprocessors, output_features=output_features(),
      postprocess_fn=suites.option_row_target,
      metric_fns=[metrics.option_rank_accuracy])
  seqio.MixtureRegistry.add(MIXTURE, [EM, RANK], default_rate=1.0)
  yield
  seqio.MixtureRegistry.remove(MIXTURE)
  seqio.TaskRegistry.remove(EM)
  seqio.TaskRegistry.remove(RANK)


def test_majority_answer_counts_correct_options_only():
  rows = [{"targets_pretokenized": b"no", "is_correct": False},
          {"targets_pretokenized": b"no", "is_correct": False},
          {"targets_pretokenized": b"yes", "is_correct": True}]
  assert baseline.majority_answer(rows) == "yes"
  with pytest.raises(ValueError, match="no correct target among 2 rows"):
    baseline.majority_answer(rows[:2])


def test_constant_answer_scores_of_generated_and_ranked_answers():
  scores = baseline.constant_answer_scores(MIXTURE, "validation", LENGTHS)
  # "yes" answers 3 of the 6 examples, generated or ranked among options.
  assert scores[EM] == {"exact_match": 50.0}
  assert scores[RANK] == {"rank_accuracy": 50.0}
  assert scores[f"{MIXTURE}/average"]["score"] == 50.0
  # The first 4 examples (as the evaluator takes them): "yes" 3 of 4; the
  # first 4 option rows are 2 examples, one answered "yes".
  first = baseline.constant_answer_scores(MIXTURE, "validation", LENGTHS,
                                          num_examples=4)
  assert first[EM] == {"exact_match": 75.0}
  assert first[RANK] == {"rank_accuracy": 50.0}


def test_summary_prints_each_score_beside_its_baseline():
  lines = summary.format_eval(
      {EM: {"exact_match": 83.333}, f"{MIXTURE}/average": {"score": 70.0}},
      {EM: {"exact_match": 50.0}})
  assert lines == [
      f"    {MIXTURE + '/average':<40} score 70.0",
      f"    {EM:<40} exact_match 83.3 (constant 50.0)"]
