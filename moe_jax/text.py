"""Text to token ids for the model's input features.

Dimension names: B texts, L length.
"""

from __future__ import annotations

from typing import Iterator, Optional, Protocol, Sequence

import numpy as np

from moe_jax import paths


class Vocabulary(Protocol):
  """What encoding and decoding need of a vocabulary (seqio's fit)."""
  eos_id: int

  def encode(self, s: str) -> Sequence[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


def text_lines(path: str) -> Iterator[tuple[int, str]]:
  """(1-based line number, line) of a UTF-8 text file (local or remote,
  `moe_jax.paths`); invalid UTF-8 is a ValueError naming the file, the line
  and the byte."""
  with paths.as_path(path).open("rb") as f:
    for lineno, raw in enumerate(f, 1):
      yield lineno, decode_line(raw, path, lineno)


def decode_line(raw: bytes, path: str, lineno: int) -> str:
  """`raw` decoded as UTF-8; else a ValueError naming the file, the 1-based
  line and the byte."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte "
                     f"{raw[e.start]:#04x} at byte {e.start + 1} of the "
                     "line)") from None


def encode_texts(texts: Sequence[str], vocabulary: Vocabulary,
                 length: Optional[int] = None) -> np.ndarray:
  """<int32>[B, L] ids of `texts`, each ended by EOS and padded with 0.

  A text longer than `length` - 1 ids is cut to that many, so that every
  row still ends with EOS, as the SeqIO pipelines' examples do.

  Args:
    texts: B strings.
    vocabulary: encodes each text (EOS not included).
    length: L; default: the longest text's ids plus EOS.
  """
  ids = [list(vocabulary.encode(t)) for t in texts]
  if length is None:
    length = max(map(len, ids), default=0) + 1
  if length < 1:
    raise ValueError(f"length must be >= 1 (room for EOS); got "
                     f"length={length}")
  out = np.zeros((len(ids), length), np.int32)
  for row, seq in zip(out, ids):
    seq = seq[:length - 1] + [vocabulary.eos_id]
    row[:len(seq)] = seq
  return out
