"""What every launcher shares: the job command and how commands are shown."""

from __future__ import annotations

import shlex
from typing import Sequence


def job_command(main_args: Sequence[str], distributed: str,
                python: str = "python3") -> list[str]:
  """`python -m moe_jax.main ARGS --distributed=MODE` as an argument list.

  Args:
    main_args: what follows `python -m moe_jax.main`, e.g.
      ["train", "--gin_file=gin/runs/x.gin", "--gin.TRAIN_STEPS=10"].
    distributed: `moe_jax.distributed` mode every process starts with.
    python: interpreter on the workers.
  """
  if not main_args:
    raise ValueError("give the moe_jax.main command after '--', e.g. "
                     "'-- train --gin_file=gin/runs/mini_flan_cpu.gin'")
  return [python, "-m", "moe_jax.main", *main_args,
          f"--distributed={distributed}"]


def show(command: Sequence[str]) -> str:
  """A command as one shell-quoted line."""
  return shlex.join(command)
