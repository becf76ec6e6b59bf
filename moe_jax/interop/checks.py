"""Checks every checkpoint importer runs before it converts a weight.

Each function takes the checkpoint's weights as a flat {name: array}
mapping (torch tensors, numpy arrays, tensorstore handles: anything with a
`.shape`) under the checkpoint's own names, and, where it compares, the
expected {name: shape} for the target model. Errors name the offending
weight, so a user sees which key or setting to fix.

  checks.check_names(weights, expected, extra=tied_copies)
  checks.check_shapes(weights, expected)
  for name, array in ...:   # one array in memory at a time
    checks.check_finite(name, array, allow_non_finite=allow_non_finite)
"""

from __future__ import annotations

from typing import Any, Collection, Mapping

import numpy as np

Shape = tuple[int, ...]

ALLOW_NON_FINITE = "allow_non_finite"   # the opt-in flag's name, everywhere
_LISTED = 5   # names quoted in one error


def _quote(names: Collection[str]) -> str:
  names = sorted(names)
  more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
  return ", ".join(names[:_LISTED]) + more


def check_names(weights: Mapping[str, Any], expected: Mapping[str, Shape], *,
                extra: Collection[str] = ()) -> None:
  """Every expected weight is present and no other one is left over.

  Args:
    weights: the checkpoint's {name: array}.
    expected: {name: shape} of the weights the target model reads.
    extra: names the checkpoint may hold beyond `expected` (e.g. copies of
      a tied embedding) that the caller checks itself.

  Raises:
    KeyError: an expected weight is missing (the first few are named).
    ValueError: weights would be ignored: the checkpoint holds more than
      the config describes (e.g. more layers or experts).
  """
  missing = set(expected) - set(weights)
  if missing:
    raise KeyError(f"{len(missing)} weight(s) missing from the checkpoint: "
                   f"{_quote(missing)}")
  leftover = set(weights) - set(expected) - set(extra)
  if leftover:
    raise ValueError(
        f"{len(leftover)} checkpoint weight(s) would be left unused by the "
        f"config (more layers or experts than it describes?): "
        f"{_quote(leftover)}")


def check_shapes(weights: Mapping[str, Any],
                 expected: Mapping[str, Shape]) -> None:
  """Each expected weight present in `weights` has the expected shape.

  Raises:
    ValueError: naming the first mismatching weight, its shape and the
      expected one.
  """
  for name, shape in expected.items():
    if name in weights and tuple(weights[name].shape) != tuple(shape):
      raise ValueError(f"{name} has shape {tuple(weights[name].shape)}; the "
                       f"config expects {tuple(shape)}")


def check_finite(name: str, array: np.ndarray, *,
                 allow_non_finite: bool = False) -> None:
  """`array` (numpy, already read) holds no NaN or infinity.

  Raises:
    ValueError: naming the weight and its count of non-finite values,
      unless `allow_non_finite`.
  """
  if allow_non_finite:
    return
  bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
  if bad:
    raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or inf); "
                     f"pass {ALLOW_NON_FINITE}=True to import it anyway")
