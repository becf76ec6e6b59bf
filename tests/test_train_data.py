"""BatchStream: batches are a pure function of the step; asking again for
the last step does not re-read the data; a saved position resumes without
replaying the stream. ArrayStream: the same batches, read once."""

import numpy as np
import pytest
import seqio
import tensorflow as tf
from etils import epath

import tasks  # noqa: F401  (registers mini_flan)
from moe_jax.train import data
from tasks import mini_flan

CONFIG = data.DataConfig("mini_flan_parity_zs", {"inputs": 32, "targets": 8},
                         batch_size=4)


def test_repeated_step_is_not_reread(monkeypatch):
  stream = data.BatchStream(CONFIG)
  restarts = []
  restart = stream._restart
  monkeypatch.setattr(stream, "_restart",
                      lambda: (restarts.append(1), restart())[1])
  first = stream(0)
  again = stream(0)
  stream(1)
  assert len(restarts) == 1
  for key, value in first.items():
    np.testing.assert_array_equal(again[key], value)


def test_earlier_step_replays_the_same_batch():
  stream = data.BatchStream(CONFIG)
  first = stream(0)
  stream(1)
  replayed = stream(0)
  fresh = data.BatchStream(CONFIG)(0)
  for key, value in first.items():
    np.testing.assert_array_equal(replayed[key], value)
    np.testing.assert_array_equal(fresh[key], value)


_READS = []  # one entry per example the counting task's source yields


def _counted_examples(split, shuffle_files, seed=None):
  del split, shuffle_files, seed

  def count(i):
    _READS.append(int(i))
    return i

  # The counter is the py_function's only state: its position need not be
  # saved.
  options = tf.data.Options()
  options.experimental_external_state_policy = (
      tf.data.experimental.ExternalStatePolicy.IGNORE)
  numbers = tf.data.Dataset.range(10_000).map(
      lambda i: tf.ensure_shape(tf.py_function(count, [i], tf.int64), [])
  ).with_options(options)
  return numbers.map(lambda i: {"inputs": tf.strings.as_string(i),
                                "targets": tf.strings.as_string(i % 2)})


seqio.TaskRegistry.add(
    "test_counted_reads",
    source=seqio.FunctionDataSource(_counted_examples, splits=["train"]),
    preprocessors=[seqio.preprocessors.tokenize,
                   seqio.preprocessors.append_eos],
    output_features=mini_flan.output_features())


def _reads(stream, steps) -> tuple[int, list[data.Batch]]:
  _READS.clear()
  batches = [stream(step) for step in steps]
  return len(_READS), batches


def test_a_restored_position_reads_o1_examples_and_continues_exactly(
    tmp_path):
  config = data.DataConfig("test_counted_reads", {"inputs": 8, "targets": 4},
                           batch_size=4, pack=False)
  fresh_reads, _ = _reads(data.BatchStream(config), [0, 1])
  whole = data.BatchStream(config)
  for step in range(40):
    whole(step)
  assert whole.save_position(40, epath.Path(tmp_path))
  replay_reads, _ = _reads(data.BatchStream(config), [40, 41])
  resumed = data.BatchStream(config)
  _READS.clear()
  assert resumed.restore_position(40, epath.Path(tmp_path))
  batches = [resumed(40), resumed(41)]
  restored_reads = len(_READS)
  expected = [whole(40), whole(41)]
  for got, want in zip(batches, expected):
    for key, value in want.items():
      np.testing.assert_array_equal(got[key], value)
  # Replaying reads what the 40 earlier batches took too; a restored
  # position (shuffle buffer included) reads no more than a fresh stream's
  # first two batches, whatever the step.
  assert replay_reads > fresh_reads
  assert restored_reads <= fresh_reads


def test_no_saved_position_replays(tmp_path):
  stream = data.BatchStream(CONFIG)
  assert not stream.save_position(3, epath.Path(tmp_path))  # not at step 3
  assert not stream.restore_position(3, epath.Path(tmp_path))
  first = stream(0)
  np.testing.assert_array_equal(first["decoder_target_tokens"],
                                data.BatchStream(CONFIG)(0)[
                                    "decoder_target_tokens"])


def test_array_stream_holds_the_pipelines_batches_through_a_file(tmp_path):
  read = data.ArrayStream.read(CONFIG, 3)
  read.save(tmp_path / "batches.npz")
  loaded = data.ArrayStream.load(CONFIG, tmp_path / "batches.npz")
  pipeline = data.BatchStream(CONFIG)
  for step in (2, 0, 1):
    want = pipeline(step)
    for stream in (read, loaded):
      got = stream(step)
      assert got.keys() == want.keys()
      for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)
  assert loaded.num_steps == 3
  with pytest.raises(IndexError, match="step 3 is outside the 3 steps"):
    loaded(3)
  assert not list(tmp_path.glob("*.partial"))
