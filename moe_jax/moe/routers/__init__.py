"""Every router, each a `moe_jax.moe.routing.Router`.

One module per router family; all are re-exported here, so code and gin
name them alike (`routers.TokenChoiceRouter`, `routers.NoisyTopKRouter`).
Each is selectable from gin (`gin/routing/<name>.gin`).
"""

from moe_jax.moe.routers.aux_free import AuxLossFreeRouter
from moe_jax.moe.routers.base_layers import BaseLayerRouter
from moe_jax.moe.routers.dselect_k import DSelectKRouter
from moe_jax.moe.routers.expert_choice import ExpertChoiceRouter
from moe_jax.moe.routers.hash_layers import HashRouter
from moe_jax.moe.routers.noisy_top_k import NoisyTopKRouter
from moe_jax.moe.routers.token_choice import (SecondExpertPolicy,
                                              TokenChoiceRouter)

__all__ = ["AuxLossFreeRouter", "BaseLayerRouter", "DSelectKRouter",
           "ExpertChoiceRouter", "HashRouter", "NoisyTopKRouter",
           "SecondExpertPolicy", "TokenChoiceRouter"]
