"""Every gin model config builds; tiny ones train; routing files layer on."""

import re
import subprocess
import sys
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import gin_upgrade, gin_utils, partitioning
from moe_jax.models import build_model, configured_model_config, dummy_batch
from moe_jax.train import run

GIN = Path(__file__).resolve().parent.parent / "gin"
TINY_MOE = "gin/models/t5_1_1_tiny_moe.gin"


def _files(*folders):
  return sorted(p.relative_to(GIN.parent).as_posix()
                for folder in folders for p in (GIN / folder).glob("*.gin"))


MODEL_FILES = _files("models")
TINY_FILES = [f for f in MODEL_FILES if "tiny" in f]
ROUTING_FILES = _files("routing", "dispatch")  # Layered on a model, they run.
PARTITIONING_FILES = _files("partitioning")
RUN_FILES = _files("runs")


def _config(*files, bindings=()):
  gin_utils.parse(files, bindings)
  return configured_model_config()


def test_a_module_imported_after_parsing_can_register_configurables():
  # T5X and task modules register gin knobs on import; a run earlier in the
  # same process (a test, a notebook) must not have locked gin against them.
  gin_utils.parse([TINY_MOE])

  @gin.configurable("moe_jax_test_registered_after_parse")
  def registered(value=1):
    return value

  assert registered() == 1


def test_there_are_configs():
  assert len(MODEL_FILES) >= 20 and len(TINY_FILES) >= 4
  assert len(ROUTING_FILES) >= 8
  assert len(PARTITIONING_FILES) >= 2 and len(RUN_FILES) >= 2


@pytest.mark.parametrize("path", MODEL_FILES)
def test_every_model_config_builds_abstractly(path):
  config = _config(path)
  model = build_model(config)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), **dummy_batch(config, 1, 8, 8),
      enable_dropout=False))
  assert jax.tree.leaves(shapes["params"])


def _forward_backward(config):
  model = build_model(config)
  batch = dummy_batch(config, 2, 8, 6)

  @jax.jit
  def run():
    params = model.init(jax.random.PRNGKey(0), **batch, enable_dropout=False)

    def loss(p):
      out = model.apply(p, **batch, enable_dropout=True,
                        rngs={"dropout": jax.random.PRNGKey(1)})
      aux = 0.0 if out.moe_stats is None else jnp.sum(
          out.moe_stats.auxiliary_loss)
      return jnp.mean(jax.nn.log_softmax(out.logits)[..., 2]) + aux
    return jax.value_and_grad(loss)(params)

  value, grads = run()
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("path", TINY_FILES)
def test_tiny_configs_run_forward_and_backward(path):
  _forward_backward(_config(path))


@pytest.mark.parametrize("routing", ROUTING_FILES)
def test_routing_files_layer_on_a_model(routing):
  config = _config(TINY_MOE, routing)
  _forward_backward(config)


@pytest.mark.parametrize("path", PARTITIONING_FILES)
def test_partitioning_files_layer_on_a_model(path):
  config = _config(TINY_MOE, path)
  assert config.encoder_moe is not None
  rules = dict(partitioning.logical_axis_rules())
  assert rules["expert"] is not None
  # The mesh is built where this host has the devices it asks for; else
  # make_mesh says how many there are.
  count = len(jax.devices())
  try:
    mesh = partitioning.make_mesh()
  except ValueError as e:
    assert re.search(rf"\b{count} (devices|are available)", str(e)), e
  else:
    assert mesh.size == count


# What gin/runs/train.gin requires and a run file sets; the file's own
# values, parsed after these, win.
_RUN_MACROS = """
MODEL_DIR = '{model_dir}'
TRAIN_STEPS = 1
MIXTURE = 'mini_flan'
TASK_FEATURE_LENGTHS = {{'inputs': 8, 'targets': 8}}
BATCH_SIZE = 2
"""


@pytest.mark.parametrize("path", RUN_FILES)
def test_run_files_build_a_run(path, tmp_path):
  import tasks  # noqa: F401  (their mixtures, as `moe_jax.main` registers)
  macros = tmp_path / "run_macros.gin"
  macros.write_text(_RUN_MACROS.format(model_dir=tmp_path / "run"))
  gin_utils.parse([TINY_MOE, str(macros), path])
  built = run.configured_run()
  assert built.train.num_steps >= 1 and built.data.batch_size >= 1
  assert built.model.vocab_size >= 1


def test_mixtral_style_preset_sets_kv_heads_and_norm_epsilon():
  """NUM_KV_HEADS and NORM_EPSILON reach the model: one key/value head
  (grouped-query attention) in the built parameters, epsilon 1e-5; the
  macros override from the command line."""
  path = "gin/models/mixtral_style_tiny.gin"
  config = _config(path)
  assert (config.num_heads, config.num_kv_heads) == (2, 1)
  assert config.norm_epsilon == 1e-5
  shapes = jax.eval_shape(lambda: build_model(config).init(
      jax.random.PRNGKey(0), **dummy_batch(config, 1, 8, 8),
      enable_dropout=False))["params"]
  attention = shapes["decoder"]["block_0"]["layer_0"]["self_attention"]
  kernels = {name: attention[name]["kernel"].value.shape
             for name in ("query", "key", "value")}
  assert kernels == {"query": (32, 2, 16), "key": (32, 1, 16),
                     "value": (32, 1, 16)}
  config = _config(path, bindings=["NUM_KV_HEADS = 2", "NORM_EPSILON = 1e-6"])
  assert (config.num_kv_heads, config.norm_epsilon) == (2, 1e-6)
  assert _config("gin/models/decoder_only_tiny.gin").num_kv_heads is None


def test_routing_file_changes_the_router():
  config = _config("gin/models/t5_1_1_tiny_moe.gin",
                   "gin/routing/expert_choice.gin")
  assert type(config.encoder_moe.layer.router).__name__ == "ExpertChoiceRouter"
  assert type(config.decoder_moe.layer.router).__name__ == "TokenChoiceRouter"
  config = _config("gin/models/t5_1_1_tiny_moe.gin",
                   "gin/routing/gshard_top2.gin",
                   bindings=["NUM_EXPERTS = 4"])
  assert config.encoder_moe.layer.num_experts == 4
  assert config.decoder_moe.layer.router.second_expert_policy == "random"


def test_layer_knobs_bind_for_both_stacks_or_one():
  config = _config("gin/models/t5_1_1_tiny_moe.gin", bindings=[
      "layer.MoeLayer.pad_to_group_size = True",
      "encoder/layer.MoeLayer.train_capacity_factor = 3.0",
      "decoder/layer.MoeLayer.param_dtype = 'bfloat16'",
      "decoder/config.MoeConfig.extra_dense_ffn = True"])
  encoder, decoder = config.moe_layer("encoder"), config.moe_layer("decoder")
  assert encoder.pad_to_group_size and decoder.pad_to_group_size
  assert (encoder.train_capacity_factor,
          decoder.train_capacity_factor) == (3.0, 1.25)
  assert jnp.dtype(encoder.param_dtype) == jnp.float32
  assert jnp.dtype(decoder.param_dtype) == jnp.bfloat16
  assert not config.encoder_moe.extra_dense_ffn
  assert config.decoder_moe.extra_dense_ffn
  # The model completes each stack's layer.
  assert (encoder.causal, decoder.causal) == (False, True)
  assert encoder.expert_hidden_dim == config.mlp_dim
  assert encoder.activation == config.activation
  model = build_model(config)
  params = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), **dummy_batch(config, 1, 8, 8),
      enable_dropout=False))["params"]
  moe = lambda stack: params[stack]["block_0"]["layer_1"]["moe"]
  assert moe("encoder")["experts"]["wo"].value.dtype == jnp.float32
  assert moe("decoder")["experts"]["wo"].value.dtype == jnp.bfloat16


@pytest.mark.parametrize("arch, size", [
    ("gin/models/arch/t5_1_1.gin", "gin/models/sizes/tiny.gin"),
    ("gin/models/arch/decoder_only.gin", "gin/models/sizes/tiny.gin")])
def test_forgotten_size_macro_is_named(arch, size, tmp_path):
  """The architecture files declare their size macros %gin.REQUIRED."""
  forgot = tmp_path / "forgot.gin"
  forgot.write_text("\n".join(
      [f"include '{arch}'"] + [
          line for line in (GIN.parent / size).read_text().splitlines()
          if not line.startswith("NUM_DECODER_LAYERS")]))
  with pytest.raises(ValueError, match="NUM_DECODER_LAYERS.*gin.REQUIRED"):
    _config(str(forgot))


def test_unknown_knob_fails_at_parse():
  with pytest.raises(ValueError, match="no_such_knob"):
    _config("gin/models/t5_1_1_tiny.gin",
            bindings=["config.TransformerConfig.no_such_knob = 1"])


def test_bad_values_name_the_knob():
  with pytest.raises(ValueError, match="sparse_every=3"):
    _config("gin/models/t5_1_1_tiny_moe.gin", bindings=["SPARSE_EVERY = 3"])
  # expert_choice.gin makes ExpertChoiceRouter known to gin (a binding alone
  # names only configurables some parsed file referenced).
  with pytest.raises(ValueError,
                     match="decoder_moe.layer: router=ExpertChoiceRouter"):
    _config("gin/models/t5_1_1_tiny_moe.gin", "gin/routing/expert_choice.gin",
            bindings=["decoder/layer.MoeLayer.router = "
                      "@decoder/routers.ExpertChoiceRouter()"])
  with pytest.raises(ValueError, match="param_dtype must name a jax dtype"):
    _config("gin/models/t5_1_1_tiny_moe.gin",
            bindings=["layer.MoeLayer.param_dtype = 'float33'"])
  with pytest.raises(ValueError, match="config.MoeConfig.num_experts, a knob "
                     "of layer.MoeLayer now"):
    _config("gin/models/t5_1_1_tiny_moe.gin",
            bindings=["config.MoeConfig.num_experts = 4"])
  with pytest.raises(ValueError, match="gin file not found"):
    _config("gin/models/nope.gin")


def teardown_module():
  gin.clear_config()


def test_config_saved_before_the_moe_package_says_how_to_update(tmp_path):
  """A config.gin written before the MoE core moved into `moe_jax.moe`,
  before the layer knobs moved to `layer.MoeLayer` and before T5X's capacity
  convention fails with a command; after that command the file gives the
  model the current gin files give for the same settings, its top-2
  capacity factors doubled so that each group's capacity is the one the
  run trained with."""
  saved = tmp_path / "config.gin"
  saved.write_text((Path(__file__).parent / "data" /
                    "config_before_moe_package.gin").read_text())
  with pytest.raises(ValueError, match="written for an older moe_jax") as err:
    gin_utils.parse([str(saved)])
  command = str(err.value).split("update the file with\n")[1].strip()
  assert command == f"python -m moe_jax.gin_upgrade {saved}"
  subprocess.run(command.replace("python", sys.executable, 1), shell=True,
                 check=True)
  config = _config(str(saved))
  assert config.encoder_moe.layer.num_experts == 8
  assert type(config.encoder_moe.layer.router).__name__ == "TokenChoiceRouter"
  assert config.encoder_moe.layer.router.num_selected_experts == 2
  # The run was gin/runs/mini_flan_cpu.gin: tiny MoE T5, ST-MoE routing.
  current = _config("gin/models/t5_1_1_tiny_moe.gin", "gin/routing/st_moe.gin",
                    bindings=["EMBED_DIM = 64", "MLP_DIM = 128",
                              "NUM_HEADS = 4", "VOCAB_SIZE = 259",
                              "TRAIN_CAPACITY_FACTOR = 2.5",
                              "EVAL_CAPACITY_FACTOR = 4.0"])
  assert config == current
  assert config.encoder_moe.extra_dense_ffn
  # The old formula: C = max(1, round(k * factor * S / E)), k = 2, E = 8.
  layer = config.encoder_moe.layer
  for size, factor in ((64, 1.25), (100, 1.25), (7, 2.0)):
    old = min(max(1, round(2 * factor * size / 8)), size)
    assert layer.capacity(size, deterministic=factor == 2.0) == old


def test_saved_config_without_the_capacity_convention_is_upgraded(tmp_path):
  """A run saved before T5X's convention (flat, its factors meant k * C)
  is refused; the upgrade scales only its top-k stacks; a saved config of
  today passes."""
  gin_utils.parse(["gin/models/t5_1_1_tiny_moe.gin",
                   "gin/routing/expert_choice.gin"])
  today = gin.config_str()
  assert gin_upgrade.CAPACITY_MARKER in today
  assert gin_upgrade.capacity_reason(today) is None
  old = today.replace(gin_upgrade.CAPACITY_MARKER, "")
  saved = tmp_path / "config.gin"
  saved.write_text(old)
  with pytest.raises(ValueError, match="CAPACITY_CONVENTION"):
    gin_utils.parse([str(saved)])
  saved.write_text(gin_upgrade.upgrade(old))
  config = _config(str(saved))
  # Encoder: expert choice (k = 1, factors as saved); decoder: top-2.
  assert config.encoder_moe.layer.train_capacity_factor == 2.0
  assert config.decoder_moe.layer.train_capacity_factor == 2.5
  assert config.decoder_moe.layer.eval_capacity_factor == 4.0
  # Written gin files (not saved configurations) and --gin bindings are
  # today's convention.
  _config("gin/models/t5_1_1_tiny_moe.gin", "gin/routing/expert_choice.gin",
          bindings=["layer.MoeLayer.train_capacity_factor = 2.0"])


def test_upgrade_keeps_stacks_apart_and_reads_blocks():
  """Scoped knobs stay with their stack; `config.MoeConfig:` blocks too."""
  old = """from __gin__ import dynamic_registration
from moe_jax.models import config
from moe_jax.moe import routers
include 'gin/models/arch/t5_1_1.gin'
include 'gin/models/sizes/tiny.gin'
config.TransformerConfig.encoder_moe = @encoder/config.MoeConfig()
config.TransformerConfig.decoder_moe = @decoder/config.MoeConfig()
config.MoeConfig:
  num_experts = 4
  sparse_every = 1
encoder/config.MoeConfig.router = @encoder/routers.ExpertChoiceRouter()
decoder/config.MoeConfig.router = @decoder/routers.TokenChoiceRouter()
decoder/config.MoeConfig.train_capacity_factor = 3.0
"""
  assert "config.MoeConfig.num_experts" in gin_upgrade.reason(old)
  new = gin_upgrade.upgrade(old)
  assert gin_upgrade.reason(new) is None
  gin.clear_config()
  gin.add_config_file_search_path(str(GIN.parent))
  gin.parse_config(new)
  config = configured_model_config()
  encoder, decoder = config.encoder_moe, config.decoder_moe
  assert type(encoder.layer.router).__name__ == "ExpertChoiceRouter"
  assert type(decoder.layer.router).__name__ == "TokenChoiceRouter"
  assert (encoder.layer.num_experts, decoder.layer.num_experts) == (4, 4)
  assert (encoder.layer.train_capacity_factor,
          decoder.layer.train_capacity_factor) == (1.25, 3.0)
  assert encoder.sparse_every == decoder.sparse_every == 1
