"""Line index of a JSONL or TSV file: where each example's line starts, its
group, its hash.

Built in one streaming pass (the file is never held in memory), which also
checks every line (`line_formats`: a malformed line names the file and the
1-based line), and cached next to the file as `<file>.index.npz`, stamped
with the file's size and modification time so that a changed file is
re-indexed. Where the folder is not writable the index is kept for the
process only. The file and the cache
may be local or remote (gs://...; `moe_jax.paths`).

N below is the number of non-blank lines of the file.
"""

import dataclasses
import hashlib
import json
import logging
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from moe_jax import paths, text
from tasks import line_formats

INDEX_SUFFIX = ".index.npz"


@dataclasses.dataclass(frozen=True)
class LineIndex:
  """Attributes:
    offsets: <int64>[N] byte offset of each non-empty line.
    groups: <int32>[N] index into `names` of each line's group field.
    fingerprints: <uint64>[N] hash of each line's bytes (its order key).
    names: the distinct group values, in order of first appearance; ("",)
      for a file without a group field (one group), () for an empty file.
  """
  offsets: np.ndarray
  groups: np.ndarray
  fingerprints: np.ndarray
  names: Tuple[str, ...]

  def counts(self) -> Dict[str, int]:
    """{group: number of lines}."""
    per = np.bincount(self.groups, minlength=len(self.names))
    return {name: int(n) for name, n in zip(self.names, per)}


def build(path: str, fields: Sequence[str],
          group_field: Optional[str] = None) -> LineIndex:
  """Streams `path` once, parsing each line into `fields` (its format by
  the extension); `group_field` (one of `fields`) groups the lines, None
  puts them in one group. ValueError names the file and 1-based line."""
  parse = line_formats.parse(path)
  offsets, groups, prints, ids = [], [], [], {}
  with paths.as_path(path).open("rb") as f:
    offset = 0
    for lineno, line in enumerate(f, 1):
      decoded = text.decode_line(line, path, lineno)
      if not line_formats.is_blank(decoded):
        record = parse(decoded, fields, f"{path}:{lineno}")
        offsets.append(offset)
        group = record[group_field] if group_field else ""
        groups.append(ids.setdefault(group, len(ids)))
        prints.append(int.from_bytes(hashlib.blake2b(
            line.rstrip(b"\r\n"), digest_size=8).digest(), "little"))
      offset += len(line)
  return LineIndex(np.array(offsets, np.int64), np.array(groups, np.int32),
                   np.array(prints, np.uint64), tuple(ids))


def _spec(fields: Sequence[str], group_field: Optional[str]) -> str:
  """What an index was built for; a cache built for other fields is
  rebuilt (its lines were checked against those)."""
  return json.dumps({"fields": list(fields), "group_field": group_field})


def load_or_build(path: str, fields: Sequence[str],
                  group_field: Optional[str] = None) -> LineIndex:
  """The cached index of `path` when its stamp and spec match, else a new
  one (`build`; written to the cache when the folder allows)."""
  cache = paths.as_path(path + INDEX_SUFFIX)
  stamp = np.array(paths.version(path), np.int64)
  spec = _spec(fields, group_field)
  if cache.exists():
    with cache.open("rb") as f, np.load(f, allow_pickle=False) as z:
      if (np.array_equal(z["stamp"], stamp) and "spec" in z.files and
          str(z["spec"]) == spec):
        return LineIndex(z["offsets"], z["groups"], z["fingerprints"],
                         tuple(str(n) for n in z["names"]))
  index = build(path, fields, group_field)
  tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")
  try:
    with tmp.open("wb") as f:
      np.savez(f, stamp=stamp, spec=np.array(spec),
               offsets=index.offsets, groups=index.groups,
               fingerprints=index.fingerprints,
               names=np.array(index.names, dtype=str))
    tmp.replace(cache)
  # A remote filesystem refuses a write with its own errors (tf.errors,
  # gcsfs's HttpError), not only OSError.
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("line index of %s not cached (%s)", path, e)
  return index
