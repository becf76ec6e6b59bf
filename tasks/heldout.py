"""The held-out evaluation mixture of FLAN-MoE (Shen et al.), as far as its
data can be supplied locally: MMLU few-shot, BBH direct (3-shot) and the
math reasoning problems with chain-of-thought. Its QA benchmarks are not
registered. `moe_jax.train.eval_averages` averages it per benchmark.
"""

import seqio

NAME = "flan_moe_heldout"
SUITES = ("mmlu_5shot", "bbh_direct", "reasoning_cot")


def register() -> None:
  """Registers NAME, each suite mixture once (equal rates)."""
  seqio.MixtureRegistry.add(NAME, [(suite, 1.0) for suite in SUITES])
