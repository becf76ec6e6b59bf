"""Hash layers (Roller et al. 2021, "Hash Layers For Large Sparse Models").

Dimension names: G groups, S tokens per group, E experts, V vocabulary size,
D embedding width.

Each token goes to one expert chosen by a fixed table `expert_of[token_id]`;
there are no router weights, no balancing loss and the gate is 1. The table
is a constant of the model (not a parameter), built once by one of the
helpers below and passed to `HashRouter.table` (a tuple, so the module stays
hashable and gin can pass it):

* `random_hash_table`: a seeded uniform map (the paper's "Random Hash");
* `balanced_hash_table`: greedy bin packing of token frequencies measured on
  a corpus sample, so every expert gets about the same number of tokens;
* `clustered_hash_table`: k-means over token embeddings, one cluster per
  expert (similar tokens share an expert);
* `dispersed_hash_table`: k-means into many clusters whose members are
  spread over all experts (similar tokens go to different experts).

From gin:
  HashRouter.table = @hash_layers.balanced_hash_table()
  hash_layers.balanced_hash_table.token_counts = @my_counts()
or leave `table` unset for a random hash of `vocab_size` ids with `seed`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.moe import routing

Array = jax.Array


def _check(num_experts: int, vocab_size: int) -> None:
  if num_experts < 1:
    raise ValueError(f"num_experts must be >= 1; got num_experts={num_experts}")
  if vocab_size < 1:
    raise ValueError(f"vocab_size must be >= 1; got vocab_size={vocab_size}")


def random_hash_table(vocab_size: int, num_experts: int,
                      seed: int = 0) -> tuple[int, ...]:
  """<int>[V] expert of each token id, drawn uniformly with `seed`."""
  _check(num_experts, vocab_size)
  rng = np.random.default_rng(seed)
  return tuple(int(e) for e in rng.integers(0, num_experts, vocab_size))


def token_counts_of(corpus_ids: Sequence[int] | np.ndarray,
                    vocab_size: int) -> np.ndarray:
  """<int64>[V] occurrences of each id in a corpus sample (any shape)."""
  ids = np.asarray(corpus_ids).reshape(-1)
  return np.bincount(ids, minlength=vocab_size)[:vocab_size]


def balanced_hash_table(token_counts: Sequence[int] | np.ndarray,
                        num_experts: int) -> tuple[int, ...]:
  """Greedy bin packing: most frequent token first, to the lightest expert.

  Args:
    token_counts: <int>[V] frequency of each token id in a corpus sample
      (see `token_counts_of`).
    num_experts: E.

  Returns:
    <int>[V] expert of each token id. Ties (unseen tokens included) go to
    the expert holding the fewest ids, so unseen ids spread evenly too.
  """
  counts = np.asarray(token_counts, dtype=np.int64)
  _check(num_experts, counts.size)
  load = np.zeros(num_experts, np.int64)
  members = np.zeros(num_experts, np.int64)
  table = np.zeros(counts.size, np.int64)
  for token in np.argsort(-counts, kind="stable"):
    expert = np.lexsort((members, load))[0]
    table[token] = expert
    load[expert] += counts[token]
    members[expert] += 1
  return tuple(int(e) for e in table)


def kmeans(points: np.ndarray, num_clusters: int, seed: int = 0,
           iterations: int = 20) -> np.ndarray:
  """<int>[N] cluster of each of `points` <float>[N, D] (Lloyd's algorithm)."""
  points = np.asarray(points, np.float64)
  if not 1 <= num_clusters <= len(points):
    raise ValueError(f"num_clusters must be in [1, {len(points)}]; got "
                     f"num_clusters={num_clusters}")
  rng = np.random.default_rng(seed)
  centers = points[rng.choice(len(points), num_clusters, replace=False)]
  for _ in range(iterations):
    dist = ((points[:, None, :] - centers[None]) ** 2).sum(-1)  # [N, K]
    assign = dist.argmin(-1)
    for c in range(num_clusters):
      if np.any(assign == c):
        centers[c] = points[assign == c].mean(0)
  return assign


def clustered_hash_table(embeddings: np.ndarray, num_experts: int,
                         seed: int = 0) -> tuple[int, ...]:
  """k-means over <float>[V, D] token embeddings, one cluster per expert."""
  return tuple(int(c) for c in kmeans(embeddings, num_experts, seed))


def dispersed_hash_table(embeddings: np.ndarray, num_experts: int,
                         num_clusters: Optional[int] = None,
                         seed: int = 0) -> tuple[int, ...]:
  """k-means into clusters whose members are dealt round-robin to experts.

  Args:
    embeddings: <float>[V, D] token embeddings.
    num_experts: E.
    num_clusters: default V // E (each cluster about E tokens wide).
    seed: k-means initialization seed.

  Returns:
    <int>[V] expert of each id; members of one cluster land on distinct
    experts where the cluster has <= E members. The round-robin counter runs
    on across clusters, so experts hold V / E ids (+-1).
  """
  embeddings = np.asarray(embeddings)
  num_clusters = num_clusters or max(1, len(embeddings) // num_experts)
  assign = kmeans(embeddings, num_clusters, seed)
  table = np.zeros(len(embeddings), np.int64)
  order = np.argsort(assign, kind="stable")  # ids grouped by cluster
  table[order] = np.arange(len(order)) % num_experts
  return tuple(int(e) for e in table)


class HashRouter(routing.TokenChoiceRouterBase):
  """Top-1 routing by a fixed token-id -> expert table; gate 1, no loss.

  Attributes:
    table: expert of each token id (a tuple of V ints from a helper above),
      or None for `random_hash_table(vocab_size, E, seed)`.
    vocab_size: V of the random table (ignored when `table` is given).
    seed: seed of the random table.
  """
  table: Optional[tuple[int, ...]] = None
  vocab_size: int = 0
  seed: int = 0

  def validate(self, num_experts: int) -> None:
    super().validate(num_experts)
    if self.table is None:
      if self.vocab_size < 1:
        raise ValueError("vocab_size must be >= 1 when no table is given; got "
                         f"vocab_size={self.vocab_size}")
    elif not all(0 <= e < num_experts for e in self.table):
      raise ValueError(
          f"table entries must be in [0, num_experts={num_experts})")

  def expert_of(self, num_experts: int) -> np.ndarray:
    """<int32>[V] the table in use."""
    table = self.table
    if table is None:
      table = random_hash_table(self.vocab_size, num_experts, self.seed)
    return np.asarray(table, np.int32)

  def select(self, x: Array, token_mask: Array, *, num_experts: int,
             deterministic: bool, token_ids: Optional[Array]
             ) -> routing.Selection:
    del x, deterministic
    if token_ids is None:
      raise ValueError("HashRouter needs token_ids; pass them to MoeLayer")
    table = jnp.asarray(self.expert_of(num_experts))
    expert_index = table[token_ids][..., None]  # [G, S, 1]
    probs = jax.nn.one_hot(expert_index[..., 0], num_experts,
                           dtype=jnp.float32)
    return routing.Selection(expert_index,
                             jnp.ones(expert_index.shape, jnp.float32),
                             token_mask[..., None] > 0, probs)
