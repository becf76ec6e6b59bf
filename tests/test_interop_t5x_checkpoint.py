"""T5X-format checkpoints written by real T5X (t5x.checkpoints.Checkpointer)
read into moe_jax: dense T5 v1.1, Switch (tied logits) and ST-MoE (extra
dense FFN) layouts under flaxformer's names; refusals; warm start; the main
command fine-tuning from one.

What this shows without flaxformer (not installed, so its model never
runs here): the files are T5X's own (written and re-read by T5X's
checkpointer); the names and shapes are flaxformer's (a hand-written table
from flaxformer's source); the reader gives back bitwise the parameters
and logits that were written; and, for the dense T5 v1.1 and the Switch
layouts, a checkpoint made from a random HF T5 / SwitchTransformers model
by transformers' own T5X conversion rules (run backwards, written out
here) gives HF's logits within 1e-4 (gated-gelu with a separate head;
Switch with tied and untied logits, with and without dropped tokens). HF's
T5 and Switch are flaxformer's functions, so that is the closest available
check of "the logits of the flaxformer model that wrote the checkpoint".
transformers has no model of ST-MoE's layout (gated experts, an extra
dense FFN after each sparse one); its parts other than the extra FFN are
the two checked layouts' (gated kernels, router, stacked experts), and the
extra FFN is checked only against the table."""

import dataclasses
import re

from flax import traverse_util
import jax
import numpy as np
import pytest

from moe_jax.interop import flaxformer_names, t5x_checkpoint
from moe_jax.models import build_model
from moe_jax.models.config import MoeConfig, TransformerConfig
from moe_jax.moe.dispatch import Dispatch
from moe_jax.moe.experts import Activation
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter

VOCAB = 40


def moe(k, extra=False, activation=None):
  return MoeConfig(layer=MoeLayer(
      router=TokenChoiceRouter(num_selected_experts=k), num_experts=4,
      dispatch=Dispatch.DROPLESS, activation=activation), sparse_every=2,
      extra_dense_ffn=extra)


def config(kind):
  base = dict(vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=4,
              mlp_dim=24, num_encoder_layers=2, num_decoder_layers=2,
              relative_attention_num_buckets=8,
              relative_attention_max_distance=20)
  if kind == "switch":
    base.update(activation=Activation.RELU, logits_via_embedding=True,
                encoder_moe=moe(1), decoder_moe=moe(1))
  elif kind == "st_moe":
    base.update(encoder_moe=moe(2, extra=True), decoder_moe=moe(2, extra=True))
  return TransformerConfig(**base)


def random_params(cfg, seed=0):
  """Every parameter random (norm scales in [0.5, 1.5]) so any mis-mapped
  array changes the logits."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, shape in flaxformer_names.layout(cfg).shapes.items():
    out[path] = (rng.uniform(0.5, 1.5, shape) if path[-1] == "scale" else
                 rng.normal(0, 0.5, shape)).astype(np.float32)
  return traverse_util.unflatten_dict(out)


def batch():
  rng = np.random.default_rng(1)
  enc = rng.integers(1, VOCAB, (2, 6)).astype(np.int32)
  dec = rng.integers(1, VOCAB, (2, 5)).astype(np.int32)
  return enc, dec, dec


def logits_fn(cfg):
  """Jitted params -> logits <float32>[B, Ld, V] on `batch()`."""
  return jax.jit(lambda p: build_model(cfg).apply(
      {"params": p}, *batch(), enable_dropout=False).logits)


def write_t5x(flat, directory, step=7):
  """{flaxformer name: array} saved by T5X's Checkpointer as a train state
  (params in tensorstore, Adafactor slots beside them); returns the step
  directory."""
  pytest.importorskip("t5x.checkpoints")
  from flax.linen import partitioning as flax_partitioning
  from t5x import adafactor, checkpoints, partitioning, train_state

  params = traverse_util.unflatten_dict(flat, sep="/")
  axes = traverse_util.unflatten_dict(
      {name + "_axes": flax_partitioning.AxisMetadata(
          names=tuple(f"axis_{i}" for i in range(np.ndim(w))))
       for name, w in flat.items()}, sep="/")
  state = train_state.FlaxOptimTrainState.create(
      adafactor.Adafactor(factored=False), {"params": params, "params_axes": axes})
  state = state.replace_step(np.int32(step))
  partitioner = partitioning.PjitPartitioner(
      num_partitions=1,
      logical_axis_rules=tuple((f"axis_{i}", None) for i in range(3)))
  checkpoints.Checkpointer(state, partitioner, str(directory)).save(state)
  return directory / f"checkpoint_{step}"


@pytest.mark.parametrize("kind", ["t5_1_1", "switch", "st_moe"])
def test_t5x_written_checkpoint_gives_the_same_model(kind, tmp_path):
  cfg = config(kind)
  params = random_params(cfg)
  step_dir = write_t5x(flaxformer_names.export_params(params, cfg), tmp_path)
  # The arrays live in tensorstore, not in the msgpack file.
  assert (step_dir / "target.token_embedder.embedding" / ".zarray").exists()
  # Our reader sees what T5X's own loader sees.
  from t5x import checkpoints
  theirs = traverse_util.flatten_dict(
      checkpoints.load_t5x_checkpoint(str(step_dir))["target"], sep="/")
  ours = t5x_checkpoint.open_parameters(step_dir)
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name].read().result(), value, name)
  for source in (tmp_path, step_dir / "checkpoint"):   # model dir, file
    assert t5x_checkpoint.checkpoint_file(source) == step_dir / "checkpoint"
  read = t5x_checkpoint.import_t5x(step_dir, cfg)
  jax.tree.map(np.testing.assert_array_equal, read, params)
  logits = logits_fn(cfg)
  np.testing.assert_array_equal(logits(read), logits(params))


def test_names_and_shapes_are_flaxformers():
  """A hand-written table from flaxformer's t5_architecture / moe_layers
  (2-D attention kernels, rank-3 expert kernels, `w` under router_weights)
  for a sparse layer of the ST-MoE config."""
  shapes = flaxformer_names.layout(config("st_moe")).flaxformer_shapes()
  expected = {
      "token_embedder/embedding": (VOCAB, 16),
      "decoder/logits_dense/kernel": (16, VOCAB),
      "encoder/relpos_bias/rel_embedding": (2, 8),
      "encoder/encoder_norm/scale": (16,),
      "decoder/decoder_norm/scale": (16,),
      "encoder/layers_0/pre_attention_layer_norm/scale": (16,),
      "encoder/layers_0/attention/query/kernel": (16, 8),
      "encoder/layers_0/attention/out/kernel": (8, 16),
      "encoder/layers_0/mlp/wi_1/kernel": (16, 24),
      "encoder/layers_1/mlp/router/router_weights/w/kernel": (16, 4),
      "encoder/layers_1/mlp/expert/wi_0/kernel": (4, 16, 24),
      "encoder/layers_1/mlp/expert/wo/kernel": (4, 24, 16),
      "encoder/layers_1/pre_extra_mlp_layer_norm/scale": (16,),
      "encoder/layers_1/extra_mlp/wo/kernel": (24, 16),
      "decoder/layers_1/pre_cross_attention_layer_norm/scale": (16,),
      "decoder/layers_1/encoder_decoder_attention/key/kernel": (16, 8),
      "decoder/layers_0/pre_self_attention_layer_norm/scale": (16,),
  }
  assert {name: shapes[name] for name in expected} == expected
  # Layer 0 of each stack is dense, layer 1 sparse (MIXED layout).
  assert "encoder/layers_0/mlp/wi_0/kernel" in shapes
  assert not any("layers_0/mlp/expert" in name for name in shapes)
  assert len(shapes) == 62   # 6 + 9 + 14 (encoder) + 14 + 19 (decoder)


def test_refuses_leftover_shape_mismatch_and_non_finite(tmp_path):
  cfg = config("t5_1_1")
  flat = flaxformer_names.export_params(random_params(cfg), cfg)
  flat["encoder/layers_0/mlp/wo/kernel"][0, 0] = np.nan
  step_dir = write_t5x(flat, tmp_path)
  fewer = dataclasses.replace(cfg, num_decoder_layers=1)
  with pytest.raises(ValueError, match=r"left unused.*decoder/layers_1/"):
    t5x_checkpoint.import_t5x(step_dir, fewer)
  with pytest.raises(KeyError, match="encoder/layers_2/"):
    t5x_checkpoint.import_t5x(step_dir, dataclasses.replace(
        cfg, num_encoder_layers=3))
  with pytest.raises(ValueError, match=re.escape(
      "encoder/layers_0/mlp/wi_0/kernel has shape (16, 24); the config "
      "expects (16, 32)")):
    t5x_checkpoint.import_t5x(step_dir, dataclasses.replace(cfg, mlp_dim=32))
  with pytest.raises(ValueError, match="encoder/layers_0/mlp/wo/kernel holds "
                     "1 non-finite"):
    t5x_checkpoint.import_t5x(step_dir, cfg)
  read = t5x_checkpoint.import_t5x(step_dir, cfg, allow_non_finite=True)
  assert np.isnan(read["encoder"]["block_0"]["layer_0"]["mlp"]["wo"][0, 0])


def test_refuses_configs_and_paths_without_counterpart(tmp_path):
  with pytest.raises(ValueError, match="scan_layers"):
    flaxformer_names.layout(dataclasses.replace(config("t5_1_1"),
                                                scan_layers=True))
  with pytest.raises(ValueError, match="no T5X checkpoint at"):
    t5x_checkpoint.import_t5x(tmp_path, config("t5_1_1"))
  assert not t5x_checkpoint.is_t5x_checkpoint(tmp_path)


def scanned(flat, num_layers=2):
  """flaxformer's scanned layout (flaxformer's testdata
  encoder_scanned_per_layer_relpos_bias.json) of unscanned {name: array}:
  `{stack}/layers_<i>/X` stacked on axis 1 as `{stack}/{stack}/X`, and a
  relative position bias per layer (scanned stacks cannot share one)."""
  out = {}
  for stack in ("encoder", "decoder"):
    layer_names = {n.split("/", 2)[2] for n in flat
                   if n.startswith(f"{stack}/layers_")}
    layers = [{n: flat.pop(f"{stack}/layers_{i}/{n}") for n in layer_names}
              for i in range(num_layers)]
    layers = [{**layer, "relpos_bias/rel_embedding": flat[
        f"{stack}/relpos_bias/rel_embedding"]} for layer in layers]
    del flat[f"{stack}/relpos_bias/rel_embedding"]
    for n in layers[0]:
      out[f"{stack}/{stack}/{n}"] = np.stack([l[n] for l in layers], axis=1)
  return {**flat, **out}


def test_refuses_scanned_checkpoints(tmp_path):
  cfg = config("t5_1_1")
  flat = scanned(flaxformer_names.export_params(random_params(cfg), cfg))
  assert flat["encoder/encoder/attention/query/kernel"].shape == (16, 2, 8)
  step_dir = write_t5x(flat, tmp_path)
  with pytest.raises(ValueError, match=r"decoder/decoder/.*: a scanned "
                     r"flaxformer checkpoint.*one relative position bias"):
    t5x_checkpoint.import_t5x(step_dir, cfg)


def test_warm_start_from_t5x_checkpoint(tmp_path):
  """TrainConfig(init_checkpoint=..., init_format='t5x'): matching copies
  every weight; upcycling reads the dense counterpart into the experts."""
  from moe_jax.train import run, warm_start
  sparse = config("switch")
  dense = dataclasses.replace(sparse, encoder_moe=None, decoder_moe=None)
  dense_params = random_params(dense, seed=3)
  step_dir = write_t5x(flaxformer_names.export_params(dense_params, dense),
                       tmp_path)
  fresh = random_params(dense, seed=4)
  filled, copied = warm_start.from_checkpoint(
      fresh, str(tmp_path), warm_start.InitMode.MATCHING, ".*", dense,
      warm_start.CheckpointFormat.T5X)
  assert len(copied) == len(jax.tree.leaves(fresh))
  jax.tree.map(np.testing.assert_array_equal, filled, dense_params)
  upcycled, _ = warm_start.from_checkpoint(
      random_params(sparse, seed=5), str(step_dir),
      warm_start.InitMode.UPCYCLE, ".*", sparse,
      warm_start.CheckpointFormat.T5X)
  dense_wi = dense_params["encoder"]["block_1"]["layer_0"]["mlp"]["wi"]
  experts_wi = upcycled["encoder"]["block_0"]["layer_1"]["moe"]["experts"]
  for e in range(4):
    np.testing.assert_array_equal(experts_wi["wi"][e], dense_wi)
  with pytest.raises(ValueError, match="init_format"):
    run.TrainConfig(model_dir=str(tmp_path), num_steps=1,
                    init_format="t5y")


# HF T5 sublayer j of a block -> flaxformer's module and its norm.
_HF_SUBLAYERS = {
    "encoder": (("attention", "pre_attention_layer_norm"),
                ("mlp", "pre_mlp_layer_norm")),
    "decoder": (("self_attention", "pre_self_attention_layer_norm"),
                ("encoder_decoder_attention", "pre_cross_attention_layer_norm"),
                ("mlp", "pre_mlp_layer_norm")),
}
_HF_PROJECTIONS = {"q": "query", "k": "key", "v": "value", "o": "out"}
_HF_LAYER = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(.+)"
                       r"\.weight")


def flaxformer_from_hf(state_dict, tied):
  """{flaxformer name: float32 array} of a HF T5 or SwitchTransformers
  state dict: transformers' T5X -> PyTorch conversion rules, run backwards
  (written here from those rules, not through moe_jax's interop). Kernels
  are torch's Linear weights transposed ([in, out]); expert kernels stack
  to [E, in, out]; the relative bias table is [H, buckets]; the query is
  not rescaled (neither HF nor flaxformer scales attention scores)."""
  out, experts = {}, {}
  for key, tensor in state_dict.items():
    w = tensor.numpy().astype(np.float32)
    if key == "shared.weight":
      out["token_embedder/embedding"] = w
    elif key == "lm_head.weight":
      if not tied:
        out["decoder/logits_dense/kernel"] = w.T
    elif key.endswith("embed_tokens.weight"):
      continue   # copies of shared.weight
    elif key.endswith(".final_layer_norm.weight"):
      stack = key.split(".")[0]
      out[f"{stack}/{stack}_norm/scale"] = w
    elif key.endswith("relative_attention_bias.weight"):
      out[f"{key.split('.')[0]}/relpos_bias/rel_embedding"] = w.T
    else:
      stack, i, j, rest = _HF_LAYER.fullmatch(key).groups()
      module, norm = _HF_SUBLAYERS[stack][int(j)]
      prefix = f"{stack}/layers_{i}"
      parts = rest.split(".")
      if rest == "layer_norm":
        out[f"{prefix}/{norm}/scale"] = w
      elif parts[-1] in _HF_PROJECTIONS:   # SelfAttention.q, ...
        out[f"{prefix}/{module}/{_HF_PROJECTIONS[parts[-1]]}/kernel"] = w.T
      elif parts[1:] == ["router", "classifier"]:
        out[f"{prefix}/mlp/router/router_weights/w/kernel"] = w.T
      elif parts[1] == "experts":          # mlp.experts.expert_{e}.wi
        name = f"{prefix}/mlp/expert/{parts[3]}/kernel"
        experts.setdefault(name, {})[int(parts[2][len("expert_"):])] = w.T
      else:              # mlp.wi, mlp.wo; T5: DenseReluDense.wi_0, ...
        out[f"{prefix}/mlp/{parts[1]}/kernel"] = w.T
  for name, per_expert in experts.items():
    out[name] = np.stack([per_expert[e] for e in sorted(per_expert)])
  return out


@pytest.mark.parametrize("tied, capacity", [(True, 64), (False, 2)])
def test_t5x_checkpoint_of_a_hf_switch_model_gives_its_logits(
    tied, capacity, tmp_path):
  """A random HF SwitchTransformers model, renamed to flaxformer's names
  by transformers' conversion rules and written by T5X's Checkpointer, read
  by `import_t5x` gives HF's logits: tied (no drops, dropless config) and
  untied with 2 slots per expert per sequence (tokens drop, per-sequence
  config)."""
  from moe_jax.interop import hf_switch
  from tests import test_interop_hf_switch as switch
  if capacity < switch.ENC_LEN and int(
      switch.transformers.__version__.split(".")[0]) < 5:
    pytest.skip("transformers < 5 passes a dropped token through")
  model = switch.hf_model(tie_word_embeddings=tied, expert_capacity=capacity)
  lengths = ({} if capacity >= switch.ENC_LEN else
             dict(encoder_length=switch.ENC_LEN,
                  decoder_length=switch.DEC_LEN))
  cfg = hf_switch.config_from_hf(model.config, **lengths)
  step_dir = write_t5x(flaxformer_from_hf(model.state_dict(), tied),
                       tmp_path)
  params = t5x_checkpoint.import_t5x(step_dir, cfg)
  enc, dec_in, dec_tgt = switch.batch()
  expected = switch.hf_logits(model, enc, dec_in)
  ours = np.asarray(switch.our_logits(params, cfg, enc, dec_in, dec_tgt))
  assert np.max(np.abs(ours - expected)) <= 1e-4


def test_t5x_checkpoint_of_a_hf_t5_model_gives_its_logits(tmp_path):
  """A random HF T5 v1.1 (gated-gelu, a head of its own, 2 encoder and 3
  decoder layers), renamed to flaxformer's names by transformers'
  conversion rules and written by T5X's Checkpointer, read by `import_t5x`
  into the config `hf_t5.config_from_hf` makes, gives HF's logits."""
  from moe_jax.interop import hf_t5
  from tests import test_interop_hf as t5
  model = t5.hf_model()
  with t5.torch.no_grad():   # differs from `shared`: a swap would show
    model.lm_head.weight = t5.torch.nn.Parameter(
        t5.torch.randn_like(model.shared.weight))
  cfg = hf_t5.config_from_hf(model.config)
  assert not cfg.logits_via_embedding
  step_dir = write_t5x(flaxformer_from_hf(model.state_dict(), tied=False),
                       tmp_path)
  assert (step_dir / "target.decoder.logits_dense.kernel").exists()
  params = t5x_checkpoint.import_t5x(step_dir, cfg)
  enc, dec_in, dec_tgt = t5.batch()
  expected = t5.hf_logits(model, enc, dec_in)
  ours = np.asarray(t5.our_logits(params, cfg, enc, dec_in, dec_tgt))
  assert np.max(np.abs(ours - expected)) <= 1e-4
