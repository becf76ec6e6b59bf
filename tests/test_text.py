"""Text to ids: every row ends with EOS, also when the text is cut."""

import numpy as np
import pytest

from moe_jax.text import encode_texts


class _Letters:
  """a -> 3, b -> 4, ...; EOS 1."""
  eos_id = 1

  def encode(self, s):
    return [ord(c) - ord("a") + 3 for c in s]

  def decode(self, ids):
    return "".join(chr(i - 3 + ord("a")) for i in ids)


def test_pads_to_the_longest_text_plus_eos():
  np.testing.assert_array_equal(
      encode_texts(["ab", "abcd", ""], _Letters()),
      [[3, 4, 1, 0, 0], [3, 4, 5, 6, 1], [1, 0, 0, 0, 0]])


def test_keeps_eos_when_cutting_to_length():
  ids = encode_texts(["abcdef", "a"], _Letters(), length=4)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [[3, 4, 5, 1], [3, 1, 0, 0]])


def test_length_must_leave_room_for_eos():
  with pytest.raises(ValueError, match="length"):
    encode_texts(["a"], _Letters(), length=0)
