"""SeqIO registration of the built-in `mini_flan` instruction suite.

Registered names (see tasks/README.md):
  mini_flan_<task>_zs            zero-shot, options block where the task has one
  mini_flan_<task>_zs_noopt      zero-shot without options (option tasks only)
  mini_flan_<task>_fs            few-shot (NUM_SHOTS solved examples first)
  mixtures: mini_flan, mini_flan_<cluster>, mini_flan_train_without_<cluster>,
            mini_flan_eval_<cluster> (zero-shot variants of the held-out cluster)
  mini_flan_span_corruption, mini_flan_prefix_lm  (pre-training corpus)
"""

import functools
import zlib
from typing import Dict, Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf

from tasks import mini_flan_generators as gen

DEFAULT_VOCABULARY = seqio.ByteVocabulary()
NUM_SHOTS = 2
DEFAULT_SEED = 0
PRETRAIN_SPLIT_SIZES = {"train": 2000, "validation": 100, "test": 100}
NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def output_features(vocabulary: seqio.Vocabulary = DEFAULT_VOCABULARY
                    ) -> Dict[str, seqio.Feature]:
  return {
      "inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
      "targets": seqio.Feature(vocabulary, add_eos=True),
  }


def _text_dataset(split: str, shuffle_files: bool, seed: Optional[int] = None,
                  *, task: gen.GenTask, num_shots: int, with_options: bool,
                  data_seed: int, sizes: Mapping[str, int]) -> tf.data.Dataset:
  # Generation order is fixed by `data_seed`; seqio shuffles with `seed`.
  del shuffle_files, seed
  examples = list(gen.generate_examples(task, split, data_seed, sizes[split],
                                        num_shots, with_options))
  return tf.data.Dataset.from_tensor_slices({
      "inputs": [e["inputs"] for e in examples],
      "targets": [e["targets"] for e in examples],
  })


def exact_match(targets, predictions) -> Dict[str, float]:
  """Percentage of predictions equal to their target string."""
  hits = [t == p for t, p in zip(targets, predictions)]
  return {"exact_match": 100.0 * float(np.mean(hits)) if hits else 0.0}


def instruction_task_names(task: gen.GenTask) -> Dict[str, str]:
  """Variant -> registered task name for one generated task."""
  names = {"zs": f"mini_flan_{task.name}_zs", "fs": f"mini_flan_{task.name}_fs"}
  if task.has_options:
    names["zs_noopt"] = f"mini_flan_{task.name}_zs_noopt"
  return names


def register(seed: int = DEFAULT_SEED,
             split_sizes: Mapping[str, int] = gen.DEFAULT_SPLIT_SIZES,
             vocabulary: seqio.Vocabulary = DEFAULT_VOCABULARY) -> None:
  """Registers every mini_flan task and mixture (duplicates raise)."""
  features = output_features(vocabulary)
  preprocessors = [seqio.preprocessors.tokenize,
                   seqio.CacheDatasetPlaceholder(),
                   seqio.preprocessors.append_eos_after_trim]
  all_names, by_cluster, zs_by_cluster = [], {}, {}
  for task in gen.TASKS:
    for variant, name in instruction_task_names(task).items():
      fn = functools.partial(
          _text_dataset, task=task, num_shots=NUM_SHOTS if variant == "fs" else 0,
          with_options=variant != "zs_noopt", data_seed=seed,
          sizes=split_sizes)
      seqio.TaskRegistry.add(
          name,
          source=seqio.FunctionDataSource(fn, splits=gen.SPLITS),
          preprocessors=preprocessors,
          output_features=features,
          metric_fns=[exact_match])
      all_names.append(name)
      by_cluster.setdefault(task.cluster, []).append(name)
      if variant != "fs":
        zs_by_cluster.setdefault(task.cluster, []).append(name)
  seqio.MixtureRegistry.add("mini_flan", all_names, default_rate=1.0)
  for cluster in gen.CLUSTERS:
    seqio.MixtureRegistry.add(f"mini_flan_{cluster}", by_cluster[cluster],
                              default_rate=1.0)
    seqio.MixtureRegistry.add(
        f"mini_flan_train_without_{cluster}",
        [n for n in all_names if n not in by_cluster[cluster]],
        default_rate=1.0)
    seqio.MixtureRegistry.add(f"mini_flan_eval_{cluster}",
                              zs_by_cluster[cluster], default_rate=1.0)
  _register_pretraining(seed, features)


def _corpus_dataset(split: str, shuffle_files: bool,
                    seed: Optional[int] = None, *,
                    data_seed: int) -> tf.data.Dataset:
  del shuffle_files, seed
  docs = list(gen.pretraining_corpus(data_seed, split,
                                     PRETRAIN_SPLIT_SIZES[split]))
  return tf.data.Dataset.from_tensor_slices({"text": docs})


def noise_mask(length: int, rng: np.random.Generator,
               noise_density: float = NOISE_DENSITY,
               mean_span: float = MEAN_NOISE_SPAN_LENGTH) -> np.ndarray:
  """<bool>[length] mask of corrupted tokens: alternating kept / noise spans.

  round(length * noise_density) noise tokens (at least 1, at most length - 1)
  in round(noise / mean_span) spans (at least 1); span lengths are a random
  composition of the totals; the sequence starts with a kept span.
  """
  if length < 2:
    return np.zeros([length], bool)
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_span)), 1)
  num_spans = min(num_spans, num_noise, length - num_noise)

  def composition(total, parts):
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))

  noise = composition(num_noise, num_spans)
  kept = composition(length - num_noise, num_spans)
  mask = np.concatenate([np.concatenate([np.zeros(k, bool), np.ones(n, bool)])
                         for k, n in zip(kept, noise)])
  return mask


def span_corrupt_ids(ids: np.ndarray, mask: np.ndarray, vocab_size: int
                     ) -> Dict[str, np.ndarray]:
  """Replaces each noise span by a sentinel (vocab_size - 1 - span index).

  Returns inputs (kept tokens, sentinel per noise span) and targets (sentinel
  then the span's tokens, per span), as T5's span corruption.
  """
  inputs, targets, span = [], [], -1
  for i, (tok, noisy) in enumerate(zip(ids, mask)):
    starts = noisy and (i == 0 or not mask[i - 1])
    if starts:
      span += 1
    sentinel = vocab_size - 1 - span
    if noisy:
      if starts:
        inputs.append(sentinel)
        targets.append(sentinel)
      targets.append(tok)
    else:
      inputs.append(tok)
  return {"inputs": np.asarray(inputs, np.int32),
          "targets": np.asarray(targets, np.int32)}


def _span_corruption(dataset: tf.data.Dataset,
                     output_features: Mapping[str, seqio.Feature],
                     ) -> tf.data.Dataset:
  vocab_size = output_features["targets"].vocabulary.vocab_size

  def corrupt(ids):
    # Seeded by the content so the same document is always corrupted alike.
    rng = np.random.default_rng(zlib.crc32(ids.tobytes()))
    out = span_corrupt_ids(ids, noise_mask(len(ids), rng), vocab_size)
    return out["inputs"], out["targets"]

  def fn(ex):
    inputs, targets = tf.numpy_function(corrupt, [ex["targets"]],
                                        [tf.int32, tf.int32])
    return {"inputs": tf.ensure_shape(inputs, [None]),
            "targets": tf.ensure_shape(targets, [None])}
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _prefix_lm(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Splits each document at a random token: inputs prefix, targets rest."""
  def fn(ex):
    ids = ex["targets"]
    n = tf.shape(ids)[0]
    cut = tf.random.stateless_uniform(
        [], seed=tf.stack([tf.cast(tf.reduce_sum(ids), tf.int32), n]),
        minval=1, maxval=tf.maximum(n, 2), dtype=tf.int32)
    return {"inputs": ids[:cut], "targets": ids[cut:]}
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _register_pretraining(seed: int, features: Mapping[str, seqio.Feature]
                          ) -> None:
  source = seqio.FunctionDataSource(
      functools.partial(_corpus_dataset, data_seed=seed), splits=gen.SPLITS)
  rekey = functools.partial(seqio.preprocessors.rekey,
                            key_map={"targets": "text"})
  seqio.TaskRegistry.add(
      "mini_flan_span_corruption", source=source,
      preprocessors=[rekey, seqio.preprocessors.tokenize,
                     seqio.CacheDatasetPlaceholder(), _span_corruption,
                     seqio.preprocessors.append_eos_after_trim],
      output_features=features)
  seqio.TaskRegistry.add(
      "mini_flan_prefix_lm", source=source,
      preprocessors=[rekey, seqio.preprocessors.tokenize,
                     seqio.CacheDatasetPlaceholder(), _prefix_lm,
                     seqio.preprocessors.append_eos_after_trim],
      output_features=features)
