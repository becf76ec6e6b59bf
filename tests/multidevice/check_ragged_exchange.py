"""On 8 fake CPU devices: the dropless exchange of the shard_map path.

Started by tests/test_expert_parallel.py; exits non-zero on a mismatch.
* `moe_jax.moe.ragged_all_to_all` (on CPU its `ppermute` emulation) gives
  the results of the example in `jax.lax.ragged_all_to_all`'s docstring,
  and its gradient sends each output row's cotangent back to its operand
  row.
* With a router skewed so that expert 0 takes one choice of every token
  and expert 7 none (its device receives nothing), the expert-parallel
  dropless layer gives the loss and gradients of the one-device layer with
  the default room for every row on (2, 4, 1), rematerialized, and with
  receive buffers of 5 M rows (4 M needed, 8 M the worst case) on
  (1, 8, 1).
* Untrained top-1 and dropless_receive_factor=1 on (2, 4, 1): the
  tokens whose rows overflow (found here from the routing by filling each
  owner's buffer in order) get output 0 and the rest the one-device
  output; the loss and gradients are the one-device layer's with those
  outputs removed; fraction_tokens_left_behind is their share, expert_load
  and the captured dispatch mask leave them out.
* Every compiled layer all-gathers only int32 counts inside its
  shard_maps, never rows.
* Lowered for GPU, the exchange and its gradient use XLA's op.
"""

from tests.multidevice import common  # first: checks XLA_FLAGS

import functools  # pylint: disable=g-import-not-at-top,g-bad-import-order
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moe_jax import partitioning
from moe_jax.moe.dispatch import Dispatch
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.metric_names import DISPATCH_MASK, ROUTING
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
  """The dropless top-k layer. With `skew` <[E]>, feature 0 of every token
  is 4 and the router's row for it adds `skew` to the logits; without, the
  untrained router's own imbalance."""

  def __init__(self, k, skew=None):
    self.x = common.layer_inputs()
    self.plain = MoeLayer(
        num_experts=common.NUM_EXPERTS, expert_hidden_dim=16,
        router=TokenChoiceRouter(num_selected_experts=k),
        dispatch=Dispatch.DROPLESS, max_group_size=4)
    self.boxed = self.plain.init(jax.random.key(1), self.x,
                                 deterministic=True)["params"]
    if skew is not None:
      self.x = self.x.at[..., 0].set(4.0)
      kernel = self.boxed["router"]["router_weights"]["kernel"]
      self.boxed["router"]["router_weights"]["kernel"] = (
          kernel.replace_boxed(kernel.value.at[0].add(skew / 4)))

  def apply(self, layer, params, x):
    """(y, stats, dispatch mask <bool>[G, S, E]) of `layer`."""
    (y, stats), routing = layer.apply(
        {"params": params}, x, deterministic=True, mutable=ROUTING)
    return y, stats, routing[ROUTING][DISPATCH_MASK][0]

  def grad_fn(self, layer, remat=False):
    loss = lambda p, x: common.layer_loss(layer, p, x)
    if remat:  # as a model with remat_policy='dots_with_batch' runs it
      loss = jax.checkpoint(loss, policy=jax.checkpoint_policies.dots_saveable)
    return jax.jit(jax.value_and_grad(loss))

  def sharded(self, layer, mesh, rules, label):
    """(params, x) placed on `mesh`, and `layer` with expert_parallel."""
    return (common.place(self.boxed, mesh, rules, label),
            jax.device_put(self.x, partitioning.replicated(mesh)),
            layer.clone(expert_parallel=True))


def all_gathered_types(hlo: str) -> set[str]:
  """Element types of the all-gathers inside the compiled program's
  shard_maps (routing runs before them, on the global arrays)."""
  return {match.group(1) for match in re.finditer(
      r"= \(?(\w+)\[.*? all-gather(?:-start)?\(.*", hlo)
          if "shard_map" in match.group(0)}


def compiled(fn, *args):
  """`fn` compiled for `args`, after checking that it all-gathers only
  int32 counts inside its shard_maps, never rows."""
  program = fn.lower(*args).compile()
  types = all_gathered_types(program.as_text())
  assert types == {"s32"}, types
  return program


def check_skewed(rules):
  """Expert 0 takes one choice of every token, expert 7 none."""
  case = SkewedCase(2, jnp.zeros(common.NUM_EXPERTS).at[0].set(12.0)
                    .at[7].set(-120.0))
  load = np.asarray(case.apply(case.plain, nn.unbox(case.boxed), case.x)[1]
                    .expert_load)
  assert load[0] == case.x.shape[0] * case.x.shape[1] and load[7] == 0, load
  want = case.grad_fn(case.plain)(nn.unbox(case.boxed), case.x)
  for shape, factor, remat in (((2, 4, 1), None, True),
                               ((1, 8, 1), 5.0, False)):
    label = (f"skewed dropless {shape} dropless_receive_factor={factor}"
             f"{' remat' if remat else ''}")
    mesh = partitioning.make_mesh(*shape)
    params, xs, layer = case.sharded(case.plain, mesh, rules, label)
    if factor is not None:
      layer = layer.clone(dropless_receive_factor=factor)
    with partitioning.axis_rules(mesh, rules):
      got = compiled(case.grad_fn(layer, remat), params, xs)(params, xs)
    common.assert_same(got, want, label)


def overflowing(expert, devices, local_experts, capacity):
  """<bool>[G, S]: the tokens of top-1 choices `expert` <[G, S]> whose rows
  do not fit in their owner's receive buffer of `capacity` rows, the groups
  split over `devices` = (data, expert): each owner fills its buffer by
  local expert, then sending device, then the sender's token order."""
  data, shards = devices
  per_device = expert.shape[0] // (data * shards)
  by_device = expert.reshape(data, shards, -1)
  dropped = np.zeros(by_device.shape, bool)
  for d in range(data):
    for owner in range(shards):
      slot = 0
      for e in range(owner * local_experts, (owner + 1) * local_experts):
        for source in range(shards):
          for row in np.flatnonzero(by_device[d, source] == e):
            dropped[d, source, row] = slot >= capacity
            slot += 1
  return dropped.reshape(data * shards * per_device, -1)


def check_overflow(rules):
  """Untrained top-1 and receive buffers of M rows on (2, 4, 1): the rows
  past them are dropped, counted and contribute 0."""
  case = SkewedCase(1)
  params = nn.unbox(case.boxed)
  y, _, mask = case.apply(case.plain, params, case.x)
  assert np.all(np.sum(mask, axis=-1) == 1), mask
  mesh = partitioning.make_mesh(2, 4, 1)
  # M = 4 rows per device (one group of 4 tokens), 2 local experts.
  dropped = overflowing(np.argmax(mask, axis=-1), (2, 4), 2, capacity=4)
  print(f"overflow: {dropped.sum()} of {dropped.size} rows", flush=True)
  assert 0 < dropped.sum() < dropped.size, dropped
  keep = jnp.asarray(~dropped, jnp.float32)[..., None]

  def reference_loss(p, x):  # one device, the dropped tokens' output 0
    y, stats, _ = case.apply(case.plain, p, x)
    return (jnp.mean((y * keep) ** 2) + stats.auxiliary_loss +
            stats.router_z_loss)

  want = jax.jit(jax.value_and_grad(reference_loss))(params, case.x)
  sharded, xs, layer = case.sharded(case.plain, mesh, rules, "overflow")
  layer = layer.clone(dropless_receive_factor=1.0)
  with partitioning.axis_rules(mesh, rules):
    got_y, stats, got_mask = jax.jit(functools.partial(case.apply, layer))(
        sharded, xs)
    got = compiled(case.grad_fn(layer), sharded, xs)(sharded, xs)
  np.testing.assert_allclose(got_y, y * keep, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got_mask, mask & ~dropped[..., None])
  np.testing.assert_allclose(stats.fraction_tokens_left_behind,
                             dropped.sum() / dropped.size, rtol=1e-6)
  np.testing.assert_allclose(stats.expert_load, np.sum(got_mask, (0, 1)))
  common.assert_same(got, want, "overflow drops, counts, contributes 0")


def main():
  assert jax.device_count() == 8, jax.device_count()
  rules = partitioning.logical_axis_rules()
  check_docstring_example()
  check_skewed(rules)
  check_overflow(rules)
  check_gpu_lowering()


if __name__ == "__main__":
  main()
