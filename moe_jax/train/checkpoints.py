"""Checkpoints of the train state (orbax), with the run's config beside them.

Layout of a model directory:
  MODEL_DIR/config.gin         the operative config of the run that wrote it
  MODEL_DIR/checkpoints/<step> orbax checkpoints (the last `keep` are kept)

A model directory written with a different config is refused unless
`overwrite_config=True`, so two runs never mix their checkpoints silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.gin"


class Checkpointer:
  """Saves every `save_every` steps (asynchronously), keeps the last `keep`.

  Args:
    model_dir: the run's directory (created if missing).
    config_text: the run's configuration, stored as MODEL_DIR/config.gin.
    save_every: steps between checkpoints.
    keep: checkpoints kept (older ones are deleted).
    async_save: write in a background thread while training goes on.
    overwrite_config: accept a directory written with another config.
  """

  def __init__(self, model_dir: str, config_text: str, save_every: int,
               keep: int = 3, async_save: bool = True,
               overwrite_config: bool = False):
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1; got save_every={save_every}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1; got keep={keep}")
    self.model_dir = Path(model_dir).resolve()
    self.model_dir.mkdir(parents=True, exist_ok=True)
    config_path = self.model_dir / CONFIG_FILE
    if config_path.exists() and config_path.read_text() != config_text and (
        not overwrite_config):
      raise ValueError(
          f"{self.model_dir} holds a run with a different config "
          f"({config_path}); use a new model directory or set "
          "overwrite_config=True to continue from it anyway")
    config_path.write_text(config_text)
    self._manager = ocp.CheckpointManager(
        self.model_dir / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=save_every,
            enable_async_checkpointing=async_save))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Saves at `step` when it is a save step (or `force`); returns whether
    a save started."""
    return self._manager.save(step, args=ocp.args.StandardSave(state),
                              force=force)

  def restore(self, step: int, target: Any) -> Any:
    """The state saved at `step`, laid out like `target` (arrays or
    `jax.ShapeDtypeStruct`s with shardings: a different mesh than the one
    that saved it is fine)."""
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
        jax.ShapeDtypeStruct(x.shape, x.dtype,
                             sharding=getattr(x, "sharding", None)), target)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    """Blocks until background saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
