"""Every GroupedMatmul equals jax.lax.ragged_dot, alone and in the layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe.grouped_matmul import GroupedMatmul, resolve
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


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_ragged_dot_forward_and_gradients(choice, seed):
  rng = np.random.default_rng(seed)
  rows, groups, width, out_width = 13, 5, 6, 4
  lhs = jnp.asarray(rng.normal(size=(rows, width)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(groups, width, out_width)), jnp.float32)
  # Rows 11 and 12 fall past the groups: they must come out 0.
  sizes = ragged_sizes(rng, groups, rows - 2)
  cotangent = jnp.asarray(rng.normal(size=(rows, out_width)), jnp.float32)

  def value_and_grads(matmul):
    loss = lambda a, b: jnp.sum(matmul(a, b, sizes) * cotangent)
    return matmul(lhs, rhs, sizes), jax.grad(loss, argnums=(0, 1))(lhs, rhs)

  out, grads = value_and_grads(resolve(choice))
  want_out, want_grads = value_and_grads(jax.lax.ragged_dot)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[rows - 2:], 0.0)
  for grad, want in zip(grads, want_grads):
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5)


def test_dropless_layer_is_the_same_for_every_choice():
  x = inputs(length=16)
  mask = jnp.ones((2, 16)).at[1, 11:].set(0)
  results = {}
  for choice in CHOICES:
    layer = MoeLayer(num_experts=4, expert_hidden_dim=16, dispatch="dropless",
                     router=TokenChoiceRouter(num_selected_experts=2),
                     grouped_matmul=choice, max_group_size=8)
    params = layer.init(jax.random.PRNGKey(1), x, deterministic=True)

    def loss(params, x, layer=layer):
      y, stats = layer.apply(params, x, mask, deterministic=True)
      return jnp.sum(jnp.sin(y)) + stats.auxiliary_loss, y
    results[choice] = jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True))(params, x)
  (want_loss, want_y), want_grads = results[GroupedMatmul.RAGGED_DOT.value]
  for choice, ((loss, y), grads) in results.items():
    np.testing.assert_allclose(y, want_y, atol=1e-5, err_msg=choice)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=choice)
    jax.tree.map(lambda a, b, choice=choice: np.testing.assert_allclose(
        a, b, atol=1e-5, err_msg=choice), nn.unbox(grads),
                 nn.unbox(want_grads))


def test_bad_choice_names_the_knob():
  with pytest.raises(ValueError, match="grouped_matmul='gmm'") as error:
    MoeLayer(num_experts=4, expert_hidden_dim=8, router=TokenChoiceRouter(),
             grouped_matmul="gmm")
  for choice in CHOICES:
    assert repr(choice) in str(error.value)
