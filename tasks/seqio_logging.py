"""seqio warnings that repeat per task of a mixture, shown once a process.

seqio warns "Using an uncached FunctionDataset for training ..." on every
shuffled read of a `FunctionDataSource`: once per task, so a mixture's first
screen was dozens of copies (66 for the main command's mixture) before the
job's own output. Its advice (cache the task so that restarts reshuffle
well) does not apply to moe_jax's trainer, which resumes the data stream by
step, so one copy is kept.
"""

import logging

_ONCE = ("Using an uncached FunctionDataset for training",)


class _Once(logging.Filter):
  """Passes the first record that starts with each of `prefixes`, drops
  the later ones; other records pass."""

  def __init__(self, prefixes):
    super().__init__()
    self._prefixes = prefixes
    self._seen = set()

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    for prefix in self._prefixes:
      if message.startswith(prefix):
        if prefix in self._seen:
          return False
        self._seen.add(prefix)
    return True


def install() -> None:
  """Adds the filter to absl's logger, which seqio logs through."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _Once) for f in logger.filters):
    logger.addFilter(_Once(_ONCE))
