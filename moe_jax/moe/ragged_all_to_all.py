"""`jax.lax.ragged_all_to_all` on every backend.

`ragged_all_to_all` has the signature and semantics of
`jax.lax.ragged_all_to_all` (read its docstring): inside `jax.shard_map`,
each device sends slices of its operand (rows `input_offsets[i]` to
`input_offsets[i] + send_sizes[i]`) to the device i // (slices per device)
of the axis, which writes them into its `output` at the offsets the sender
gave in `output_offsets`; `recv_sizes` are the sizes it receives. XLA:CPU
(jax 0.10.2) has no such op ("HLO opcode `ragged-all-to-all` is not
supported by XLA:CPU ThunkEmitter"), so when lowered for CPU the same
exchange runs as `emulated`: one round per shift s of the axis, each device
packs its slices for device (me + s) mod X into one buffer of
min(operand rows, output rows) rows, a `ppermute` moves it, and the
receiver scatters each slice to its offset. Other backends get XLA's op.
The choice is made per platform at lowering (`jax.lax.platform_dependent`),
not configured: both compute the same function and its gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def ragged_all_to_all(operand: Array, output: Array, input_offsets: Array,
                      send_sizes: Array, output_offsets: Array,
                      recv_sizes: Array, *, axis_name: str) -> Array:
  """`jax.lax.ragged_all_to_all` (XLA's op), or `emulated` on CPU.

  Args:
    operand: <[rows, ...]> the rows to send, in slices.
    output: <[rows', ...]> the receive buffer, returned with the received
      slices written in; it must vary over `axis_name` like `operand`.
    input_offsets, send_sizes, output_offsets, recv_sizes: <int32>[Q], Q a
      multiple of the axis size X, slice q going to device q // (Q / X).
    axis_name: the `jax.shard_map` mesh axis.
  """
  def xla(*args):
    return jax.lax.ragged_all_to_all(*args, axis_name=axis_name)

  def cpu(*args):
    return emulated(*args, axis_name=axis_name)

  return jax.lax.platform_dependent(
      operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
      cpu=cpu, default=xla)


def emulated(operand: Array, output: Array, input_offsets: Array,
             send_sizes: Array, output_offsets: Array, recv_sizes: Array, *,
             axis_name: str) -> Array:
  """`ragged_all_to_all` from `ppermute`s of packed per-destination buffers.

  X rounds (the first a local copy), each moving one buffer of
  min(operand rows, output rows) rows: every slice list sent to one device
  fits in it, since it holds at most all of the operand and lands inside
  the output.
  """
  size = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  per_device = input_offsets.shape[0] // size
  chunk = min(operand.shape[0], output.shape[0])
  # Where this device's slices land on their receivers, as seen there.
  landing = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  by_device = lambda a, device: jax.lax.dynamic_slice_in_dim(
      a, device * per_device, per_device)
  for shift in range(size):
    dst = (me + shift) % size
    sent = _packed_rows(by_device(input_offsets, dst),
                        by_device(send_sizes, dst), chunk, operand.shape[0])
    packed = jnp.take(operand, sent, axis=0, mode="fill", fill_value=0)
    if shift:
      packed = jax.lax.ppermute(
          packed, axis_name, [(i, (i + shift) % size) for i in range(size)])
    src = (me - shift) % size
    received = _packed_rows(by_device(landing, src),
                            by_device(recv_sizes, src), chunk, output.shape[0])
    output = output.at[received].set(packed, mode="drop")
  return output


def _packed_rows(offsets: Array, sizes: Array, chunk: int,
                 past: int) -> Array:
  """<int32>[chunk]: for the slices `sizes` packed back to back, the row of
  their array each packed position stands for (slice q's rows start at
  `offsets[q]`); `past` (one past that array's end: read as 0, dropped on
  write) for positions after the last slice."""
  ends = jnp.cumsum(sizes)
  position = jnp.arange(chunk, dtype=ends.dtype)
  q = jnp.minimum(jnp.searchsorted(ends, position, side="right"),
                  sizes.shape[0] - 1)
  rows = offsets[q] + position - (ends - sizes)[q]
  return jnp.where(position < ends[-1], rows, past)
