"""The vocabulary of text tasks, chosen by gin and resolved at first use.

`make_vocabulary.kind`: "byte" (seqio.ByteVocabulary), or "sentencepiece"
with `make_vocabulary.sentencepiece_path` (any SentencePiece model, e.g. one
trained by `python -m tasks.train_vocab`). Tasks are registered at import,
before gin files are parsed, so they hold a `ConfiguredVocabulary` that asks
`make_vocabulary()` the first time it is used.
"""

import gin
import seqio

KINDS = ("byte", "sentencepiece")


@gin.configurable
def make_vocabulary(kind: str = "byte", sentencepiece_path: str = "",
                    extra_ids: int = 100) -> seqio.Vocabulary:
  """A vocabulary of `kind`; `extra_ids` sentinels for SentencePiece."""
  if kind not in KINDS:
    raise ValueError(f"make_vocabulary.kind: {kind!r} is not one of {KINDS}")
  if extra_ids < 0:
    raise ValueError(f"make_vocabulary.extra_ids: {extra_ids} < 0")
  if kind == "byte":
    return seqio.ByteVocabulary()
  if not sentencepiece_path:
    raise ValueError("make_vocabulary.sentencepiece_path: required for "
                     "kind='sentencepiece'")
  return seqio.SentencePieceVocabulary(sentencepiece_path, extra_ids=extra_ids)


class ConfiguredVocabulary(seqio.Vocabulary):
  """Delegates to `make_vocabulary()`, called on first use and then kept."""

  def __init__(self):
    super().__init__(extra_ids=0)
    self._inner = None

  @property
  def inner(self) -> seqio.Vocabulary:
    if self._inner is None:
      self._inner = make_vocabulary()
    return self._inner

  @property
  def eos_id(self):
    return self.inner.eos_id

  @property
  def pad_id(self):
    return self.inner.pad_id

  @property
  def unk_id(self):
    return self.inner.unk_id

  @property
  def vocab_size(self):
    return self.inner.vocab_size

  @property
  def _base_vocab_size(self):
    return self.inner.vocab_size

  def _encode(self, s):
    return self.inner.encode(s)

  def _decode(self, ids):
    return self.inner.decode(ids)

  def _encode_tf(self, s):
    return self.inner.encode_tf(s)

  def _decode_tf(self, ids):
    return self.inner.decode_tf(ids)

  def encode(self, s):
    return self.inner.encode(s)

  def decode(self, ids):
    return self.inner.decode(ids)

  def encode_tf(self, s):
    return self.inner.encode_tf(s)

  def decode_tf(self, ids):
    return self.inner.decode_tf(ids)

  def __eq__(self, other):
    return isinstance(other, ConfiguredVocabulary) or self.inner == other

  def __hash__(self):
    return id(ConfiguredVocabulary)
