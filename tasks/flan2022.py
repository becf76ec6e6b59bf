"""SeqIO registration of the FLAN 2022 mixture: flan2021, t0, niv2, cot, dialog.

Registered names:
  flan2022_<submix>_<dataset>_<variant>   templated TFDS / CoT-file tasks
  flan2022_<submix>_export_<variant>      JSONL exports (not for cot)
  flan2022_<submix>                       capped example-proportional mixture
  flan2022                                the sub-mixtures at fixed weights
Variants: zs_opt, zs_noopt, fs_opt, fs_noopt (cot, niv2, dialog: *_opt only).

Mixing follows the FLAN collection (flan/v2/mixtures.py, run_example.py):
every task of a sub-mixture's variant gets a rate proportional to
min(its train examples, cap[submix]); the variants of a sub-mixture share it
equally; `flan2022` weighs the sub-mixtures by weight[submix]. A JSONL export
holds many tasks and is mixed by each example's `task_name`
(`capped_source`): its rate is the sum of its tasks' capped sizes, and it
draws each task in that proportion. Rates are computed when a mixture is
first used; caps and weights are gin knobs of `mixing`.
"""

import functools
from typing import Callable, Dict, List, Mapping, Tuple

import gin
import seqio
import tensorflow as tf

from tasks import capped_source
from tasks import flan2022_sources as src
from tasks import metrics
from tasks import templates

DEFAULT_CAPS = {"flan2021": 30_000, "t0": 20_000, "niv2": 5_000,
                "cot": 100_000, "dialog": 200_000}
DEFAULT_WEIGHTS = {"flan2021": 0.4, "t0": 0.32, "niv2": 0.2, "cot": 0.05,
                   "dialog": 0.03}
NUM_SHOTS = 3
RATE_SPLIT = "train"


@gin.configurable
def mixing(caps: Mapping[str, int] = DEFAULT_CAPS,
           weights: Mapping[str, float] = DEFAULT_WEIGHTS
           ) -> Tuple[Dict[str, int], Dict[str, float]]:
  """Per-sub-mixture example caps and final weights (gin-overridable)."""
  for knob, values in (("caps", caps), ("weights", weights)):
    if set(values) != set(src.SUBMIXES):
      raise ValueError(f"mixing.{knob}: keys {sorted(values)} must be "
                       f"{sorted(src.SUBMIXES)}")
    if any(v <= 0 for v in values.values()):
      raise ValueError(f"mixing.{knob}: values must be positive: {values}")
  return dict(caps), dict(weights)


class FewshotSource(seqio.experimental.FewshotDataSource):
  """FewshotDataSource that reports its original source's example count
  (one few-shot example per original example), so rates can use it."""

  def __init__(self, original_source: seqio.DataSource, **kwargs):
    super().__init__(original_source, **kwargs)
    self._counted_source = original_source

  def num_input_examples(self, split: str) -> int:
    return self._counted_source.num_input_examples(split)


def capped_size(task: seqio.Task, submix: str) -> float:
  """Examples of `task` one epoch of the mixture draws: min(train examples,
  cap of `submix`), summed over the tasks of a by-task export."""
  if isinstance(task.source, capped_source.CappedJsonlSource):
    return float(task.num_input_examples(RATE_SPLIT))  # capped by task
  caps, _ = mixing()
  return float(min(task.num_input_examples(RATE_SPLIT), caps[submix]))


def _rate(task: seqio.Task, submix: str, variants: Tuple[Tuple[str, ...], ...],
          weight: Callable[[str], float]) -> float:
  """weight(submix) / len(variants) * capped size of `task` / capped size of
  its variant (the tuple of `variants` holding it)."""
  siblings = next(v for v in variants if task.name in v)
  total = sum(capped_size(seqio.TaskRegistry.get(n), submix)
              for n in siblings)
  return weight(submix) / len(variants) * capped_size(task, submix) / total


def _submix_weight(submix: str) -> float:
  return mixing()[1][submix]


def _rated(submix: str, variants: Tuple[Tuple[str, ...], ...],
           weight: Callable[[str], float]) -> List[Tuple[str, Callable]]:
  """(task name, rate function) for every task of `variants`."""
  return [(name, functools.partial(_rate, submix=submix, variants=variants,
                                   weight=weight))
          for names in variants for name in names]


def _to_text(ex, dataset: src.FlanDataset, with_options: bool):
  fields = dataset.to_fields(ex)
  key = fields[next(k for k in fields if k not in ("answer", "options"))]
  inputs = templates.render_one_of(dataset.prompts, fields, key)
  if with_options and "options" in fields:
    inputs = tf.strings.join([inputs, templates.options_block(
        fields["options"])])
  return {"inputs": inputs, "targets": fields["answer"]}


def _map(dataset: tf.data.Dataset, fn) -> tf.data.Dataset:
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def task_name(submix: str, dataset: str, variant: str) -> str:
  return f"flan2022_{submix}_{dataset}_{variant}"


def _register_dataset(dataset: src.FlanDataset, features, post
                      ) -> List[Tuple[str, str]]:
  """Registers each variant of `dataset`; [(variant, task name)]."""
  names = []
  for variant in dataset.variants():
    render = functools.partial(
        _map, fn=functools.partial(_to_text, dataset=dataset,
                                   with_options=variant.endswith("_opt")))
    if variant.startswith("fs"):
      source = FewshotSource(
          dataset.source(), num_shots=NUM_SHOTS, train_preprocessors=[render],
          eval_preprocessors=[render])
      pre = [templates.join_fewshot]
    else:
      source, pre = dataset.source(), [render]
    name = task_name(dataset.submix, dataset.name, variant)
    seqio.TaskRegistry.add(name, source=source, preprocessors=pre + post,
                           output_features=features,
                           metric_fns=[metrics.exact_match])
    names.append((variant, name))
  return names


def export_source(submix: str, variant: str) -> seqio.DataSource:
  """The task-capped JSONL source of `submix`'s export file for `variant`."""
  return capped_source.CappedJsonlSource(
      src.export_file(submix, variant), src.EXPORT_FIELDS, "task_name",
      cap=lambda: mixing()[0][submix],
      description=f"FLAN 2022 export of {submix} ({variant}; JSONL with "
      f"fields {', '.join(src.EXPORT_FIELDS)})")


def register(features: Mapping[str, seqio.Feature]) -> None:
  """Registers every FLAN 2022 task and mixture (duplicates raise)."""
  post = [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim]
  by_variant: Dict[str, Dict[str, List[str]]] = {
      s: {v: [] for v in src.SUBMIX_VARIANTS[s]} for s in src.SUBMIXES}
  for dataset in src.DATASETS:
    for variant, name in _register_dataset(dataset, features, post):
      by_variant[dataset.submix][variant].append(name)
  for submix in src.EXPORT_SUBMIXES:
    for variant in src.SUBMIX_VARIANTS[submix]:
      name = task_name(submix, "export", variant)
      seqio.TaskRegistry.add(
          name, source=export_source(submix, variant),
          preprocessors=post, output_features=features,
          metric_fns=[metrics.exact_match])
      by_variant[submix][variant].append(name)
  entries = []
  for submix, variants in by_variant.items():
    groups = tuple(tuple(names) for names in variants.values() if names)
    seqio.MixtureRegistry.add(f"flan2022_{submix}",
                              _rated(submix, groups, lambda _: 1.0))
    entries += _rated(submix, groups, _submix_weight)
  seqio.MixtureRegistry.add("flan2022", entries)
