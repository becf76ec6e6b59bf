"""Hash layers: routing by token id only; balanced, clustered, dispersed tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe.routers import hash_layers
from moe_jax.moe.routers.hash_layers import HashRouter
from tests.layer_helpers import assert_paths_agree

NUM_EXPERTS = 4
VOCAB = 64


def zipf_corpus(seed=0, size=20000):
  """Token ids with Zipfian frequencies, as in natural text."""
  rng = np.random.default_rng(seed)
  weights = 1.0 / np.arange(1, VOCAB + 1)
  return rng.choice(VOCAB, size, p=weights / weights.sum())


def route(router, x, ids):
  return router.apply({}, x, jnp.ones(ids.shape), num_experts=NUM_EXPERTS,
                      capacity=None, deterministic=False, token_ids=ids)


def test_routing_depends_only_on_token_id():
  router = HashRouter(vocab_size=VOCAB, seed=3)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 16)))
  x1 = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8))
  x2 = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 8))
  a, b = route(router, x1, ids), route(router, x2, ids)
  np.testing.assert_array_equal(a.decision.expert_index,
                                b.decision.expert_index)
  table = router.expert_of(NUM_EXPERTS)
  np.testing.assert_array_equal(a.decision.expert_index[..., 0], table[ids])
  # Same id at different positions / groups -> same expert.
  same = jnp.full((2, 16), 5)
  np.testing.assert_array_equal(route(router, x1, same).decision.expert_index,
                                table[5])


def test_balanced_hash_load_on_sample_corpus():
  train, held_out = zipf_corpus(0), zipf_corpus(1)
  table = np.asarray(hash_layers.balanced_hash_table(
      hash_layers.token_counts_of(train, VOCAB), NUM_EXPERTS))
  for corpus in (train, held_out):
    load = np.bincount(table[corpus], minlength=NUM_EXPERTS)
    assert load.max() / load.mean() <= 1.1, load
  random_load = np.bincount(
      np.asarray(hash_layers.random_hash_table(VOCAB, NUM_EXPERTS))[train],
      minlength=NUM_EXPERTS)
  assert random_load.max() / random_load.mean() > 1.1  # the problem it solves


def blob_embeddings(seed=0, per_blob=8):
  """NUM_EXPERTS well-separated blobs of token embeddings, blob-major ids."""
  rng = np.random.default_rng(seed)
  centers = 10.0 * np.eye(NUM_EXPERTS, 6)
  return np.concatenate([c + 0.1 * rng.normal(size=(per_blob, 6))
                         for c in centers])


def test_clustered_hash_puts_each_blob_on_one_expert():
  table = np.asarray(hash_layers.clustered_hash_table(blob_embeddings(),
                                                      NUM_EXPERTS))
  blobs = table.reshape(NUM_EXPERTS, -1)
  assert all(len(set(b)) == 1 for b in blobs)
  assert len(set(blobs[:, 0])) == NUM_EXPERTS


def test_dispersed_hash_spreads_each_blob_over_all_experts():
  emb = blob_embeddings()
  table = np.asarray(hash_layers.dispersed_hash_table(
      emb, NUM_EXPERTS, num_clusters=NUM_EXPERTS))
  for blob in table.reshape(NUM_EXPERTS, -1):
    np.testing.assert_array_equal(np.bincount(blob, minlength=NUM_EXPERTS), 2)


def test_bad_table_is_refused():
  with pytest.raises(ValueError, match="table"):
    HashRouter(table=(0, NUM_EXPERTS)).validate(NUM_EXPERTS)
  with pytest.raises(ValueError, match="vocab_size"):
    HashRouter().validate(NUM_EXPERTS)


def test_einsum_and_scatter_paths_agree():
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 16, 8))
  ids = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (1, 16)))
  out = assert_paths_agree(HashRouter(vocab_size=VOCAB), x, NUM_EXPERTS,
                           token_ids=ids)
  assert np.any(out == 0) and np.any(out != 0)  # some tokens dropped
