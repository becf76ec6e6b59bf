"""The paths a job touches (model directory, init checkpoint, gin files,
data files) as `etils.epath.Path`s, so a local folder and a remote
filesystem (gs://bucket/dir on Google Cloud Storage, s3://...) are handled
alike.

A remote path is never resolved: `pathlib.Path('gs://b/run').resolve()` is
the local folder `<cwd>/gs:/b/run`.
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URI (`scheme://...`) rather than a local path."""
  return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: a URI as given, a local path made absolute
  (orbax needs absolute local paths; `~` is expanded)."""
  if is_remote(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def version(path: str | os.PathLike) -> tuple[int, int]:
  """(size in bytes, modification time in ns) of the file `path`: what a
  cache of something computed from the file compares to see it changed. A
  remote filesystem reports the time to the second."""
  if is_remote(path):
    stat = epath.Path(path).stat()
    return stat.length, stat.mtime * 10**9
  stat = os.stat(path)
  return stat.st_size, stat.st_mtime_ns
