"""SeqIO tasks and mixtures of moe_jax; importing this package registers all.

Registration happens in one place, `register_all()`, called once below. No
file or network is touched until a dataset is requested.
"""

import seqio

from tasks import bbh
from tasks import flan2022
from tasks import heldout
from tasks import mini_flan
from tasks import mmlu
from tasks import qa
from tasks import reasoning
from tasks import seqio_logging
from tasks import vocab
from tasks.lookup import get_mixture_or_task  # noqa: F401


def text_features() -> dict:
  """inputs/targets features over the gin-chosen vocabulary."""
  vocabulary = vocab.ConfiguredVocabulary()
  return {"inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
          "targets": seqio.Feature(vocabulary, add_eos=True)}


def register_all() -> None:
  """Registers every task and mixture of the project (duplicates raise)."""
  mini_flan.register()
  features = text_features()
  flan2022.register(features)
  mmlu.register(features)
  bbh.register(features)
  reasoning.register(features)
  qa.register(features)
  heldout.register()


register_all()
seqio_logging.install()
