"""BatchStream: batches are a pure function of the step; asking again for
the last step does not re-read the data."""

import numpy as np

import tasks  # noqa: F401  (registers mini_flan)
from moe_jax.train import data

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
