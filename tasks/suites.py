"""Evaluation suites: one task per (item, mode) and one mixture per mode.

A suite such as MMLU or BBH is a list of items (subjects, tasks) read in a
few modes (shot counts, prompt styles). `register_suite` registers the task
`<prefix>_<item>_<mode>` for each pair, tokenized with EOS appended, and the
mixture `<prefix>_<mode>` of every item at equal rates. Those tasks are
scored on generated text (their `metric_fns`).

For rank classification, rows also carry "options" (the candidate targets,
one of them the row's "targets"): each `rank_modes` mode gets tasks
`<prefix>_<item>_<mode>_rank` (items in `rank_items`) with one row per
option, scored by the model's log-likelihood of the option; the metric
`rank_accuracy` counts the examples whose best option is the target. Their
mixture is `<prefix>_<mode>_rank`.
"""

import functools
from typing import (Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence)

import seqio
import tensorflow as tf

from tasks import metrics

# {"inputs", "targets"} per example; rank suites add "options": [str].
Rows = List[Dict[str, object]]
# (item, mode value, split) -> rows, read when the dataset is requested.
RowsFn = Callable[[str, object, str], Rows]


def _dataset(split: str, shuffle_files: bool, seed=None, *, rows: RowsFn,
             item: str, mode: object) -> tf.data.Dataset:
  del shuffle_files, seed  # Fixed order; seqio shuffles with `seed`.
  examples = rows(item, mode, split)
  return tf.data.Dataset.from_tensor_slices(
      {k: tf.constant([r[k] for r in examples], tf.string)
       for k in ("inputs", "targets")})


def option_rows(examples: Iterable[Mapping[str, object]], name: str
                ) -> tf.data.Dataset:
  """One row per (example, option): inputs, the option as targets, the
  example's index `idx` and whether the option `is_correct`. ValueError
  (naming task `name`) when an example's options lack its target."""
  out = {"inputs": [], "targets": [], "idx": [], "is_correct": []}
  for idx, row in enumerate(examples):
    options = row.get("options")
    if not options or row["targets"] not in options:
      raise ValueError(f"{name}: example {idx} needs 'options' holding its "
                       f"target {row['targets']!r}; got {options!r}")
    for option in options:
      out["inputs"].append(row["inputs"])
      out["targets"].append(option)
      out["idx"].append(idx)
      out["is_correct"].append(option == row["targets"])
  return tf.data.Dataset.from_tensor_slices(out)


def _option_dataset(split: str, shuffle_files: bool, seed=None, *,
                    rows: RowsFn, item: str, mode: object, name: str
                    ) -> tf.data.Dataset:
  del shuffle_files, seed
  return option_rows(rows(item, mode, split), f"{name} ({split})")


def option_row_target(text, example=None, is_target=False):
  """Postprocessor of rank tasks: a target becomes (example index, whether
  its option is correct), what `metrics.option_rank_accuracy` reads."""
  if is_target:
    return int(example["idx"]), bool(example["is_correct"])
  return text


def register_suite(prefix: str, items: Iterable[str],
                   modes: Mapping[str, object], rows: RowsFn, *,
                   splits: Sequence[str],
                   metric_fns: Sequence[Callable],
                   features: Mapping[str, seqio.Feature],
                   item_metric_fns: Optional[
                       Mapping[str, Sequence[Callable]]] = None,
                   rank_modes: Sequence[str] = (),
                   rank_items: Optional[Iterable[str]] = None) -> None:
  """Registers `<prefix>_<item>_<mode>` tasks and `<prefix>_<mode>` mixtures,
  and the rank tasks and mixtures of `rank_modes` (module docstring).

  `modes` maps the name used in task names to the value passed to `rows`
  (e.g. {"5shot": 5}). Generated text is scored by `metric_fns`, or by
  `item_metric_fns[item]` for the items it names (an item answered
  differently). `rank_items` defaults to every item. SeqIO refuses names
  already registered.
  """
  post = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos]
  items = tuple(items)
  item_metric_fns = item_metric_fns or {}
  unknown = sorted(set(item_metric_fns) - set(items))
  if unknown:
    raise ValueError(f"{prefix}: item_metric_fns names unknown items "
                     f"{unknown}")
  ranked = items if rank_items is None else tuple(rank_items)
  for mode_name, mode in modes.items():
    names = [f"{prefix}_{item}_{mode_name}" for item in items]
    for item, name in zip(items, names):
      seqio.TaskRegistry.add(
          name, source=seqio.FunctionDataSource(
              functools.partial(_dataset, rows=rows, item=item, mode=mode),
              splits=tuple(splits)),
          preprocessors=post, output_features=features,
          metric_fns=list(item_metric_fns.get(item, metric_fns)))
    seqio.MixtureRegistry.add(f"{prefix}_{mode_name}", names,
                              default_rate=1.0)
    if mode_name not in rank_modes:
      continue
    rank_names = [f"{prefix}_{item}_{mode_name}_rank" for item in ranked]
    for item, name in zip(ranked, rank_names):
      seqio.TaskRegistry.add(
          name, source=seqio.FunctionDataSource(
              functools.partial(_option_dataset, rows=rows, item=item,
                                mode=mode, name=name),
              splits=tuple(splits)),
          preprocessors=post, output_features=features,
          postprocess_fn=option_row_target,
          metric_fns=[metrics.option_rank_accuracy])
    seqio.MixtureRegistry.add(f"{prefix}_{mode_name}_rank", rank_names,
                              default_rate=1.0)
