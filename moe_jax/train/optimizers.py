"""Optimizers (Adafactor, AdamW), learning-rate schedules, freezing.

Freezing (FLAN-MoE's ablation) zeroes the updates of router or expert
parameters, found by their path in the parameter tree.
"""

from __future__ import annotations

import dataclasses
import enum

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moe_jax import knobs
from moe_jax.param_paths import param_path


class Schedule(str, enum.Enum):
  """RSQRT: linear warmup to learning_rate, then learning_rate *
  sqrt(warmup_steps / step) (T5's inverse square root decay).
  CONSTANT: linear warmup, then constant.
  COSINE: linear warmup, then cosine decay to 0 at total_steps."""
  RSQRT = "rsqrt"
  CONSTANT = "constant"
  COSINE = "cosine"


class Freeze(str, enum.Enum):
  NONE = "none"
  ROUTER = "router"    # train everything but the routers
  EXPERTS = "experts"  # train everything but the expert weights


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Attributes:
    name: "adafactor" (factored second moments, T5X defaults, decay 0.8 as
      the MoE configs use) or "adamw".
    learning_rate: peak learning rate.
    schedule: `Schedule`.
    warmup_steps: linear warmup length (>= 0).
    total_steps: length of the cosine schedule.
    weight_decay: AdamW's decoupled weight decay.
    clip_grad_norm: clip the global gradient norm to this (0: off).
    decay_rate: Adafactor's second-moment decay exponent.
    freeze: `Freeze`.
  """
  name: str = "adafactor"
  learning_rate: float = 1e-2
  schedule: Schedule = Schedule.RSQRT
  warmup_steps: int = 100
  total_steps: int = 1000
  weight_decay: float = 0.0
  clip_grad_norm: float = 1.0
  decay_rate: float = 0.8
  freeze: Freeze = Freeze.NONE

  def __post_init__(self):
    if self.name not in ("adafactor", "adamw"):
      raise ValueError(f"name must be adafactor or adamw; got name="
                       f"{self.name!r}")
    knobs.choice(Schedule, "schedule", self.schedule)
    knobs.choice(Freeze, "freeze", self.freeze)
    for knob in ("learning_rate", "total_steps"):
      if getattr(self, knob) <= 0:
        raise ValueError(f"{knob} must be > 0; got {knob}="
                         f"{getattr(self, knob)}")
    for knob in ("warmup_steps", "weight_decay", "clip_grad_norm"):
      if getattr(self, knob) < 0:
        raise ValueError(f"{knob} must be >= 0; got {knob}="
                         f"{getattr(self, knob)}")


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
  peak = config.learning_rate
  warmup = max(config.warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32) + 1.0  # first update is step 1
    ramp = jnp.minimum(1.0, step / warmup)
    kind = Schedule(config.schedule)
    if kind == Schedule.RSQRT:
      return peak * jnp.minimum(ramp, jnp.sqrt(warmup / step))
    if kind == Schedule.CONSTANT:
      return peak * ramp
    progress = jnp.clip((step - warmup) / max(config.total_steps - warmup, 1),
                        0.0, 1.0)
    return peak * ramp * 0.5 * (1 + jnp.cos(jnp.pi * progress))

  return schedule


def _frozen(path: tuple, freeze: Freeze) -> bool:
  names = param_path(path).split("/")
  if freeze == Freeze.ROUTER:
    return "router" in names
  if freeze == Freeze.EXPERTS:
    return "experts" in names
  return False


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """The optimizer; frozen parameters get zero updates and no state."""
  schedule = make_schedule(config)
  if config.name == "adafactor":
    inner = optax.adafactor(learning_rate=schedule,
                            decay_rate=config.decay_rate,
                            multiply_by_parameter_scale=True,
                            clipping_threshold=1.0)
  else:
    inner = optax.adamw(schedule, weight_decay=config.weight_decay)
  chain = [optax.clip_by_global_norm(config.clip_grad_norm)] if (
      config.clip_grad_norm) else []
  optimizer = optax.chain(*chain, inner)
  freeze = Freeze(config.freeze)
  if freeze == Freeze.NONE:
    return optimizer
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if _frozen(path, freeze) else "trained",
      nn.unbox(params))
  return optax.multi_transform({"trained": optimizer,
                                "frozen": optax.set_to_zero()}, labels)
