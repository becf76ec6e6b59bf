"""Every GroupedMatmul equals jax.lax.ragged_dot, alone and in the layer."""

import functools
import importlib
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import grouped_matmul
from moe_jax.moe.grouped_matmul import GroupedMatmul, resolve
from moe_jax.moe.kernels import blocked
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter
from tests.layer_helpers import inputs

CHOICES = [choice.value for choice in GroupedMatmul]


def ragged_sizes(rng, num_groups, total):
  """Random group sizes summing to `total`, with empty groups."""
  cuts = np.sort(rng.integers(0, total + 1, num_groups - 1))
  sizes = np.diff(np.concatenate([[0], cuts, [total]]))
  sizes[rng.integers(0, num_groups)] = 0  # at least one empty group
  return jnp.asarray(sizes, jnp.int32)


ROWS, GROUPS = 13, 5
# Group sizes over the first 11 of 13 rows (rows 11 and 12 fall past the
# groups and must come out 0), besides random ones with an empty group.
SIZES = {
    "one_expert_takes_all": [0, 0, 11, 0, 0],
    "all_empty": [0, 0, 0, 0, 0],
    "single_rows": [1, 1, 1, 1, 7],
    "every_row_used": [4, 0, 5, 0, 4],
}


def sizes_case(case):
  if case.startswith("seed"):
    return ragged_sizes(np.random.default_rng(int(case[4:])), GROUPS,
                        ROWS - 2)
  return jnp.asarray(SIZES[case], jnp.int32)


# Jitted: every case has the same shapes, so each choice compiles once (the
# Pallas interpreter is slow to compile).
@functools.partial(jax.jit, static_argnames="matmul")
def value_and_grads(lhs, rhs, sizes, cotangent, *, matmul):
  loss = lambda a, b: jnp.sum(matmul(a, b, sizes) * cotangent)
  return matmul(lhs, rhs, sizes), jax.grad(loss, argnums=(0, 1))(lhs, rhs)


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("case", ["seed0", "seed1", "seed2", *SIZES])
def test_equals_ragged_dot_forward_and_gradients(choice, case):
  rng = np.random.default_rng(len(case))
  width, out_width = 6, 4
  lhs = jnp.asarray(rng.normal(size=(ROWS, width)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(GROUPS, width, out_width)), jnp.float32)
  sizes = sizes_case(case)
  used = int(jnp.sum(sizes))
  cotangent = jnp.asarray(rng.normal(size=(ROWS, out_width)), jnp.float32)

  out, grads = value_and_grads(lhs, rhs, sizes, cotangent,
                               matmul=resolve(choice))
  want_out, want_grads = value_and_grads(lhs, rhs, sizes, cotangent,
                                         matmul=jax.lax.ragged_dot)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[used:], 0.0)
  np.testing.assert_array_equal(grads[0][used:], 0.0)
  for grad, want in zip(grads, want_grads):
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heights", [(1,), (3,), (4,), (ROWS,), (8, 2),
                                     (4, 3, 1), (ROWS, 5, 5, 2)])
@pytest.mark.parametrize("case", ["seed0", "seed3", *SIZES])
def test_blocked_equals_ragged_dot_for_any_chunk_heights(heights, case):
  # Chunks that end inside the next group, a group cut into chunks of
  # several heights, and (heights 3, 4) a last chunk moved back to end at
  # row M must come out the same as ragged_dot.
  rng = np.random.default_rng(7)
  lhs = jnp.asarray(rng.normal(size=(ROWS, 6)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(GROUPS, 6, 4)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(ROWS, 4)), jnp.float32)
  sizes = sizes_case(case)
  matmul = functools.partial(blocked.grouped_matmul, heights=heights)
  got = value_and_grads(lhs, rhs, sizes, cotangent, matmul=matmul)
  want = value_and_grads(lhs, rhs, sizes, cotangent,
                         matmul=jax.lax.ragged_dot)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=1e-5), got, want)


@pytest.mark.parametrize("heights", [(0,), (ROWS + 1,), (), (2, 4)])
def test_blocked_rejects_chunk_heights_outside_the_rows_or_unsorted(heights):
  with pytest.raises(ValueError, match="heights="):
    blocked.grouped_matmul(jnp.ones((ROWS, 2)), jnp.ones((GROUPS, 2, 3)),
                           jnp.zeros((GROUPS,), jnp.int32), heights=heights)


def test_blocked_with_no_rows():
  rhs = jnp.ones((GROUPS, 2, 3))
  sizes = jnp.zeros((GROUPS,), jnp.int32)
  matmul = lambda w: blocked.grouped_matmul(jnp.ones((0, 2)), w, sizes)
  assert matmul(rhs).shape == (0, 3)
  np.testing.assert_array_equal(
      jax.grad(lambda w: jnp.sum(matmul(w)))(rhs), 0.0)


@functools.cache  # the ragged_dot reference runs once
def _dropless_layer_value_and_grads(choice):
  x = inputs(length=16)
  mask = jnp.ones((2, 16)).at[1, 11:].set(0)
  # D = F = 8 and relu (two products): few kernels for the Pallas
  # interpreter to compile.
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8, dispatch="dropless",
                   router=TokenChoiceRouter(num_selected_experts=2),
                   activation="relu", grouped_matmul=choice,
                   max_group_size=8)
  params = layer.init(jax.random.PRNGKey(1), x, deterministic=True)

  def loss(params, x):
    y, stats = layer.apply(params, x, mask, deterministic=True)
    return jnp.sum(jnp.sin(y)) + stats.auxiliary_loss, y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      params, x)


@pytest.mark.parametrize("choice", [c for c in CHOICES
                                    if c not in ("auto", "ragged_dot")])
def test_dropless_layer_is_the_same_for_every_choice(choice):
  (loss, y), grads = _dropless_layer_value_and_grads(choice)
  (want_loss, want_y), want_grads = _dropless_layer_value_and_grads(
      GroupedMatmul.RAGGED_DOT.value)
  np.testing.assert_allclose(y, want_y, atol=1e-5)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               nn.unbox(grads), nn.unbox(want_grads))


def test_bad_choice_names_the_knob():
  with pytest.raises(ValueError, match="grouped_matmul='gmm'") as error:
    MoeLayer(num_experts=4, expert_hidden_dim=8, router=TokenChoiceRouter(),
             grouped_matmul="gmm")
  for choice in CHOICES:
    assert repr(choice) in str(error.value)


@pytest.mark.parametrize("backend,want", [
    ("cpu", "blocked"), ("gpu", "tokamax"), ("tpu", "megablox"),
    ("other", "ragged_dot")])
def test_auto_picks_by_backend(monkeypatch, backend, want):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert grouped_matmul.concrete("auto") == GroupedMatmul(want)
  assert grouped_matmul.concrete("dense") == GroupedMatmul.DENSE


def test_tokamax_without_the_extra_falls_back_to_ragged_dot(caplog):
  kernel = importlib.import_module("moe_jax.moe.kernels.tokamax")
  if kernel.tokamax is not None:
    pytest.skip("tokamax is installed")
  kernel._warn_fallback.cache_clear()
  with caplog.at_level(logging.WARNING):
    kernel.grouped_matmul(jnp.ones((3, 2)), jnp.ones((2, 2, 4)),
                          jnp.asarray([1, 2], jnp.int32))
  assert "moe_jax[tokamax]" in caplog.text


def test_tokamax_kernel_is_the_one_called():
  tokamax = pytest.importorskip("tokamax")
  kernel = importlib.import_module("moe_jax.moe.kernels.tokamax")
  assert kernel.tokamax is tokamax


@pytest.mark.parametrize("num_rows,num_groups,want", [
    (2048, 64, (32, 16, 8)),            # mean 32
    (4096, 64, (64, 32, 16, 8)),        # mean 64
    (2048, 8, (128, 64, 32, 16, 8)),    # mean 256: the largest is capped
    (100, 64, (16, 8)),                 # mean 1: the largest is raised
    (13, 5, (8,)),                      # no chunk above M
    (5, 2, (5,)),                       # M below every height
])
def test_blocked_chunk_heights_halve_from_the_mean_group(num_rows, num_groups,
                                                         want):
  assert blocked.chunk_heights(num_rows, num_groups) == want
