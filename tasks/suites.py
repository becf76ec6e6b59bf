"""Evaluation suites: one task per (item, mode) and one mixture per mode.

A suite such as MMLU or BBH is a list of items (subjects, tasks) read in a
few modes (shot counts, prompt styles). `register_suite` registers the task
`<prefix>_<item>_<mode>` for each pair, tokenized with EOS appended, and the
mixture `<prefix>_<mode>` of every item at equal rates.
"""

import functools
from typing import Callable, Dict, Iterable, List, Mapping, Sequence

import seqio
import tensorflow as tf

Rows = List[Dict[str, str]]  # {"inputs", "targets"} per example.
# (item, mode value, split) -> rows, read when the dataset is requested.
RowsFn = Callable[[str, object, str], Rows]


def _dataset(split: str, shuffle_files: bool, seed=None, *, rows: RowsFn,
             item: str, mode: object) -> tf.data.Dataset:
  del shuffle_files, seed  # Fixed order; seqio shuffles with `seed`.
  examples = rows(item, mode, split)
  return tf.data.Dataset.from_tensor_slices(
      {k: tf.constant([r[k] for r in examples], tf.string)
       for k in ("inputs", "targets")})


def register_suite(prefix: str, items: Iterable[str],
                   modes: Mapping[str, object], rows: RowsFn, *,
                   splits: Sequence[str],
                   metric_fns: Sequence[Callable],
                   features: Mapping[str, seqio.Feature]) -> None:
  """Registers `<prefix>_<item>_<mode>` tasks and `<prefix>_<mode>` mixtures.

  `modes` maps the name used in task names to the value passed to `rows`
  (e.g. {"5shot": 5}). SeqIO refuses names already registered.
  """
  post = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos]
  items = tuple(items)
  for mode_name, mode in modes.items():
    names = [f"{prefix}_{item}_{mode_name}" for item in items]
    for item, name in zip(items, names):
      seqio.TaskRegistry.add(
          name, source=seqio.FunctionDataSource(
              functools.partial(_dataset, rows=rows, item=item, mode=mode),
              splits=tuple(splits)),
          preprocessors=post, output_features=features,
          metric_fns=list(metric_fns))
    seqio.MixtureRegistry.add(f"{prefix}_{mode_name}", names,
                              default_rate=1.0)
