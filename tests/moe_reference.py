"""A slow, obvious MoE layer in numpy: loops over tokens, no tricks.

Written from the routing rules alone (not from the library), so tests can hold
the library to it. Relu experts keep the arithmetic exact in float64.
"""

import numpy as np


def softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def relu_expert(x, wi, wo):
  return np.maximum(x @ wi, 0.0) @ wo


def capacity(group_size, num_experts, factor, min_capacity):
  """flaxformer's C (no k), capped at the group size."""
  return int(min(max(min_capacity, round(factor * group_size / num_experts)),
                 group_size))


def token_choice(x, mask, router_kernel, wi, wo, k, cap, renormalize=False,
                 batch_prioritized=False):
  """One group. x [S, D], mask [S]. Returns (y [S, D], dispatched [S, K])."""
  probs = softmax(x @ router_kernel)
  num_tokens = x.shape[0]
  num_experts = probs.shape[1]
  choices = np.argsort(-probs, axis=1, kind="stable")[:, :k]
  top = np.take_along_axis(probs, choices, axis=1)
  gates = top / top.sum(1, keepdims=True) if renormalize else top
  order = list(range(num_tokens))
  if batch_prioritized:
    order = sorted(order, key=lambda s: -top[s, 0])
  filled = [0] * num_experts
  dispatched = np.zeros((num_tokens, k), bool)
  for j in range(k):  # every first choice before any second choice
    for s in order:
      if not mask[s]:
        continue
      expert = choices[s, j]
      if filled[expert] < cap:
        filled[expert] += 1
        dispatched[s, j] = True
  y = np.zeros_like(x)
  for s in range(num_tokens):
    for j in range(k):
      if dispatched[s, j]:
        e = choices[s, j]
        y[s] += gates[s, j] * relu_expert(x[s], wi[e], wo[e])
  return y, dispatched


def expert_choice(x, mask, router_kernel, wi, wo, cap):
  """One group. Returns (y [S, D], times each token was taken [S])."""
  probs = softmax(x @ router_kernel)
  y = np.zeros_like(x)
  taken = np.zeros(x.shape[0], int)
  for e in range(probs.shape[1]):
    score = np.where(mask, probs[:, e], -1.0)
    for s in np.argsort(-score, kind="stable")[:cap]:
      if mask[s]:
        y[s] += probs[s, e] * relu_expert(x[s], wi[e], wo[e])
        taken[s] += 1
  return y, taken
