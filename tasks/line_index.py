"""Line index of a JSONL file: where each line starts, its group, its hash.

Built in one streaming pass (the file is never held in memory) and cached
next to the file as `<file>.index.npz`, stamped with the file's size and
modification time so that a changed file is re-indexed. Where the folder is
not writable the index is kept for the process only. The file and the cache
may be local or remote (gs://...; `moe_jax.paths`).

N below is the number of non-empty lines of the file.
"""

import dataclasses
import hashlib
import json
import logging
import os
from typing import Dict, Tuple

import numpy as np

from moe_jax import paths, text

INDEX_SUFFIX = ".index.npz"


@dataclasses.dataclass(frozen=True)
class LineIndex:
  """Attributes:
    offsets: <int64>[N] byte offset of each non-empty line.
    groups: <int32>[N] index into `names` of each line's group field.
    fingerprints: <uint64>[N] hash of each line's bytes (its order key).
    names: the distinct group values, in order of first appearance.
  """
  offsets: np.ndarray
  groups: np.ndarray
  fingerprints: np.ndarray
  names: Tuple[str, ...]

  def counts(self) -> Dict[str, int]:
    """{group: number of lines}."""
    per = np.bincount(self.groups, minlength=len(self.names))
    return {name: int(n) for name, n in zip(self.names, per)}


def build(path: str, group_field: str) -> LineIndex:
  """Streams `path` once; ValueError names the file and 1-based line."""
  offsets, groups, prints, ids = [], [], [], {}
  with paths.as_path(path).open("rb") as f:
    offset, lineno = 0, 0
    for line in f:
      lineno += 1
      if line.strip():
        try:
          record = json.loads(text.decode_line(line, path, lineno))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or group_field not in record:
          raise ValueError(f"{path}:{lineno}: expected a JSON object with "
                           f"the field {group_field!r}")
        offsets.append(offset)
        groups.append(ids.setdefault(str(record[group_field]), len(ids)))
        prints.append(int.from_bytes(hashlib.blake2b(
            line.rstrip(b"\r\n"), digest_size=8).digest(), "little"))
      offset += len(line)
  return LineIndex(np.array(offsets, np.int64), np.array(groups, np.int32),
                   np.array(prints, np.uint64), tuple(ids))


def load_or_build(path: str, group_field: str) -> LineIndex:
  """The cached index of `path` when its stamp matches, else a new one
  (written to the cache when the folder allows)."""
  cache = paths.as_path(path + INDEX_SUFFIX)
  stamp = np.array(paths.version(path), np.int64)
  if cache.exists():
    with cache.open("rb") as f, np.load(f, allow_pickle=False) as z:
      if (np.array_equal(z["stamp"], stamp) and
          str(z["group_field"]) == group_field):
        return LineIndex(z["offsets"], z["groups"], z["fingerprints"],
                         tuple(str(n) for n in z["names"]))
  index = build(path, group_field)
  tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")
  try:
    with tmp.open("wb") as f:
      np.savez(f, stamp=stamp, group_field=np.array(group_field),
               offsets=index.offsets, groups=index.groups,
               fingerprints=index.fingerprints,
               names=np.array(index.names, dtype=str))
    tmp.replace(cache)
  # A remote filesystem refuses a write with its own errors (tf.errors,
  # gcsfs's HttpError), not only OSError.
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("line index of %s not cached (%s)", path, e)
  return index
