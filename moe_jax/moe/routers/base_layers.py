"""BASE layers (Lewis et al. 2021, "BASE Layers: Simplifying Training of
Large, Sparse Models").

Dimension names: G groups, S tokens per group, D model width, E experts.

In training, tokens are assigned to experts by a balanced linear assignment:
every expert takes exactly S / E tokens of the group and the assignment
maximizes the total token-expert score (the router logit). It is solved in
JAX by the auction algorithm (Bertsekas 1988) with epsilon scaling, on the
[S, S] problem whose columns are the E experts each repeated S / E times.
At inference each token takes its top-1 expert. Either way the expert output
is weighted by sigmoid(score of the chosen expert); there is no balancing
loss (balance is enforced, not encouraged).

Optimality: the auction ends with every token within eps of its best slot at
the final prices, so the total score is within S * eps_final of the optimum;
with integer scores and eps_final < 1 / S it is exactly optimal.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.moe import routing

Array = jax.Array


def _auction_phase(scores: Array, prices: Array, eps: Array
                   ) -> tuple[Array, Array]:
  """One Jacobi auction at fixed eps: every unassigned row bids at once."""
  n = scores.shape[0]
  def unfinished(state):
    owner_of_row, _, _ = state
    return jnp.any(owner_of_row < 0)

  def bid_round(state):
    slot_of_row, row_of_slot, prices = state
    values = scores - prices[None, :]
    top, best = jax.lax.top_k(values, 2)  # [N, 2]
    bid = prices[best[:, 0]] + top[:, 0] - top[:, 1] + eps
    bidding = slot_of_row < 0
    bids = jnp.where(bidding[:, None] &
                     (best[:, :1] == jnp.arange(n)[None, :]), bid[:, None],
                     -jnp.inf)  # [rows, slots]
    winning_bid = jnp.max(bids, axis=0)
    winner = jnp.argmax(bids, axis=0)
    won = winning_bid > -jnp.inf  # [slots]
    # Previous owners of won slots lose them.
    slot_of_row = jnp.where(
        (slot_of_row >= 0) & won[jnp.maximum(slot_of_row, 0)], -1,
        slot_of_row)
    slot_of_row = slot_of_row.at[jnp.where(won, winner, n)].set(
        jnp.arange(n), mode="drop")
    row_of_slot = jnp.where(won, winner, row_of_slot)
    prices = jnp.where(won, winning_bid, prices)
    return slot_of_row, row_of_slot, prices

  empty = -jnp.ones(n, jnp.int32)
  slot_of_row, _, prices = jax.lax.while_loop(
      unfinished, bid_round, (empty, empty, prices))
  return slot_of_row, prices


def auction_assignment(scores: Array, eps_final: float = 1e-3,
                       num_phases: int = 6, scale_factor: float = 5.0
                       ) -> Array:
  """Maximum-score perfect matching of rows to columns of `scores` [N, N].

  Epsilon scaling: phase i runs the auction with
  eps_i = max(eps_final, range(scores) / scale_factor ** (i + 1)), keeping
  the prices of the previous phase, so late phases start near equilibrium.

  Returns:
    <int32>[N] column of each row; sum of scores[i, col[i]] is within
    N * eps_final of the optimum.
  """
  if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
    raise ValueError(f"scores must be square [N, N]; got {scores.shape}")
  if scores.shape[0] == 1:
    return jnp.zeros((1,), jnp.int32)
  scores = scores.astype(jnp.float32)
  spread = jnp.max(scores) - jnp.min(scores)

  def phase(i, carry):
    _, prices = carry
    eps = jnp.maximum(eps_final, spread / scale_factor ** (i + 1.0))
    return _auction_phase(scores, prices, eps)

  n = scores.shape[0]
  init = (jnp.zeros(n, jnp.int32), jnp.zeros(n, jnp.float32))
  _, prices = jax.lax.fori_loop(0, num_phases, phase, init)
  # A last phase at exactly eps_final gives the stated bound.
  slot_of_row, _ = _auction_phase(scores, prices, jnp.float32(eps_final))
  return slot_of_row


def balanced_assignment(logits: Array) -> Array:
  """<int32>[G, S] expert of each token, exactly S / E tokens per expert.

  Args:
    logits: <float32>[G, S, E] token-expert scores; S divisible by E.
  """
  _, tokens, experts = logits.shape
  per_expert = tokens // experts
  slots = jnp.repeat(logits, per_expert, axis=-1)  # [G, S, S], slot -> e
  slot = jax.vmap(auction_assignment)(jax.lax.stop_gradient(slots))
  return slot // per_expert


class BaseLayerRouter(routing.TokenChoiceRouterBase):
  """Balanced assignment in training, greedy top-1 at eval; sigmoid gates.

  A token's training assignment depends on the whole group (later tokens
  included), so in a causal decoder it needs the layer's leak opt-in.
  """

  @property
  def sees_whole_group(self) -> bool:
    return True

  def select(self, x: Array, token_mask: Array, *, num_experts: int,
             deterministic: bool, token_ids: Optional[Array]
             ) -> routing.Selection:
    del token_ids
    logits = routing.RouterWeights(num_experts, name="router_weights")(x)
    tokens = logits.shape[1]
    if deterministic:
      expert = jnp.argmax(logits, axis=-1)
    else:
      if tokens % num_experts:
        raise ValueError(
            f"BASE layers need the group size ({tokens}) divisible by "
            f"num_experts={num_experts}")
      expert = balanced_assignment(logits)
    expert_index = expert[..., None]  # [G, S, 1]
    score = jnp.take_along_axis(logits, expert_index, axis=-1)
    return routing.Selection(expert_index, jax.nn.sigmoid(score),
                             token_mask[..., None] > 0,
                             jax.nn.softmax(logits, -1))
