"""T5X model classes that add the MoE losses and report routing metrics.

Needs t5x (installed from source). The classes are built on first use so
that `import moe_jax.t5x.models` works without t5x:

  MoeEncoderDecoderModel = moe_model_class("encoder_decoder")
  model = MoeEncoderDecoderModel(module=T5XEncoderDecoder(config), ...,
                                 aux_loss_factor=0.02)

The routing-loss weights default to `moe_jax.train.objective`'s.

gin/t5x/ binds these through `moe_jax.t5x.models.moe_encoder_decoder_model`.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import jax.numpy as jnp

from moe_jax.moe import metric_names
from moe_jax.t5x.losses import moe_loss_and_metrics
from moe_jax.t5x.variables import t5x_variables
from moe_jax.train import objective

# T5X's base metrics that hold the optimized loss (the rest hold parts).
_TOTAL_LOSS_METRICS = ("loss", "loss_per_nonpadding_target_token",
                       "loss_per_all_target_tokens")

_BASES = {"encoder_decoder": "EncoderDecoderModel",
          "decoder_only": "DecoderOnlyModel"}


def _require_t5x():
  try:
    return (importlib.import_module("t5x.models"),
            importlib.import_module("t5x.losses"),
            importlib.import_module("t5x.metrics"))
  except ImportError as e:
    raise ImportError(
        "moe_jax.t5x.models needs t5x, which is installed from source: "
        "git clone https://github.com/google-research/t5x && "
        "pip install -e ./t5x") from e


def _segment_ids(batch: Any) -> dict[str, Any]:
  """Per-feature segment ids for T5X's packing metrics; a padding mask when
  the batch is not packed (as T5X's own loss_fn does)."""
  suffix = "_segment_ids"
  ids = {k[:-len(suffix)]: v for k, v in batch.items() if k.endswith(suffix)}
  return ids or {k: v != 0 for k, v in batch.items()
                 if k in ("encoder_input_tokens", "decoder_target_tokens")}


@functools.cache
def moe_model_class(kind: str) -> type:
  """Subclass of T5X's `EncoderDecoderModel` or `DecoderOnlyModel`.

  Its `loss_fn` is T5X's (weighted cross-entropy with T5X's z-loss, label
  smoothing and loss normalization) plus aux_loss_factor * mean auxiliary
  loss + router_z_loss_factor * mean router z-loss over sparse layers, and
  its metrics add `experts/<name>` for each scalar in
  `metric_names.SCALAR_METRICS`.

  Args:
    kind: "encoder_decoder" or "decoder_only".
  """
  if kind not in _BASES:
    raise ValueError(f"kind must be one of {sorted(_BASES)}; got {kind!r}")
  t5x_models, t5x_losses, t5x_metrics = _require_t5x()
  base = getattr(t5x_models, _BASES[kind])

  class MoeModel(base):
    """T5X model that trains the MoE routing losses too."""

    def get_initial_variables(self, rng: Any, input_shapes: Any,
                              input_types: Any = None) -> dict[str, Any]:
      """T5X's initial variables, in T5X's layout (`t5x_variables`).

      Token inputs default to int32: T5X's own default is float32 (t5x.eval
      passes no types), which the embedding rejects.
      """
      types = {name: jnp.int32 for name in input_shapes}
      types.update(input_types or {})
      return t5x_variables(
          super().get_initial_variables(rng, input_shapes, types))

    def __init__(
        self, *args,
        aux_loss_factor: float = objective.DEFAULT_AUX_LOSS_FACTOR,
        router_z_loss_factor: float = objective.DEFAULT_ROUTER_Z_LOSS_FACTOR,
        **kwargs):
      # Only the routing weights: T5X's own kwargs weigh the rest of the loss.
      self.routing_loss = objective.LossConfig(
          aux_loss_factor=aux_loss_factor,
          router_z_loss_factor=router_z_loss_factor)
      super().__init__(*args, **kwargs)

    def loss_fn(self, params: Any, batch: Any,
                dropout_rng: Any) -> tuple[Any, Any]:
      logits, state = self._compute_logits(
          params, batch, dropout_rng, mutable=[metric_names.INTERMEDIATES])
      factor, weights = t5x_losses.get_loss_normalizing_factor_and_weights(
          self._loss_normalizing_factor, batch)
      targets = batch["decoder_target_tokens"]
      loss, z_loss, _ = t5x_losses.compute_weighted_cross_entropy(
          logits, targets=targets, weights=weights,
          label_smoothing=self._label_smoothing, z_loss=self._z_loss,
          loss_normalizing_factor=factor)
      moe_loss, moe_metrics = moe_loss_and_metrics(
          state.get(metric_names.INTERMEDIATES, {}),
          self.routing_loss.aux_loss_factor,
          self.routing_loss.router_z_loss_factor)
      # T5X reports cross_ent_loss = loss - z_loss: the base metrics get
      # the task loss, then the loss entries get the total.
      metrics = self._compute_metrics(
          logits=logits, targets=targets, mask=weights, loss=loss,
          z_loss=z_loss, segment_ids=_segment_ids(batch))
      loss = loss + moe_loss
      for name in _TOTAL_LOSS_METRICS:
        metrics[name] = metrics[name].replace(total=loss)
      metrics.update({
          name: t5x_metrics.AveragePerStep.from_model_output(value)
          for name, value in moe_metrics.items()})
      return loss, metrics

  MoeModel.__name__ = MoeModel.__qualname__ = f"Moe{_BASES[kind]}"
  return MoeModel


def moe_encoder_decoder_model(**kwargs):
  """An MoE `EncoderDecoderModel(**kwargs)`; gin/t5x/ binds it as MODEL."""
  return moe_model_class("encoder_decoder")(**kwargs)


def moe_decoder_only_model(**kwargs):
  """An MoE `DecoderOnlyModel(**kwargs)`, for gin like the above."""
  return moe_model_class("decoder_only")(**kwargs)
