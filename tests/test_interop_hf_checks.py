"""Every HF importer refuses, naming the key or setting: left-over weights,
wrong shapes (at import), the wrong model_type, non-finite weights (unless
allow_non_finite=True)."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from moe_jax.interop import hf_mixtral, hf_switch, hf_t5
from tests import test_interop_hf, test_interop_hf_mixtral
from tests import test_interop_hf_switch
from tests.hf_helpers import transformers

# (importer module, its import function, a tiny HF model, a weight of the
# last decoder layer).
IMPORTERS = {
    "t5": (hf_t5, hf_t5.import_t5, test_interop_hf.hf_model,
           "decoder.block.2.layer.2.DenseReluDense.wo.weight"),
    "switch": (hf_switch, hf_switch.import_switch,
               test_interop_hf_switch.hf_model,
               "decoder.block.1.layer.2.mlp.experts.expert_3.wo.weight"),
    "mixtral": (hf_mixtral, hf_mixtral.import_mixtral,
                test_interop_hf_mixtral.hf_model,
                "model.layers.1.self_attn.k_proj.weight"),
}
LAST_LAYER = {"t5": "decoder.block.2.", "switch": "decoder.block.1.",
              "mixtral": "model.layers.1."}


def setup(name):
  module, import_fn, make_model, key = IMPORTERS[name]
  model = make_model()
  weights = {k: v.numpy() for k, v in model.state_dict().items()}
  return module, import_fn, module.config_from_hf(model.config), weights, key


@pytest.mark.parametrize("name", sorted(IMPORTERS))
def test_left_over_layers(name):
  # One decoder layer fewer (Switch: the dense first one alone).
  _, import_fn, config, weights, _ = setup(name)
  fewer = dataclasses.replace(
      config, num_decoder_layers=config.num_decoder_layers - 1,
      decoder_moe=(config.decoder_moe if name != "switch" else None))
  with pytest.raises(ValueError, match="left unused by the config.*: " +
                     re.escape(LAST_LAYER[name])):
    import_fn(weights, fewer)


@pytest.mark.parametrize("name", sorted(IMPORTERS))
def test_wrong_shape(name):
  _, import_fn, config, weights, key = setup(name)
  weights[key] = weights[key][..., :-1]
  with pytest.raises(ValueError, match=f"{key} has shape"):
    import_fn(weights, config)


@pytest.mark.parametrize("name", sorted(IMPORTERS))
def test_non_finite_needs_the_opt_in(name):
  _, import_fn, config, weights, key = setup(name)
  weights[key] = weights[key].copy()
  weights[key].flat[3] = np.nan
  with pytest.raises(ValueError, match=f"{key} holds 1 non-finite.*"
                     "allow_non_finite"):
    import_fn(weights, config)
  params = import_fn(weights, config, allow_non_finite=True)
  assert any(np.isnan(np.asarray(leaf)).any() for leaf in
             jax.tree.leaves(params))


@pytest.mark.parametrize("name, other", [
    ("t5", transformers.MixtralConfig()),
    ("switch", transformers.MixtralConfig()),
    ("switch", transformers.T5Config(feed_forward_proj="gated-gelu")),
    ("mixtral", transformers.SwitchTransformersConfig()),
])
def test_wrong_model_type(name, other):
  with pytest.raises(ValueError, match=f"model_type must be .*model_type="
                     f"'{other.model_type}'"):
    IMPORTERS[name][0].config_from_hf(other)
