"""The training loop: resume, checkpoint, stop cleanly on preemption.

Exact resume: batches come from `batch_fn(step)` (a pure function of the
step), the dropout RNG of a step is derived from the seed and the step, and
the optimizer state is checkpointed, so a run interrupted and resumed
computes bit for bit what an uninterrupted run computes.

SIGTERM / SIGINT (TPU preemption, Ctrl-C) finish the step in flight, save a
checkpoint of it, and return. In a multi-process job the processes agree
after every step on whether any of them got a signal
(`distributed.agreed_signal`), so all stop and save at the same step even
when only one host was signalled. A non-finite loss stops the run: the state
it produced is not saved, and the checkpoint of the parameters that gave
the loss (saved a step earlier) is deleted, so the latest checkpoint left
is the last good one. The run's config.gin is written after its first
step (`Checkpointer.commit_config`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
from typing import Any, Callable, Iterator, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np
import optax

from moe_jax import distributed
from moe_jax.train.checkpoints import Checkpointer
from moe_jax.train.objective import LossConfig
from moe_jax.train.step import TrainState, init_state, make_train_step

Batch = Mapping[str, Any]


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the run stopped without saving, the
  checkpoint of the parameters that gave the loss deleted."""


@dataclasses.dataclass(frozen=True)
class LoopResult:
  """Attributes:
    state: the state after the last step run.
    history: per step run here, {"step": step, metric: float (or a list
      of floats: per-expert loads), ...}.
    resumed_from: the checkpoint step the run resumed from (None: fresh).
    preempted: a signal stopped the run before `num_steps`.
    stop_signal: the signal number that stopped it (None: not stopped).
  """
  state: TrainState
  history: list[dict]
  resumed_from: Optional[int]
  preempted: bool
  stop_signal: Optional[int] = None


class _StopRequest(threading.Event):
  """Set by a stop signal; `signum` is the last one received."""
  signum: Optional[int] = None


@contextlib.contextmanager
def _stop_requests() -> Iterator[_StopRequest]:
  """An event set by SIGTERM or SIGINT while the block runs."""
  requested = _StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield requested
    return

  def handler(signum, frame):
    del frame
    requested.signum = signum
    requested.set()

  previous = {s: signal.signal(s, handler)
              for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield requested
  finally:
    for s, old in previous.items():
      signal.signal(s, old)


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float | list[float]]:
  """Metrics as floats; a per-layer value `name/per_layer` becomes
  `name/layer_<i>` (a list of floats per layer for <[R, E]> values, e.g. the
  per-expert load). Reads this process's copy of replicated values, so it
  works in multi-process jobs too."""
  out = {}
  for name, value in metrics.items():
    if isinstance(value, jax.Array):
      value = value.addressable_data(0)
    value = np.asarray(value)
    if value.ndim == 0:
      out[name] = float(value)
    else:
      base = name.removesuffix("/per_layer")
      out.update({f"{base}/layer_{i}": v.tolist() if v.ndim else float(v)
                  for i, v in enumerate(value)})
  return out


def train(model: nn.Module, optimizer: optax.GradientTransformation,
          loss_config: LossConfig, batch_fn: Callable[[int], Batch],
          num_steps: int, checkpointer: Checkpointer, *, seed: int = 0,
          on_step: Optional[Callable[[int, dict], None]] = None,
          initial_state: Optional[Callable[[jax.Array], TrainState]] = None,
          state_shardings: Any = None,
          step_fn: Optional[Callable] = None,
          after_step: Optional[Callable[[int, TrainState], None]] = None
          ) -> LoopResult:
  """Trains until `num_steps` updates are done, resuming from the latest
  checkpoint in `checkpointer` if there is one.

  Args:
    batch_fn: step -> batch (numpy arrays with the model's feature names).
    seed: the parameter initialization and dropout key.
    on_step: called after every step with (step, scalar metrics).
    initial_state: PRNG key -> fresh state (e.g. placed on a mesh, or
      initialized from another checkpoint); default: `init_state` on the
      batch of step 0, on the default device.
    state_shardings: shardings of the state, kept by the jitted step.
    step_fn: the jitted step (default: `make_train_step` of `model`,
      `optimizer`, `loss_config` and `state_shardings`); runs that pass the
      same one share its traces.
    after_step: called with (step, state) after each step's metrics are
      logged, e.g. to evaluate every N steps.

  Raises:
    NonFiniteLossError: with the step, the deleted checkpoint and the last
      good one.
    ValueError: the latest checkpoint cannot be restored (with its step
      and what to delete to fall back).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1; got num_steps={num_steps}")
  key = jax.random.PRNGKey(seed)
  if initial_state is None:
    state = init_state(model, optimizer, batch_fn(0), key)
  else:
    state = initial_state(key)
  resumed_from = checkpointer.latest_step()
  if resumed_from is not None:
    state = checkpointer.restore(resumed_from, state)
  if step_fn is None:
    step_fn = make_train_step(model, optimizer, loss_config, state_shardings)
  dropout_key = jax.random.fold_in(key, 1)
  history = []
  signum = None
  last_saved = resumed_from
  with _stop_requests() as stop:
    while int(state.step) < num_steps:
      step = int(state.step)
      new_state, metrics = step_fn(state, batch_fn(step), dropout_key)
      scalars = _scalars(metrics)
      if not math.isfinite(scalars["loss"]):
        raise NonFiniteLossError(_non_finite(checkpointer, step,
                                             scalars["loss"]))
      checkpointer.commit_config()
      state = new_state
      history.append({"step": step + 1, **scalars})
      if on_step is not None:
        on_step(step + 1, scalars)
      if after_step is not None:
        after_step(step + 1, state)
      signum = distributed.agreed_signal(stop.signum)
      if signum is not None:
        break
      if checkpointer.save(step + 1, state):
        last_saved = step + 1
  if last_saved != int(state.step):
    checkpointer.save(int(state.step), state, force=True)
  checkpointer.wait()
  return LoopResult(state, history, resumed_from, signum is not None,
                    signum)


def _non_finite(checkpointer: Checkpointer, step: int, loss: float) -> str:
  """Deletes the checkpoint of `step` (its parameters gave the non-finite
  `loss` of step `step + 1`) if there is one, and says so, naming the
  last good checkpoint."""
  checkpointer.wait()
  message = (f"non-finite loss {loss} at step {step + 1} (the loss of the "
             f"parameters after step {step}); stopped without saving.")
  if step in checkpointer.all_steps():
    checkpointer.delete(step)
    message += (f" Deleted checkpoint {step}, which holds those "
                "parameters.")
  good = checkpointer.latest_step()
  where = checkpointer.model_dir
  return message + (f" The last good checkpoint is step {good} in {where}"
                    if good is not None else
                    f" No good checkpoint is left in {where}")
