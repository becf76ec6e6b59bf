"""On 8 fake CPU devices: the dropless exchange of the shard_map path.

Started by tests/test_expert_parallel.py; exits non-zero on a mismatch.
* `moe_jax.moe.ragged_all_to_all` (on CPU its `ppermute` emulation) gives
  the results of the example in `jax.lax.ragged_all_to_all`'s docstring,
  and its gradient sends each output row's cotangent back to its operand
  row.
* With a router skewed so that expert 0 takes one choice of every token
  and expert 7 none (its device receives nothing), the expert-parallel
  dropless layer gives the loss and gradients of the one-device layer with
  receive buffers of 5 M rows (4 M needed, 8 M the worst case) on
  (1, 8, 1) and room for every row (None) on (2, 4, 1), rematerialized;
  inside the shard_map the compiled program all-gathers only int32 counts,
  never rows.
* With dropless_receive_factor=2 the same layer fails, naming the knob and
  the factor it needed.
* Lowered for GPU, that exchange and its gradient use XLA's op (the
  layer's host callback cannot be lowered for a backend not present).
"""

from tests.multidevice import common  # first: checks XLA_FLAGS

import re  # pylint: disable=g-import-not-at-top,g-bad-import-order

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moe_jax import partitioning
from moe_jax.moe.dispatch import Dispatch
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.ragged_all_to_all import ragged_all_to_all
from moe_jax.moe.routers import TokenChoiceRouter


def docstring_example():
  """(jitted exchange, its operands): axis of 2, one slice per device, the
  operands of `jax.lax.ragged_all_to_all`'s docstring, one row each."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
  per_device = lambda a, b: jnp.array([a, b], jnp.int32)

  def body(operand, input_offsets, send_sizes, output_offsets, recv_sizes):
    output = jnp.zeros_like(operand[0], shape=(4,))
    return ragged_all_to_all(operand[0], output, input_offsets[0],
                             send_sizes[0], output_offsets[0], recv_sizes[0],
                             axis_name="x")[None]

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"),
                             out_specs=P("x")))
  return fn, (jnp.array([[1., 2, 2], [3, 4, 0]]),
              per_device([0, 1], [0, 1]), per_device([1, 2], [1, 1]),
              per_device([0, 0], [1, 2]), per_device([1, 1], [2, 1]))


def check_docstring_example():
  fn, args = docstring_example()
  np.testing.assert_array_equal(fn(*args), [[1, 3, 0, 0], [2, 2, 4, 0]])
  # Each operand row reaches one output row; the gradient carries it back.
  weights = jnp.arange(8.0).reshape(2, 4)
  grad = jax.grad(lambda op: jnp.sum(fn(op, *args[1:]) * weights))(args[0])
  np.testing.assert_array_equal(grad, [[0, 4, 5], [1, 6, 0]])
  print("ok docstring example", flush=True)


def check_gpu_lowering():
  """The same exchange and its gradient, lowered for GPU."""
  fn, args = docstring_example()
  loss = lambda op: jnp.sum(fn(op, *args[1:]) ** 2)
  text = jax.jit(jax.grad(loss)).trace(args[0]).lower(
      lowering_platforms=("cuda",)).as_text()
  # The exchange forward, its transpose backward.
  assert text.count("ragged_all_to_all") == 2, text
  assert "collective_permute" not in text, text
  print("ok gpu lowering uses ragged_all_to_all", flush=True)


class SkewedCase:
  """The dropless layer; feature 0 of every token is 4 and the router's row
  for it favours expert 0 and shuns expert 7."""

  def __init__(self):
    self.x = common.layer_inputs().at[..., 0].set(4.0)
    self.plain = MoeLayer(
        num_experts=common.NUM_EXPERTS, expert_hidden_dim=16,
        router=TokenChoiceRouter(num_selected_experts=2),
        dispatch=Dispatch.DROPLESS, max_group_size=4)
    boxed = self.plain.init(jax.random.key(1), self.x,
                            deterministic=True)["params"]
    kernel = boxed["router"]["router_weights"]["kernel"]
    skew = jnp.zeros(common.NUM_EXPERTS).at[0].set(3.0).at[7].set(-30.0)
    self.boxed = jax.tree.map(lambda a: a, boxed)
    self.boxed["router"]["router_weights"]["kernel"] = kernel.replace_boxed(
        kernel.value.at[0].add(skew))
    _, stats = self.plain.apply({"params": nn.unbox(self.boxed)}, self.x,
                                deterministic=True)
    load = np.asarray(stats.expert_load)
    tokens = self.x.shape[0] * self.x.shape[1]
    assert load[0] == tokens and load[7] == 0, load

  def grad_fn(self, layer, remat=False):
    loss = lambda p, x: common.layer_loss(layer, p, x)
    if remat:  # as a model with remat_policy='dots_with_batch' runs it
      loss = jax.checkpoint(loss, policy=jax.checkpoint_policies.dots_saveable)
    return jax.jit(jax.value_and_grad(loss))


def all_gathered_types(hlo: str) -> set[str]:
  """Element types of the all-gathers inside the compiled program's
  shard_map (routing runs before it, on the global arrays)."""
  return {match.group(1) for match in re.finditer(
      r"= \(?(\w+)\[.*? all-gather(?:-start)?\(.*", hlo)
          if "shard_map" in match.group(0)}


def check_skewed(case, rules):
  want = case.grad_fn(case.plain)(nn.unbox(case.boxed), case.x)
  for shape, factor, remat in (((1, 8, 1), 5.0, False),
                               ((2, 4, 1), None, True)):
    label = (f"skewed dropless {shape} dropless_receive_factor={factor}"
             f"{' remat' if remat else ''}")
    mesh = partitioning.make_mesh(*shape)
    layer = case.plain.clone(expert_parallel=True,
                             dropless_receive_factor=factor)
    fn = case.grad_fn(layer, remat)
    sharded = common.place(case.boxed, mesh, rules, label)
    xs = jax.device_put(case.x, partitioning.replicated(mesh))
    with partitioning.axis_rules(mesh, rules):
      types = all_gathered_types(fn.lower(sharded, xs).compile().as_text())
      assert types == {"s32"}, (label, types)
      got = fn(sharded, xs)
    common.assert_same(got, want, label)


def check_overflow(case, rules):
  mesh = partitioning.make_mesh(1, 8, 1)
  layer = case.plain.clone(expert_parallel=True, dropless_receive_factor=2.0)
  sharded = common.place(case.boxed, mesh, rules, "overflow")
  xs = jax.device_put(case.x, partitioning.replicated(mesh))
  with partitioning.axis_rules(mesh, rules):
    try:
      jax.block_until_ready(jax.jit(lambda p, x: layer.apply(
          {"params": p}, x, deterministic=True))(sharded, xs))
    except Exception as error:  # pylint: disable=broad-except
      # M = 8 rows per device; device 0 is sent all 32 choices of expert 0.
      message = str(error)
      assert "sent 32 rows, more than its receive buffer of 16" in message, (
          message)
      assert "MoeLayer.dropless_receive_factor >= 4" in message, message
    else:
      raise AssertionError("a receive buffer of 2 M took 4 M rows")
  print("ok overflow names dropless_receive_factor", flush=True)


def main():
  assert jax.device_count() == 8, jax.device_count()
  rules = partitioning.logical_axis_rules()
  check_docstring_example()
  case = SkewedCase()
  check_skewed(case, rules)
  check_overflow(case, rules)
  check_gpu_lowering()


if __name__ == "__main__":
  main()
