"""Run tokens through a checkpoint and report, per sparse layer, how the
routers behaved.

Dimension names (moe_jax's glossary): B batch, L length (of the layer's
stack), E experts, R sparse layers (encoder layers first, then decoder
layers, as in `ModelOutput.moe_stats`).

Scalar metrics and expert loads come from `ModelOutput.moe_stats`; per-token
data (router probabilities, which experts processed which token) from the
opt-in `routing` collection (`moe_jax.moe.capture`).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import flax.traverse_util
import jax
import numpy as np

from moe_jax.inspection.checkpoint import Checkpoint
from moe_jax.models import Architecture
from moe_jax.moe import metric_names
from moe_jax.text import Vocabulary, encode_texts
from moe_jax.train.step import model_inputs

DROPPED = -1  # expert id of a token no expert processed (or padding)


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """Routing of one sparse layer.

  Attributes:
    name: module path, e.g. 'encoder/block_1/layer_0'.
    stack: 'encoder' or 'decoder'.
    expert_load: <float>[E] tokens dispatched to each expert.
    fraction_tokens_left_behind: real tokens processed by no expert / real
      tokens (they pass on through the residual only).
    router_confidence: summed combine weights / dispatched (token, expert)
      pairs (flaxformer's definition).
    expert_usage: dispatched tokens / total expert capacity (FLAN-MoE).
    auxiliary_loss, router_z_loss: the layer's unweighted routing losses.
    router_entropy: mean over real tokens of -sum_e p_e log p_e (nats) of
      the router probabilities.
    expert_ids: <int>[B, L] expert with the largest combine weight among
      those that processed the token; DROPPED if none did (or padding).
    dispatch_mask: <bool>[B, L, E] which experts processed each token.
    router_probs: <float32>[B, L, E].
    token_mask: <bool>[B, L] real (routed) tokens.
  """
  name: str
  stack: str
  expert_load: np.ndarray
  fraction_tokens_left_behind: float
  router_confidence: float
  expert_usage: float
  auxiliary_loss: float
  router_z_loss: float
  router_entropy: float
  expert_ids: np.ndarray
  dispatch_mask: np.ndarray
  router_probs: np.ndarray
  token_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class RoutingReport:
  """Routing of one batch through every sparse layer.

  Attributes:
    layers: one `LayerReport` per sparse layer, in `moe_stats` order.
    tokens: stack name -> <int32>[B, L] token ids that stack routed.
    vocabulary: decodes ids for the token tables (None: ids are shown).
  """
  layers: list[LayerReport]
  tokens: dict[str, np.ndarray]
  vocabulary: Optional[Vocabulary] = None

  @property
  def num_experts(self) -> int:
    return self.layers[0].expert_load.shape[0]

  def layer_names(self, stack: Optional[str] = None) -> list[str]:
    return [l.name for l in self.layers if stack in (None, l.stack)]

  def load_matrix(self) -> np.ndarray:
    """<float>[R, E] tokens dispatched per layer and expert."""
    return np.stack([l.expert_load for l in self.layers])

  def token_text(self, token_id: int) -> str:
    if self.vocabulary is None:
      return str(token_id)
    return self.vocabulary.decode([int(token_id)]) or f"<{token_id}>"

  def summary(self) -> list[dict[str, Any]]:
    """One record per layer with its scalar metrics and load."""
    return [{"layer": l.name,
             metric_names.FRACTION_TOKENS_LEFT_BEHIND:
                 l.fraction_tokens_left_behind,
             "router_confidence": l.router_confidence,
             "expert_usage": l.expert_usage,
             "router_entropy": l.router_entropy,
             "auxiliary_loss": l.auxiliary_loss,
             "router_z_loss": l.router_z_loss,
             "expert_load": l.expert_load.tolist()} for l in self.layers]

  def expert_id_table(self, stack: str, example: int = 0
                      ) -> tuple[list[str], list[str], np.ndarray]:
    """Token x layer expert ids of one example's real tokens.

    Returns:
      (the real tokens decoded, the stack's sparse-layer names, and
      <int>[tokens, layers] expert ids: a row per token, a column per
      layer).
    """
    layers = [l for l in self.layers if l.stack == stack]
    if not layers:
      raise ValueError(f"no sparse layer in stack {stack!r}; stacks: "
                       f"{sorted({l.stack for l in self.layers})}")
    real = layers[0].token_mask[example]
    ids = self.tokens[stack][example][real]
    table = np.stack([l.expert_ids[example][real] for l in layers], axis=1)
    return ([self.token_text(t) for t in ids], [l.name for l in layers],
            table)

  def top_tokens(self, layer: int | str, top: int = 5
                 ) -> dict[int, list[tuple[str, int]]]:
    """Expert -> its `top` most frequent (decoded token, count) in `layer`
    (an index into `layers` or a name), counting every dispatch."""
    if isinstance(layer, int):
      report = self.layers[layer]
    else:
      named = [l for l in self.layers if l.name == layer]
      if not named:
        raise ValueError(f"no sparse layer named {layer!r}; layers: "
                         f"{self.layer_names()}")
      report = named[0]
    ids = self.tokens[report.stack]
    out = {}
    for e in range(self.num_experts):
      counts = collections.Counter(ids[report.dispatch_mask[..., e]].tolist())
      out[e] = [(self.token_text(t), n) for t, n in counts.most_common(top)]
    return out

  def format_summary(self) -> str:
    """A text table of `summary()`."""
    head = (f"{'layer':<28} {'left_behind':>11} {'confid':>7} {'usage':>7} "
            f"{'entropy':>8}  load")
    lines = [head]
    for l in self.layers:
      lines.append(f"{l.name:<28} {l.fraction_tokens_left_behind:>11.3f} "
                   f"{l.router_confidence:>7.3f} {l.expert_usage:>7.3f} "
                   f"{l.router_entropy:>8.3f}  "
                   f"{l.expert_load.astype(int).tolist()}")
    return "\n".join(lines)


def _block_index(name: str) -> tuple[int, ...]:
  return tuple(int(n) for n in re.findall(r"\d+", name))


def _captured_layers(captured: Mapping[str, Any]
                     ) -> list[tuple[str, dict[str, np.ndarray]]]:
  """(layer name, {capture name: array [G, S, ...]}) per sparse layer, in
  stack then block order; scanned stacks ([blocks, G, S, ...]) are split."""
  flat = flax.traverse_util.flatten_dict(captured)
  modules = collections.defaultdict(dict)
  for path, (value,) in flat.items():
    modules[path[:-1]][path[-1]] = np.asarray(value)
  layers = []
  for path, values in modules.items():
    # path: (stack, block_i | 'blocks', layer_j, 'moe')
    stack, block, layer = path[0], path[1], path[2]
    if block == "blocks":  # nn.scan: leading [blocks] axis
      blocks = next(iter(values.values())).shape[0]
      for b in range(blocks):
        layers.append((f"{stack}/block_{b}/{layer}",
                       {k: v[b] for k, v in values.items()}))
    else:
      layers.append(("/".join(path[:3]), values))
  order = {"encoder": 0, "decoder": 1}
  return sorted(layers, key=lambda kv: (order[kv[0].split("/")[0]],
                                        _block_index(kv[0])))


def _per_token(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """[G, S, ...] -> [B, L, ...] (drops the padding of the last group)."""
  flat = x.reshape(-1, *x.shape[2:])
  return flat[:shape[0] * shape[1]].reshape(*shape, *x.shape[2:])


def _stack_tokens(checkpoint: Checkpoint, batch: Mapping[str, np.ndarray]
                  ) -> dict[str, np.ndarray]:
  tokens = {"decoder": np.asarray(batch["decoder_input_tokens"])}
  if Architecture(checkpoint.config.architecture) == (
      Architecture.ENCODER_DECODER):
    tokens["encoder"] = np.asarray(batch["encoder_input_tokens"])
  return tokens


def route_batch(checkpoint: Checkpoint, batch: Mapping[str, np.ndarray],
                vocabulary: Optional[Vocabulary] = None) -> RoutingReport:
  """Routes `batch` (the model's input features) in eval mode.

  Raises:
    ValueError: the model has no sparse layer.
  """
  inputs = {k: np.asarray(v) for k, v in model_inputs(batch).items()}
  apply = jax.jit(lambda variables, inputs: checkpoint.model.apply(
      variables, **inputs, enable_dropout=False,
      mutable=[metric_names.ROUTING]))
  output, state = apply(checkpoint.variables(), inputs)
  if output.moe_stats is None:
    raise ValueError("the checkpoint's model has no sparse layer to inspect")
  stats = jax.tree.map(np.asarray, output.moe_stats)
  tokens = _stack_tokens(checkpoint, inputs)
  layers = []
  for i, (name, captured) in enumerate(
      _captured_layers(state[metric_names.ROUTING])):
    stack = name.split("/")[0]
    shape = tokens[stack].shape
    probs = _per_token(captured[metric_names.ROUTER_PROBS], shape)
    mask = _per_token(captured[metric_names.DISPATCH_MASK], shape)
    weights = _per_token(captured[metric_names.COMBINE_WEIGHTS], shape)
    real = _per_token(captured[metric_names.TOKEN_MASK], shape) > 0
    entropy = -np.sum(probs * np.log(np.maximum(probs, 1e-30)), axis=-1)
    expert_ids = np.where(mask.any(-1),
                          np.argmax(np.where(mask, weights, -1.0), -1),
                          DROPPED)
    layers.append(LayerReport(
        name=name, stack=stack,
        expert_load=stats.expert_load[i],
        fraction_tokens_left_behind=float(
            stats.fraction_tokens_left_behind[i]),
        router_confidence=float(stats.router_confidence[i]),
        expert_usage=float(stats.expert_usage[i]),
        auxiliary_loss=float(stats.auxiliary_loss[i]),
        router_z_loss=float(stats.router_z_loss[i]),
        router_entropy=float(np.sum(entropy * real) /
                             max(np.sum(real), 1)),
        expert_ids=expert_ids, dispatch_mask=mask, router_probs=probs,
        token_mask=real))
  return RoutingReport(layers, tokens, vocabulary)


def default_vocabulary() -> Vocabulary:
  """seqio's ByteVocabulary (imported here: seqio brings tensorflow)."""
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio.ByteVocabulary()


def text_batch(checkpoint: Checkpoint, inputs: Sequence[str],
               targets: Optional[Sequence[str]] = None,
               vocabulary: Optional[Vocabulary] = None
               ) -> dict[str, np.ndarray]:
  """Model features for `inputs` (and `targets`; default: the inputs again,
  so the decoder routes the same text). Decoder-only models see one
  sequence: inputs then targets when targets are given."""
  vocabulary = vocabulary or default_vocabulary()
  if Architecture(checkpoint.config.architecture) == (
      Architecture.DECODER_ONLY):
    texts = (list(inputs) if targets is None else
             [i + t for i, t in zip(inputs, targets)])
    tokens = encode_texts(texts, vocabulary)
    return {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens}
  target_ids = encode_texts(inputs if targets is None else targets,
                            vocabulary)
  shifted = np.pad(target_ids, ((0, 0), (1, 0)))[:, :-1]
  return {"encoder_input_tokens": encode_texts(inputs, vocabulary),
          "decoder_input_tokens": shifted,
          "decoder_target_tokens": target_ids}


def route_text(checkpoint: Checkpoint, inputs: str | Sequence[str],
               targets: Optional[str | Sequence[str]] = None,
               vocabulary: Optional[Vocabulary] = None) -> RoutingReport:
  """Encodes text with `vocabulary` (default ByteVocabulary) and routes it."""
  as_list = lambda t: [t] if isinstance(t, str) else list(t)
  vocabulary = vocabulary or default_vocabulary()
  batch = text_batch(checkpoint, as_list(inputs),
                     None if targets is None else as_list(targets),
                     vocabulary)
  return route_batch(checkpoint, batch, vocabulary)
