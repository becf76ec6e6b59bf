"""The training loss: cross entropy plus the weighted routing losses.

Dimension names (moe_jax's glossary): B batch, Lt target length, V
vocabulary, R sparse layers, E experts.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import gin
import jax
import jax.numpy as jnp

from moe_jax.moe import metric_names
from moe_jax.models.outputs import ModelOutput

Array = jax.Array

# The routing-loss weights' defaults, stated only here: LossConfig's, T5X's
# MoE model's, and gin's macros (`AUX_LOSS_FACTOR = %DEFAULT_AUX_LOSS_FACTOR`
# in gin/models/arch/moe_layers.gin and gin/t5x/moe_model.gin).
# Switch Transformer's alpha; the z-loss weight is flaxformer's MoE default
# (ST-MoE's own 1e-3 is set by gin/routing/st_moe.gin).
DEFAULT_AUX_LOSS_FACTOR = 0.01
DEFAULT_ROUTER_Z_LOSS_FACTOR = 1e-4
gin.constant("objective.DEFAULT_AUX_LOSS_FACTOR", DEFAULT_AUX_LOSS_FACTOR)
gin.constant("objective.DEFAULT_ROUTER_Z_LOSS_FACTOR",
             DEFAULT_ROUTER_Z_LOSS_FACTOR)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss weights (gin: `AUX_LOSS_FACTOR`, `ROUTER_Z_LOSS_FACTOR`).

  Attributes:
    aux_loss_factor: weight of the mean (over sparse layers) balancing loss.
    router_z_loss_factor: weight of the mean router z-loss.
    label_smoothing: mass spread uniformly over the vocabulary.
    logits_z_loss: weight of log(Z)^2 of the output softmax (PaLM / T5X).
  """
  aux_loss_factor: float = DEFAULT_AUX_LOSS_FACTOR
  router_z_loss_factor: float = DEFAULT_ROUTER_Z_LOSS_FACTOR
  label_smoothing: float = 0.0
  logits_z_loss: float = 0.0

  def __post_init__(self):
    for knob in ("aux_loss_factor", "router_z_loss_factor", "logits_z_loss"):
      if getattr(self, knob) < 0:
        raise ValueError(f"{knob} must be >= 0; got {knob}="
                         f"{getattr(self, knob)}")
    if not 0 <= self.label_smoothing < 1:
      raise ValueError("label_smoothing must be in [0, 1); got "
                       f"label_smoothing={self.label_smoothing}")


def cross_entropy(logits: Array, targets: Array, weights: Array,
                  label_smoothing: float = 0.0,
                  logits_z_loss: float = 0.0) -> tuple[Array, Array]:
  """Mean over weighted target tokens of the (smoothed) cross entropy.

  Args:
    logits: <float32>[B, Lt, V].
    targets: <int32>[B, Lt].
    weights: <float32>[B, Lt] (0 on padding); the loss is normalized by their
      sum, i.e. by the number of target tokens.

  Returns:
    (cross entropy, logits z-loss term), both already weighted and averaged.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  on_target = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  if label_smoothing:
    # Soft targets: 1 - s on the target, s / (V - 1) on every other token;
    # minus their entropy, so predicting the soft targets scores 0.
    high, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    off_target = jnp.sum(log_probs, axis=-1) - on_target
    loss = -(high * on_target + low * off_target)
    loss -= -(high * jnp.log(high) + (vocab - 1) * low * jnp.log(low))
  else:
    loss = -on_target
  total = jnp.maximum(jnp.sum(weights), 1.0)
  z_term = logits_z_loss * jnp.sum(jnp.square(log_z) * weights) / total
  return jnp.sum(loss * weights) / total, z_term


def training_loss(output: ModelOutput, batch: Mapping[str, Array],
                  config: LossConfig) -> tuple[Array, dict[str, Array]]:
  """Total loss and its parts.

  loss = cross entropy + logits z-loss
         + aux_loss_factor * mean auxiliary loss
         + router_z_loss_factor * mean router z-loss

  Returns:
    (loss, metrics): metrics hold `cross_entropy` (without routing terms),
    the weighted and raw routing terms, the routing metrics averaged over
    sparse layers, and per layer (`<name>/per_layer`, <[R]>); the
    per-expert load only per layer (`expert_load/per_layer`, <[R, E]>).
  """
  weights = batch.get("decoder_loss_weights",
                      (batch["decoder_target_tokens"] > 0).astype(jnp.float32))
  ce, z_term = cross_entropy(output.logits, batch["decoder_target_tokens"],
                             weights.astype(jnp.float32),
                             config.label_smoothing, config.logits_z_loss)
  metrics = {"cross_entropy": ce, "logits_z_loss": z_term}
  loss = ce + z_term
  stats = output.moe_stats
  if stats is not None:
    aux = config.aux_loss_factor * jnp.mean(stats.auxiliary_loss)
    router_z = config.router_z_loss_factor * jnp.mean(stats.router_z_loss)
    loss = loss + aux + router_z
    metrics["weighted_auxiliary_loss"] = aux
    metrics["weighted_router_z_loss"] = router_z
    for name in (metric_names.SCALAR_METRICS +
                 metric_names.EXTRA_SCALAR_METRICS):
      values = getattr(stats, name)
      metrics[name] = jnp.mean(values)
      metrics[f"{name}/per_layer"] = values
    metrics[f"{metric_names.EXPERT_LOAD}/per_layer"] = stats.expert_load
  metrics["loss"] = loss
  return loss, metrics
