"""The model directory: checkpoints of the train state (orbax), with the
run's config beside them. This module is the one place that knows its layout:

  MODEL_DIR/config.gin                 the operative config of the run
  MODEL_DIR/checkpoints/<step>/default orbax checkpoint of the `TrainState`
                                       (the last `keep` steps are kept)
  MODEL_DIR/data/<step>/process_<p>.*  where process p's input stream stood
                                       at that step (`BatchStream`), so a
                                       resume does not replay the data

`Checkpointer` writes it during a run; `steps`, `restore_params` and
`restore_model_state` read it for evaluation, inference, warm starts and
inspection.

A model directory written with a different config is refused unless
`overwrite_config=True`, so two runs never mix their checkpoints silently.
The comparison leaves out the bookkeeping of `TrainConfig` (`BOOKKEEPING`:
where the directory is, how long and how often), so a moved directory or a
run extended by a larger TRAIN_STEPS resumes. config.gin is written only
once the run has restored its state and finished a step (`commit_config`),
so a failed start never changes it.

MODEL_DIR may be remote (gs://bucket/run): every path here is an
`etils.epath.Path` (`moe_jax.paths`), and orbax writes the arrays through
TensorStore.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import Any, Optional, Protocol

import jax
import orbax.checkpoint as ocp
from etils import epath

from moe_jax import distributed
from moe_jax.paths import as_path

CONFIG_FILE = "config.gin"
CHECKPOINTS_DIR = "checkpoints"
DATA_DIR = "data"
_ITEM_DIR = "default"  # the CheckpointManager's single item in a step
MODEL_STATE = "model_state"  # the `TrainState` field of the model state
# TrainConfig fields that do not change what is trained.
BOOKKEEPING = ("model_dir", "num_steps", "save_every", "keep_checkpoints",
               "log_every", "eval_every", "overwrite_config",
               "async_checkpointing", "peak_tflops_per_device",
               "tensorboard")
_BOOKKEEPING_LINE = re.compile(
    r"^\S*TrainConfig\.(%s) = (%%(\w+))?" % "|".join(BOOKKEEPING))


def comparable_config(text: str) -> list[str]:
  """The lines of a config text that must match to resume: all but the
  `BOOKKEEPING` bindings and the macros they are bound to."""
  lines = text.splitlines()
  matches = [_BOOKKEEPING_LINE.match(line) for line in lines]
  macros = {m.group(3) for m in matches if m and m.group(3)}
  macro_line = re.compile(r"^(%s) = " % "|".join(macros)) if macros else None
  return [line for line, m in zip(lines, matches) if not m and not (
      macro_line and macro_line.match(line))]


def config_difference(stored: str, new: str, limit: int = 12) -> str:
  """The changed comparable lines, `-` stored and `+` new, one a line."""
  changed = [line for line in difflib.unified_diff(
      comparable_config(stored), comparable_config(new), lineterm="", n=0)
             if line[:1] in "+-" and line[:3] not in ("---", "+++")]
  more = len(changed) - limit
  return "\n".join(changed[:limit] + ([f"... {more} more"] if more > 0
                                       else []))


def steps(model_dir: str | os.PathLike) -> list[int]:
  """Steps with a finished checkpoint in `model_dir`, ascending ([] if
  none)."""
  return sorted(ocp.utils.checkpoint_steps(as_path(model_dir) /
                                           CHECKPOINTS_DIR))


def resolve_step(model_dir: str | os.PathLike,
                 step: Optional[int] = None) -> int:
  """`step` (default: the newest step) after checking `model_dir` has it.

  Raises:
    ValueError: `model_dir` has no checkpoint, or none of `step`.
  """
  saved = steps(model_dir)
  if not saved:
    where = as_path(model_dir) / CHECKPOINTS_DIR
    raise ValueError(f"no checkpoint under {where} yet: train first")
  if step is None:
    return saved[-1]
  if step not in saved:
    raise ValueError(f"step={step} has no checkpoint in {model_dir}; saved "
                     f"steps: {saved}")
  return step


def _item(path: epath.Path, step: Optional[int]) -> epath.Path:
  """The orbax item of a model directory's `step` (default: the latest),
  or of a step directory."""
  if (path / CHECKPOINTS_DIR).is_dir() or (path / CONFIG_FILE).is_file():
    path = path / CHECKPOINTS_DIR / str(resolve_step(path, step))
  elif step is not None:
    raise ValueError(f"step={step} given, but {path} is not a model "
                     f"directory (it has no {CHECKPOINTS_DIR}/)")
  if not path.is_dir():
    raise ValueError(f"{path} is neither a model directory nor a checkpoint "
                     "step directory")
  return path / _ITEM_DIR if (path / _ITEM_DIR).is_dir() else path


def restore_params(path: str | os.PathLike, step: Optional[int] = None,
                   abstract_params: Any = None,
                   sharding: Optional[jax.sharding.Sharding] = None) -> Any:
  """The parameters (`params` of the saved `TrainState`) of a checkpoint;
  the optimizer state is not read.

  Args:
    path: a model directory, or one step's directory
      (MODEL_DIR/checkpoints/<step>).
    step: the model directory's step to read (default: the latest).
    abstract_params: the tree to restore (`jax.ShapeDtypeStruct` leaves, e.g.
      of the model about to use it: a saved tree that does not fit fails
      here, and leaves are cast to these dtypes); default: the saved tree
      as saved.
    sharding: where every array goes (default: this process's first device).

  Raises:
    ValueError: no checkpoint at `path`, or `step` not saved.
  """
  return _restore_entry(_item(as_path(path), step), "params",
                        abstract_params, sharding)


def restore_model_state(path: str | os.PathLike, step: Optional[int] = None,
                        sharding: Optional[jax.sharding.Sharding] = None
                        ) -> dict[str, Any]:
  """The non-gradient model state (`model_state` of the saved `TrainState`,
  e.g. the aux-loss-free router's selection bias) of a checkpoint, as
  saved; {} when it has none (a model without such state, or a checkpoint
  written before the train state held it). Arguments as `restore_params`.
  """
  item = _item(as_path(path), step)
  saved = _saved_entries(item).get(MODEL_STATE)
  if not saved:
    return {}
  return _restore_entry(item, MODEL_STATE, _abstract(saved), sharding)


def _saved_entries(item: epath.Path) -> dict[str, Any]:
  """Field name -> metadata tree of the `TrainState` saved at `item`."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    saved = checkpointer.metadata(item).item_metadata
  if saved is None:
    raise ValueError(f"{item}: its metadata is missing or unreadable")
  return dict(saved)


def _abstract(metadata: Any) -> Any:
  """`jax.ShapeDtypeStruct`s of an orbax metadata tree."""
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                      metadata)


def _restore_entry(item: epath.Path, key: str, abstract: Any,
                   sharding: Optional[jax.sharding.Sharding]) -> Any:
  """Entry `key` of the saved `TrainState` at `item`, laid out like
  `abstract` (default: as saved), every array on `sharding` (default: this
  process's first device)."""
  sharding = sharding or jax.sharding.SingleDeviceSharding(
      jax.local_devices()[0])
  if abstract is None:
    abstract = _abstract(_saved_entries(item)[key])
  with ocp.PyTreeCheckpointer() as checkpointer:
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(dtype=x.dtype, sharding=sharding),
        abstract)
    restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
        item={key: abstract}, partial_restore=True,
        restore_args={key: restore_args}))
  return restored[key]


def _restore_failure(model_dir: epath.Path, step: int, saved: list[int],
                     error: Exception) -> str:
  """Says which checkpoint failed, why (the first line of `error`), and
  how to fall back to the previous one."""
  step_dir = model_dir / CHECKPOINTS_DIR / str(step)
  cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
  earlier = [s for s in saved if s < step]
  fallback = (f"delete it to resume from step {earlier[-1]}: rm -r {step_dir}"
              if earlier else f"no earlier checkpoint remains in "
              f"{model_dir / CHECKPOINTS_DIR}")
  return (f"checkpoint of step {step} ({step_dir}) could not be restored: "
          f"{type(error).__name__}: {cause[:300]}\nIf the config changed "
          "(overwrite_config), the checkpoint does not fit this model; if "
          f"the checkpoint is damaged (a truncated file), {fallback}")


def _without_model_state(abstract: Any, step: int,
                         model_dir: epath.Path) -> dict[str, Any]:
  """The fields of a `TrainState` but its empty `model_state`, to restore a
  checkpoint written before the train state held one.

  Raises:
    ValueError: the model has model state, which the checkpoint lacks.
  """
  model_state = getattr(abstract, MODEL_STATE)
  if jax.tree.leaves(model_state):
    raise ValueError(
        f"checkpoint of step {step} in {model_dir} holds no {MODEL_STATE}, "
        f"but this model keeps {', '.join(model_state)} (e.g. the selection "
        "bias of AuxLossFreeRouter): it was written by another model or "
        "an older moe_jax; start a new model directory from it with "
        "TrainConfig.init_checkpoint")
  return {f.name: getattr(abstract, f.name)
          for f in dataclasses.fields(abstract) if f.name != MODEL_STATE}


class DataPosition(Protocol):
  """An input stream whose position can be saved and restored
  (`data.BatchStream`)."""

  def save_position(self, step: int, directory: epath.Path) -> bool: ...

  def restore_position(self, step: int, directory: epath.Path) -> bool: ...


class Checkpointer:
  """Saves every `save_every` steps (asynchronously), keeps the last `keep`.

  Args:
    model_dir: the run's directory (created if missing), local or remote
      (gs://bucket/run).
    config_text: the run's configuration, stored as MODEL_DIR/config.gin.
    save_every: steps between checkpoints.
    keep: checkpoints kept (older ones are deleted).
    async_save: write in a background thread while training goes on.
    overwrite_config: accept a directory written with another config.
    data: the input stream, whose position is saved with every checkpoint
      and restored with it.
  """

  def __init__(self, model_dir: str, config_text: str, save_every: int,
               keep: int = 3, async_save: bool = True,
               overwrite_config: bool = False,
               data: Optional[DataPosition] = None):
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1; got save_every={save_every}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1; got keep={keep}")
    self.model_dir = as_path(model_dir)
    self.model_dir.mkdir(parents=True, exist_ok=True)
    self._config_text = config_text
    config_path = self.model_dir / CONFIG_FILE
    stored = config_path.read_text() if config_path.exists() else None
    if stored is not None and not overwrite_config and (
        comparable_config(stored) != comparable_config(config_text)):
      raise ValueError(
          f"{self.model_dir} holds a run with a different config "
          f"({config_path}):\n{config_difference(stored, config_text)}\n"
          "Use a new model directory, or bind "
          "run.TrainConfig.overwrite_config=True to continue from it anyway")
    self._config_committed = stored == config_text
    self._data = data
    self._manager = ocp.CheckpointManager(
        self.model_dir / CHECKPOINTS_DIR,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=save_every,
            enable_async_checkpointing=async_save))

  def commit_config(self) -> None:
    """Writes config.gin (process 0 only; atomically, so another process
    reading it sees the old text or the new one). Called once the run has
    restored its state and finished a step."""
    if self._config_committed:
      return
    self._config_committed = True
    if jax.process_index() != 0:
      return
    config_path = self.model_dir / CONFIG_FILE
    partial = config_path.with_name(f"{CONFIG_FILE}.{os.getpid()}.tmp")
    partial.write_text(self._config_text)
    partial.replace(config_path)

  def latest_step(self) -> Optional[int]:
    """The newest step this run's manager knows, a save in flight
    included (readers outside the run use `resolve_step(model_dir)`)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Saves at `step` when it is a save step (or `force`); returns whether
    a save started. The data position is saved with it (and positions of
    steps no longer kept are deleted)."""
    started = self._manager.save(step, args=ocp.args.StandardSave(state),
                                 force=force)
    if started and self._data is not None:
      self._data.save_position(step, self._data_dir(step))
      kept = set(self.all_steps()) | {step}
      if jax.process_index() == 0 and (self.model_dir / DATA_DIR).exists():
        for old in (self.model_dir / DATA_DIR).iterdir():
          if old.name.isdigit() and int(old.name) not in kept:
            old.rmtree()
    return started

  def _data_dir(self, step: int) -> epath.Path:
    return self.model_dir / DATA_DIR / str(step)

  def restore(self, step: int, target: Any) -> Any:
    """The state saved at `step`, laid out like `target` (arrays or
    `jax.ShapeDtypeStruct`s with shardings: a different mesh than the one
    that saved it is fine)."""
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
        jax.ShapeDtypeStruct(x.shape, x.dtype,
                             sharding=getattr(x, "sharding", None)), target)
    try:
      legacy = (dataclasses.is_dataclass(abstract) and
                hasattr(abstract, MODEL_STATE) and
                MODEL_STATE not in _saved_entries(
                    self.model_dir / CHECKPOINTS_DIR / str(step) / _ITEM_DIR))
    except Exception as e:  # orbax and TensorStore raise many kinds
      raise ValueError(_restore_failure(self.model_dir, step,
                                        self.all_steps(), e)) from e
    if legacy:
      abstract = _without_model_state(abstract, step, self.model_dir)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax and TensorStore raise many kinds
      raise ValueError(_restore_failure(self.model_dir, step,
                                        self.all_steps(), e)) from e
    if legacy:
      restored = type(target)(**restored)
    if self._data is not None:
      restored_data = distributed.count(
          self._data.restore_position(step, self._data_dir(step)))
      if jax.process_index() == 0:
        others = jax.process_count() - restored_data
        print(f"data position of step {step}: restored on {restored_data} "
              f"of {jax.process_count()} processes" +
              (f"; {others} replay the stream from step 0" if others else ""),
              flush=True)
    return restored

  def delete(self, step: int) -> None:
    """Deletes the checkpoint of `step` (and its data position)."""
    self._manager.delete(step)
    if jax.process_index() == 0 and self._data_dir(step).exists():
      self._data_dir(step).rmtree()

  def wait(self) -> None:
    """Blocks until background saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
