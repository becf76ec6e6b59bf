"""Pre-training objectives for any text task: span corruption and prefix LM.

`pretraining_preprocessors(objective, text_key)` gives the seqio preprocessor
list that turns a source with one text field into (inputs, targets) pairs;
`register_pretraining_task` registers such a task in one call.
"""

import functools
import zlib
from typing import Dict, Mapping

import numpy as np
import seqio
import tensorflow as tf

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
OBJECTIVES = ("span_corruption", "prefix_lm")


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


def pretraining_preprocessors(objective: str, text_key: str = "text"):
  """Preprocessors: rekey `text_key` -> targets, tokenize, apply objective."""
  if objective not in OBJECTIVES:
    raise ValueError(f"objective: {objective!r} is not one of {OBJECTIVES}")
  transform = {"span_corruption": _span_corruption,
               "prefix_lm": _prefix_lm}[objective]
  return [functools.partial(seqio.preprocessors.rekey,
                            key_map={"targets": text_key}),
          seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
          transform, seqio.preprocessors.append_eos_after_trim]


def register_pretraining_task(name: str, source: seqio.DataSource,
                              objective: str,
                              output_features: Mapping[str, seqio.Feature],
                              text_key: str = "text") -> seqio.Task:
  """Registers `name`: `objective` applied to the text field of `source`."""
  return seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=pretraining_preprocessors(objective, text_key),
      output_features=output_features)
