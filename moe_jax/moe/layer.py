"""MoeLayer: router + dispatch + experts + combine, a drop-in transformer FFN.

Dimension names: B batch, L length, D model width, G groups, S tokens per
group, E experts, K choices per token, C expert capacity.

Data flow for x <[B, L, D]>:
  1. group the B * L tokens into <[G, S, D]> (S <= max_group_size);
  2. route (float32): a `TokenChoice` or `ExpertChoice` decision + losses;
  3. dispatch to experts along the configured path (einsum, scatter,
     dropless); tokens over capacity are dropped: their MoE output is 0 and
     the model's residual connection carries them through;
  4. experts: one batched matmul over the leading expert axis (capacity
     paths) or the configured grouped matmul over sorted rows (dropless);
  5. combine with the gates back to <[B, L, D]>;
  6. with num_shared_experts > 0, add the shared experts: a dense FFN every
     real token passes through, whatever the router decided.

The layer returns `(y, MoeStats)` and also sows every `MoeStats` field into
the `intermediates` collection under the names in `moe_jax.moe.metric_names`
(the names T5X's MoE models read). When the caller makes the `routing`
collection mutable, it also sows the per-token routing (`moe_jax.moe.capture`).
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from moe_jax import axes, knobs
from moe_jax.moe import capture, expert_parallel, grouped_matmul, metric_names
from moe_jax.moe.dispatch import (PATHS, Dispatch, check_capacity_factor,
                                  expert_capacity, group_shape, group_tokens)
from moe_jax.moe.experts import (Activation, DenseFFN, ExpertDropout,
                                 Experts, expert_fns)
from moe_jax.moe.grouped_matmul import GroupedMatmul
from moe_jax.moe.routing import Router, TokenChoice

Array = jax.Array


@struct.dataclass
class MoeStats:
  """Per-layer routing losses and metrics (all float32).

  Attributes:
    auxiliary_loss: scalar balancing loss of the router (unweighted).
    router_z_loss: scalar router z-loss (unweighted).
    fraction_tokens_left_behind: real tokens processed by no expert / real
      tokens. These tokens pass through the residual only.
    router_confidence: summed combine weights / dispatched (token, expert)
      pairs: the mean combine weight of a dispatched pair (flaxformer's
      definition, the name T5X's MoE models report).
    expert_usage: dispatched (token, expert) pairs / total expert capacity
      (G * E * C), FLAN-MoE's definition; on the dropless path C is the
      capacity the capacity factor would give.
    expert_load: <float32>[E] dispatched tokens per expert.
    router_entropy: mean over real tokens of the entropy (nats) of their
      router probabilities over the E experts: log E for a uniform router,
      0 for one that is certain.
  """
  auxiliary_loss: Array
  router_z_loss: Array
  fraction_tokens_left_behind: Array
  router_confidence: Array
  expert_usage: Array
  expert_load: Array
  router_entropy: Array


class MoeLayer(nn.Module):
  """Sparse mixture-of-experts feed-forward layer.

  Its fields are the MoE knobs of the whole project: a model holds an unbound
  MoeLayer per stack (`moe_jax.models.config.MoeConfig.layer`, bound in gin
  as `layer.MoeLayer.*`) and builds each sparse layer as a copy of it
  (`TransformerConfig.moe_layer`). A new knob is a field here plus its check
  in `_validate`.

  Attributes:
    router: a `moe_jax.moe.routing.Router` (token choice, expert choice, ...).
    num_experts: E.
    expert_hidden_dim: F, hidden width of each expert; None: the model's
      `mlp_dim` / `expert_segments` (filled in by the model; a layer used on
      its own must set it).
    expert_segments: m of fine-grained experts (DeepSeekMoE, Dai et al.
      2024): with expert_hidden_dim None, each expert is 1/m of the model's
      FFN, so E = m * E' experts with K = m * K' choices do the expert work
      of E' full-width experts with K' choices (`gin/routing/
      fine_grained.gin`). The model's mlp_dim must be divisible by m.
    num_shared_experts: always-on experts beside the routed ones (DeepSeekMoE
      shared experts): every real token also passes through them, with gate
      1 and no capacity. Held as one dense FFN of hidden width
      num_shared_experts * shared_expert_hidden_dim (the same function as
      that many FFNs summed), params `shared_experts/`. 0: none.
    shared_expert_hidden_dim: hidden width of each shared expert; None: F.
    dispatch: `Dispatch` path; all paths compute the same function. Default
      `scatter`: no [S, E, C] masks on any backend. `einsum` suits TPUs,
      `dropless` never drops a token (token choice only; see
      dropless_receive_factor).
    grouped_matmul: `GroupedMatmul` of the dropless path (default `auto`:
      chosen per backend; see `moe_jax.moe.grouped_matmul`).
    train_capacity_factor: capacity factor when deterministic=False, in
      T5X's convention: C = capacity_factor * S / E slots per expert, for
      any k (`moe_jax.moe.dispatch.expert_capacity`; docs/presets.md).
    eval_capacity_factor: capacity factor when deterministic=True.
    min_expert_capacity: lower bound on C, >= 1.
    max_group_size: at most this many tokens route together (S). With
      expert_parallel the number of groups G is rounded up to a multiple of
      the mesh's data * expert devices (and S shrinks to match).
    pad_to_group_size: pad the last group when S does not divide B * L;
      otherwise that is an error.
    activation: expert `Activation`; None: the model's FFN activation (filled
      in by the model), gated_gelu for a layer used on its own.
    expert_dropout_rate: dropout inside the experts.
    causal: the layer sits in a causal (autoregressive) stack; a model sets
      it for its decoder.
    allow_expert_choice_in_causal: permit routers that see the whole group
      (expert choice) in a causal stack despite the future-token leak.
    expert_parallel: run dispatch and experts inside `jax.shard_map` over
      the traced mesh (`moe_jax.moe.expert_parallel`: all-to-all of expert
      buffers over "expert", F split over "model"). Default False: one
      program that XLA's SPMD partitioner shards from the param shardings.
      Same function either way (expert dropout: the same distribution,
      one key per device). Dropless: a ragged all-to-all of the sorted
      rows.
    dropless_receive_factor: with expert_parallel and dispatch='dropless',
      the size of each device's buffer for the rows sent to its experts.
      Default None: room for every row, expert * M for M = its own tokens *
      K; nothing is dropped. A factor f gives ceil(f * M) rows (memory
      O(f * M); balanced routing fills 1 / f of it): the rows beyond it
      under imbalance are dropped like choices over capacity (output 0,
      the residual carries the token) and counted in `MoeStats`
      (fraction_tokens_left_behind, expert_load).
    dtype: activation dtype of the experts (router math is float32); a
      model sets its own activation dtype.
    param_dtype: dtype of the stored expert weights.
  """
  router: Router
  num_experts: int = 8
  expert_hidden_dim: Optional[int] = None
  expert_segments: int = 1
  num_shared_experts: int = 0
  shared_expert_hidden_dim: Optional[int] = None
  dispatch: Dispatch = Dispatch.SCATTER
  grouped_matmul: GroupedMatmul = GroupedMatmul.AUTO
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_expert_capacity: int = 4
  max_group_size: int = 4096
  pad_to_group_size: bool = False
  activation: Optional[Activation] = None
  expert_dropout_rate: float = 0.0
  causal: bool = False
  allow_expert_choice_in_causal: bool = False
  expert_parallel: bool = False
  dropless_receive_factor: Optional[float] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    self._validate()
    super().__post_init__()

  def _validate(self) -> None:
    """Checks every knob at construction, before any tracing."""
    if self.num_experts < 1:
      raise ValueError(f"num_experts must be >= 1; got num_experts="
                       f"{self.num_experts}")
    if self.expert_hidden_dim is not None and self.expert_hidden_dim < 1:
      raise ValueError("expert_hidden_dim must be >= 1 (or None: the "
                       "model's mlp_dim); got "
                       f"expert_hidden_dim={self.expert_hidden_dim}")
    for knob, least in (("expert_segments", 1), ("num_shared_experts", 0),
                        ("shared_expert_hidden_dim", 1)):
      value = getattr(self, knob)
      if value is not None and value < least:
        raise ValueError(f"{knob} must be >= {least}; got {knob}={value}")
    dispatch = knobs.choice(Dispatch, "dispatch", self.dispatch)
    knobs.choice(GroupedMatmul, "grouped_matmul", self.grouped_matmul)
    if self.activation is not None:
      knobs.choice(Activation, "activation", self.activation)
    if not isinstance(self.router, Router):
      raise ValueError(f"router must be a moe_jax.moe.routing.Router; got "
                       f"router={self.router!r}")
    self.router.validate(self.num_experts)
    # The dropless path drops nothing but reports expert_usage against the
    # capacity these knobs give, so they are checked on every path.
    for knob in ("train_capacity_factor", "eval_capacity_factor"):
      check_capacity_factor(knob, getattr(self, knob))
    if self.dropless_receive_factor is not None:
      check_capacity_factor("dropless_receive_factor",
                            self.dropless_receive_factor)
    if dispatch == Dispatch.DROPLESS and not self.router.supports_dropless:
      raise ValueError(f"dispatch='dropless' needs token choice routing; "
                       f"router={type(self.router).__name__} needs capacity")
    if self.min_expert_capacity < 1:
      raise ValueError("min_expert_capacity must be >= 1 (capacity 0 would "
                       "drop every token); got "
                       f"min_expert_capacity={self.min_expert_capacity}")
    if self.max_group_size < 1:
      raise ValueError(
          f"max_group_size must be >= 1; got max_group_size={self.max_group_size}")
    if not 0 <= self.expert_dropout_rate < 1:
      raise ValueError("expert_dropout_rate must be in [0, 1); got "
                       f"expert_dropout_rate={self.expert_dropout_rate}")
    if (self.causal and self.router.sees_whole_group and
        not self.allow_expert_choice_in_causal):
      raise ValueError(
          f"router={type(self.router).__name__} chooses tokens by looking at "
          "the whole group, which leaks future tokens in a causal stack "
          "(causal=True); use token choice, or set "
          "allow_expert_choice_in_causal=True to accept the leak")
    for knob in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, knob))
      except TypeError:
        raise ValueError(f"{knob} must name a jax dtype; got {knob}="
                         f"{getattr(self, knob)!r}") from None

  @property
  def expert_activation(self) -> Activation:
    """The experts' activation: `activation`, or gated_gelu (T5 v1.1) for a
    layer used on its own with activation None."""
    return Activation(self.activation or Activation.GATED_GELU)

  def setup(self):
    if self.expert_hidden_dim is None:
      raise ValueError(
          "expert_hidden_dim=None means the model's mlp_dim; a MoeLayer used "
          "outside a TransformerConfig must set expert_hidden_dim")
    self.experts = Experts(
        num_experts=self.num_experts,
        hidden_dim=self.expert_hidden_dim,
        activation=self.expert_activation,
        dtype=self.dtype,
        param_dtype=self.param_dtype)
    if self.num_shared_experts:
      self.shared_experts = DenseFFN(
          hidden_dim=self.num_shared_experts * (
              self.shared_expert_hidden_dim or self.expert_hidden_dim),
          activation=self.expert_activation,
          dropout_rate=self.expert_dropout_rate, dtype=self.dtype)

  def capacity(self, group_size: int, deterministic: bool) -> int:
    """C for groups of `group_size` tokens (see `dispatch.expert_capacity`)."""
    factor = (self.eval_capacity_factor if deterministic else
              self.train_capacity_factor)
    return expert_capacity(group_size, self.num_experts, factor,
                           self.min_expert_capacity)

  def __call__(self, x: Array, token_mask: Optional[Array] = None, *,
               deterministic: bool = False,
               token_ids: Optional[Array] = None) -> tuple[Array, MoeStats]:
    """Applies the layer.

    Args:
      x: <[B, L, D]> token representations.
      token_mask: <[B, L]> 1 (or True) for real tokens, 0 for padding;
        None means every token is real. Padding tokens are never routed.
      deterministic: evaluation mode: eval capacity factor, no jitter, no
        dropout, no random second expert.
      token_ids: <int32>[B, L] vocabulary ids, for routers that use them.

    Returns:
      y <[B, L, D]> (zero for tokens no expert processed) and `MoeStats`.
    """
    if x.ndim != 3:
      raise ValueError("MoeLayer expects inputs [batch, length, embed]; got "
                       f"x of rank {x.ndim} with shape {x.shape}")
    batch, length, width = x.shape
    if token_mask is None:
      token_mask = jnp.ones((batch, length), jnp.float32)
    elif token_mask.shape != (batch, length):
      raise ValueError(f"token_mask must have shape {(batch, length)}; got "
                       f"{token_mask.shape}")
    # Every real token passes through the shared experts; padding gets 0,
    # as from the routed ones.
    shared = (self.shared_experts(x, deterministic=deterministic) *
              token_mask[..., None].astype(self.dtype)
              if self.num_shared_experts else 0.0)
    num_groups, group_size = group_shape(
        batch * length, self.max_group_size, self.pad_to_group_size,
        group_multiple=(expert_parallel.group_shards() if self.expert_parallel
                        else 1))
    group = functools.partial(group_tokens, num_groups=num_groups,
                              group_size=group_size)
    tokens = nn.with_logical_constraint(group(x.reshape(-1, width)),
                                        axes.GROUPED_TOKENS)
    token_mask = group(token_mask.reshape(-1).astype(jnp.float32))
    if token_ids is not None:
      token_ids = group(token_ids.reshape(-1))

    dispatch = Dispatch(self.dispatch)
    capacity = self.capacity(group_size, deterministic)
    with jax.named_scope("route"):
      routed = self.router(
          tokens, token_mask, num_experts=self.num_experts,
          capacity=None if dispatch == Dispatch.DROPLESS else capacity,
          deterministic=deterministic, token_ids=token_ids)

    run = PATHS[dispatch]
    if self.expert_parallel:
      # Checked before the experts create their weights, whose sharding
      # would fail with a less clear error.
      mesh = expert_parallel.check_mesh(self.num_experts, num_groups,
                                        self.expert_hidden_dim)
      if (dispatch == Dispatch.DROPLESS and
          self.dropless_receive_factor is not None):
        # Before the stats: overflow rows count as dropped choices.
        routed = routed.replace(decision=expert_parallel.drop_overflow(
            routed.decision, mesh, self.num_experts,
            self.dropless_receive_factor))
      run = expert_parallel.wrap(run, mesh, self.dropless_receive_factor)
    dropout = ExpertDropout(
        None if deterministic or not self.expert_dropout_rate else
        self.make_rng("dropout"), self.expert_dropout_rate)
    experts = expert_fns(self.experts(width), self.expert_activation,
                         grouped_matmul.resolve(self.grouped_matmul), dropout)
    out = run(tokens, routed.decision, self.num_experts, experts, capacity)
    out = out.reshape(-1, width)[:batch * length].reshape(batch, length, width)
    out = out + shared

    stats = self._stats(routed, token_mask, capacity, group_size)
    for name in metric_names.ALL:
      self.sow(metric_names.INTERMEDIATES, name, getattr(stats, name))
    # init makes every collection mutable; only an explicit request captures.
    if (self.is_mutable_collection(metric_names.ROUTING) and
        not self.is_initializing()):
      self._sow_routing(routed, token_mask, group_size)
    return out.astype(self.dtype), stats

  def _sow_routing(self, routed, token_mask: Array, group_size: int) -> None:
    """Per-token routing for inspection (see `moe_jax.moe.capture`)."""
    mask, weights = capture.token_expert_assignment(
        routed.decision, self.num_experts, group_size)
    for name, value in ((metric_names.ROUTER_PROBS, routed.router_probs),
                        (metric_names.DISPATCH_MASK, mask),
                        (metric_names.COMBINE_WEIGHTS, weights),
                        (metric_names.TOKEN_MASK, token_mask)):
      self.sow(metric_names.ROUTING, name, value)

  def _stats(self, routed, token_mask: Array, capacity: int,
             group_size: int) -> MoeStats:
    decision = routed.decision
    if isinstance(decision, TokenChoice):
      per_token = decision.tokens_dispatched()
      gate_sum = decision.total_gate()
    else:
      per_token = decision.tokens_dispatched(group_size)
      gate_sum = decision.total_gate(group_size)
    real = jnp.maximum(jnp.sum(token_mask), 1.0)
    left_behind = jnp.sum((per_token == 0) * token_mask) / real
    entropy = jnp.sum(jax.scipy.special.entr(routed.router_probs), axis=-1)
    load = decision.expert_load(self.num_experts)
    confidence = (jnp.sum(gate_sum * token_mask) /
                  jnp.maximum(jnp.sum(load), 1.0))
    total_capacity = token_mask.shape[0] * self.num_experts * capacity
    return MoeStats(
        auxiliary_loss=routed.auxiliary_loss,
        router_z_loss=routed.router_z_loss,
        fraction_tokens_left_behind=left_behind,
        router_confidence=confidence,
        expert_usage=jnp.sum(load) / total_capacity,
        expert_load=load,
        router_entropy=jnp.sum(entropy * token_mask) / real)
