"""moe_jax models with T5X's module contracts.

T5X's `EncoderDecoderModel` / `DecoderOnlyModel` call the module and expect
arrays; moe_jax models return them with their routing statistics
(`(encoded, stats)`, `(logits, stats)`, `ModelOutput(logits, moe_stats)`).
These subclasses keep the models' signatures (T5X calls `encode` / `decode`
through `apply(..., method=...)` with keyword arguments) and drop the
statistics, which are not lost: every MoE layer also sows them into
`intermediates`, where T5X's MoE model reads them. Parameters are identical
to the wrapped models' (same tree), so moe_jax checkpoints load unchanged.

Dimension names (moe_jax's glossary): B batch, L length (decoder-only), Le
encoder length, Ld decoder length, D model width, V vocabulary.
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any, Callable

from moe_jax.models.decoder_only import DecoderOnly
from moe_jax.models.outputs import ModelOutput
from moe_jax.models.t5 import EncoderDecoder


def _logits(output: ModelOutput) -> Any:
  return output.logits


def _without_stats(method: Callable, pick: Callable = operator.itemgetter(0)
                   ) -> Callable:
  """`method` under its own signature, returning `pick(its output)`."""

  @functools.wraps(method)
  def adapted(self, *args, **kwargs):
    return pick(method(self, *args, **kwargs))

  return adapted


def _ignoring(method: Callable, name: str) -> Callable:
  """`method` that also takes keyword `name` (default None) and drops it;
  its signature shows the extra parameter."""

  @functools.wraps(method)
  def adapted(self, *args, **kwargs):
    kwargs.pop(name, None)
    return method(self, *args, **kwargs)

  signature = inspect.signature(method)
  adapted.__signature__ = signature.replace(parameters=[
      *signature.parameters.values(),
      inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)])
  return adapted


class T5XEncoderDecoder(EncoderDecoder):
  """`EncoderDecoder` whose `encode` returns encoded <[B, Le, D]>, and whose
  `decode` and `__call__` return logits <float32>[B, Ld, V]."""
  encode = _without_stats(EncoderDecoder.encode)
  decode = _without_stats(EncoderDecoder.decode)
  __call__ = _without_stats(EncoderDecoder.__call__, _logits)


class T5XDecoderOnly(DecoderOnly):
  """`DecoderOnly` whose `__call__` returns logits <float32>[B, L, V]. It
  also takes the `max_decode_length` T5X's sampling passes, unused: the
  cache made at init fixes the decode length (as `EncoderDecoder.decode`)."""
  __call__ = _without_stats(
      _ignoring(DecoderOnly.__call__, "max_decode_length"), _logits)
