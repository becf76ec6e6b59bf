"""Names of the per-layer values an MoE layer sows into `intermediates`.

These strings are a contract: T5X's MoE models read them from the sown
collection. Writers (`moe_jax.moe.layer`) and readers (trainers, inspection, the
T5X adapter) import them from here instead of spelling them out.
"""

INTERMEDIATES = "intermediates"

AUXILIARY_LOSS = "auxiliary_loss"
ROUTER_Z_LOSS = "router_z_loss"
FRACTION_TOKENS_LEFT_BEHIND = "fraction_tokens_left_behind"
ROUTER_CONFIDENCE = "router_confidence"
EXPERT_USAGE = "expert_usage"
EXPERT_LOAD = "expert_load"
ROUTER_ENTROPY = "router_entropy"

SCALAR_METRICS = (
    AUXILIARY_LOSS,
    ROUTER_Z_LOSS,
    FRACTION_TOKENS_LEFT_BEHIND,
    ROUTER_CONFIDENCE,
    EXPERT_USAGE,
)
# Per-layer scalars beyond the five T5X reads (`experts/<name>` stays those
# five); moe_jax's trainer logs them beside SCALAR_METRICS.
EXTRA_SCALAR_METRICS = (ROUTER_ENTROPY,)
ALL = SCALAR_METRICS + EXTRA_SCALAR_METRICS + (EXPERT_LOAD,)

# Opt-in per-token routing capture. An MoE layer sows these only when the
# caller makes the ROUTING collection mutable (inspection); training and T5X
# never request it, so their programs are unchanged.
ROUTING = "routing"

ROUTER_PROBS = "router_probs"        # <float32>[G, S, E]
DISPATCH_MASK = "dispatch_mask"      # <bool>[G, S, E]
COMBINE_WEIGHTS = "combine_weights"  # <float32>[G, S, E]
TOKEN_MASK = "token_mask"            # <float32>[G, S]

ROUTING_CAPTURE = (ROUTER_PROBS, DISPATCH_MASK, COMBINE_WEIGHTS, TOKEN_MASK)

# Router state that changes outside the gradient (the selection bias of
# `moe_jax.moe.routers.aux_free`): a variable collection beside `params`.
ROUTER_STATE = "router_state"
