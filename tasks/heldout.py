"""The held-out evaluation mixture of FLAN-MoE (Shen et al.), as far as its
data can be supplied locally: MMLU few-shot, BBH direct (3-shot), the
reasoning problems (math and StrategyQA) with chain-of-thought and the QA
benchmarks (ARC, BoolQ) answered directly. `moe_jax.train.eval_averages`
averages it per benchmark (docs/evals.md).
"""

import seqio

NAME = "flan_moe_heldout"
SUITES = ("mmlu_5shot", "bbh_direct", "reasoning_cot", "qa_direct")


def register() -> None:
  """Registers NAME, each suite mixture once (equal rates)."""
  seqio.MixtureRegistry.add(NAME, [(suite, 1.0) for suite in SUITES])
