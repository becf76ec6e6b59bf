"""Checks shared by every configurable: errors that name the knob."""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


def choice(enum_type: type[E], knob: str, value) -> E:
  """`enum_type(value)`, or a ValueError naming the knob and the choices."""
  try:
    return enum_type(value)
  except ValueError:
    raise ValueError(f"{knob} must be one of {[m.value for m in enum_type]}; "
                     f"got {knob}={value!r}") from None
