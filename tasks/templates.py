"""Prompt templates rendered inside tf.data: options block, few-shot joins.

A template is a `str.format` pattern over an example's string fields. Each
example is rendered with one of a task's templates, chosen by a hash of its
first field so the choice is stable across runs.
"""

import string
from typing import Mapping, Sequence

import tensorflow as tf

# The same prompt layout as the generated mini_flan tasks.
from tasks.mini_flan_generators import FEWSHOT_SEPARATOR, OPTIONS_HEADER

OPTION_BULLET = "\n- "
ANSWER_SEPARATOR = "\n"


def render(pattern: str, fields: Mapping[str, tf.Tensor]) -> tf.Tensor:
  """<string>[] `pattern` with each {name} replaced by fields[name]."""
  pieces = []
  for literal, name, _, _ in string.Formatter().parse(pattern):
    if literal:
      pieces.append(tf.constant(literal))
    if name is not None:
      if name not in fields:
        raise ValueError(f"template {pattern!r}: unknown field {name!r}; "
                         f"fields are {sorted(fields)}")
      pieces.append(fields[name])
  return tf.strings.join(pieces) if pieces else tf.constant("")


def options_block(options: tf.Tensor) -> tf.Tensor:
  """<string>[] options block for <string>[n] option texts."""
  return tf.strings.join(
      [OPTIONS_HEADER, tf.strings.reduce_join(OPTION_BULLET + options)])


def render_one_of(patterns: Sequence[str], fields: Mapping[str, tf.Tensor],
                  key: tf.Tensor) -> tf.Tensor:
  """<string>[] rendering with patterns[hash(key) % len(patterns)]."""
  rendered = tf.stack([render(p, fields) for p in patterns])
  index = tf.strings.to_hash_bucket_fast(key, len(patterns))
  return tf.gather(rendered, index)


def join_fewshot(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Flattens seqio FewshotDataSource output to one `inputs`/`targets` pair.

  Each solved shot is `inputs ANSWER_SEPARATOR targets`; shots and the final
  question are separated by FEWSHOT_SEPARATOR.
  """
  def fn(ex):
    shots = tf.strings.join(
        [ex["train"]["inputs"], ANSWER_SEPARATOR, ex["train"]["targets"]])
    inputs = tf.strings.join(
        [tf.strings.reduce_join(shots + FEWSHOT_SEPARATOR),
         ex["eval"]["inputs"]])
    return {"inputs": inputs, "targets": ex["eval"]["targets"]}
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
