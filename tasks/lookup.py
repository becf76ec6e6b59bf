"""Name lookup for trainers: a registered task or mixture, or an error that
lists the closest registered names."""

import difflib
from typing import Union

import seqio


def get_mixture_or_task(name: str) -> Union[seqio.Task, seqio.Mixture]:
  """The registered mixture or task `name`; ValueError with close names."""
  if name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(name)
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  known = list(seqio.MixtureRegistry.names()) + list(
      seqio.TaskRegistry.names())
  close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
  hint = f" Did you mean: {', '.join(close)}?" if close else ""
  raise ValueError(f"unknown task or mixture {name!r} ({len(known)} "
                   f"registered; see tasks/README.md).{hint}")
