"""SeqIO tasks and mixtures of moe_jax; importing this package registers all.

Registration happens in one place, `register_all()`, called once below.
"""

from tasks import mini_flan


def register_all() -> None:
  """Registers every task and mixture of the project (duplicates raise)."""
  mini_flan.register()


register_all()
