"""Evaluation with SeqIO: a decoding predict function and a rank-
classification score function over any moe_jax model.

Dimension names: B eval batch, Li input length, Lt target length, V vocab.

* `predict_fn`: cached greedy decoding, returning the target token ids:
  after the encoder (encoder-decoder), or continuing the inputs as a
  prompt (decoder-only prefix-LM; `moe_jax.models.generation`). A
  decoder-only LM objective has no prompt, so score-based metrics only
  (`moe_jax.train.eval_checks` says so before training).
* `score_fn`: the log-likelihood of each example's targets (sum over
  target tokens), which SeqIO's score metrics (rank classification) use.

`Evaluator.evaluate(params, step, model_state)` runs every task of a
mixture, writes the metrics to MODEL_DIR/eval/metrics_<step>.json
(metrics_<step>.<n>.json when that step was evaluated before: nothing is
overwritten) and TensorBoard (MODEL_DIR/tensorboard/eval), and returns
them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterator, Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf
from etils import epath

from moe_jax.models import Architecture, TransformerConfig, build_model
from moe_jax.models import decoding, generation
from moe_jax.paths import as_path
from moe_jax.train import eval_averages, eval_checks
from moe_jax.train.data import Objective, feature_converter
from moe_jax.train.metrics_log import TENSORBOARD_DIR
from moe_jax.train.step import model_inputs, model_variables

Array = jax.Array
Batch = dict[str, np.ndarray]
EVAL_DIR = "eval"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Attributes:
    mixture_or_task_name: tasks to evaluate (None: no evaluation).
    split: their split.
    task_feature_lengths: {"inputs": Li, "targets": Lt}; targets is also
      the maximum decode length.
    batch_size: B.
    num_examples: at most this many examples per task (None: all).
  """
  mixture_or_task_name: Optional[str] = None
  split: str = "validation"
  task_feature_lengths: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {"inputs": 256, "targets": 32})
  batch_size: int = 32
  num_examples: Optional[int] = None

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1; got batch_size="
                       f"{self.batch_size}")


def _batches(dataset: tf.data.Dataset, batch_size: int
             ) -> Iterator[tuple[np.ndarray, Batch, int]]:
  """(indices, features padded to B rows, number of real rows)."""
  for indices, features in dataset.batch(batch_size).as_numpy_iterator():
    real = len(indices)
    if real < batch_size:
      features = {k: np.pad(v, [(0, batch_size - real)] + [(0, 0)] *
                            (v.ndim - 1)) for k, v in features.items()}
    yield indices, features, real


class ModelFns:
  """Jitted predict and score functions of `config`'s model."""

  def __init__(self, config: TransformerConfig, objective: Objective,
               max_decode_length: int, eos_id: int = 1):
    self.model = build_model(config)
    self.decoder_only = (Architecture(config.architecture) ==
                         Architecture.DECODER_ONLY)
    if self.decoder_only == (Objective(objective) == Objective.ENC_DEC):
      raise ValueError(f"objective={Objective(objective).value} does not fit "
                       f"a {Architecture(config.architecture).value} model")
    self.objective = Objective(objective)
    self.max_decode_length = max_decode_length
    self.eos_id = eos_id
    self.score_batch = jax.jit(self._score)
    self.predict_batch = jax.jit(self._predict)

  def _score(self, params, batch: Batch, model_state=None) -> Array:
    """<float32>[B] log-likelihood of each row's targets (`model_state`:
    `TrainState.model_state`, here and below)."""
    logits = self.model.apply(model_variables(params, model_state),
                              **model_inputs(batch),
                              enable_dropout=False).logits
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    targets = batch["decoder_target_tokens"]
    on_target = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    return jnp.sum(on_target * batch["decoder_loss_weights"], axis=-1)

  def _predict(self, params, batch: Batch, model_state=None) -> Array:
    """<int32>[B, Lt] greedy target tokens of each row: after encoding
    batch['encoder_input_tokens'] (encoder-decoder), or continuing the
    prompt of batch['decoder_input_tokens'] where
    batch['decoder_causal_attention'] is 1 (decoder-only, prefix-LM)."""
    eval_checks.check_predict(self.objective)
    if self.decoder_only:
      start = generation.decoder_only(self.model, params,
                                      batch["decoder_input_tokens"],
                                      batch["decoder_causal_attention"],
                                      model_state)
    else:
      start = generation.encoder_decoder(self.model, params,
                                         batch["encoder_input_tokens"],
                                         self.max_decode_length, model_state)
    return start.run(decoding.greedy, self.max_decode_length,
                     eos_id=self.eos_id)

  def prompt_batch(self, inputs: np.ndarray) -> Batch:
    """The features `predict_batch` reads, from <int32>[B, Li] input ids
    (as the objective's feature converter lays them out)."""
    if not self.decoder_only:
      return {"encoder_input_tokens": inputs}
    tokens, causal = generation.prefix_lm_prompt(inputs,
                                                 self.max_decode_length)
    return {"decoder_input_tokens": tokens,
            "decoder_causal_attention": causal}

  def predict_fn(self, params, batch_size: int, model_state=None
                 ) -> Callable[..., list[tuple[int, list[int]]]]:
    def fn(dataset, model_feature_shapes=None):
      del model_feature_shapes
      out = []
      for indices, batch, real in _batches(dataset, batch_size):
        tokens = np.asarray(self.predict_batch(params, batch,
                                                   model_state))[:real]
        out += [(int(i), t.tolist()) for i, t in zip(indices, tokens)]
      return out
    return fn

  def score_fn(self, params, batch_size: int, model_state=None
               ) -> Callable[..., list[tuple[int, float]]]:
    def fn(dataset, model_feature_shapes=None):
      del model_feature_shapes
      out = []
      for indices, batch, real in _batches(dataset, batch_size):
        scores = np.asarray(self.score_batch(params, batch, model_state))[:real]
        out += [(int(i), float(s)) for i, s in zip(indices, scores)]
      return out
    return fn


class Evaluator:
  """Evaluates params on `config.mixture_or_task_name` with SeqIO."""

  def __init__(self, config: EvalConfig, model_config: TransformerConfig,
               objective: Objective, model_dir: Optional[str],
               tensorboard: bool = True):
    if config.mixture_or_task_name is None:
      raise ValueError("EvalConfig.mixture_or_task_name is not set: name the "
                       "task or mixture to evaluate")
    eval_checks.check_eval_tasks(config.mixture_or_task_name, config.split,
                                 objective)
    self.config = config
    self.fns = ModelFns(model_config, objective,
                        config.task_feature_lengths["targets"])
    self._seqio = seqio.Evaluator(
        config.mixture_or_task_name,
        feature_converter(objective, pack=False),
        eval_split=config.split,
        sequence_length=dict(config.task_feature_lengths),
        num_examples=config.num_examples, use_memory_cache=False,
        async_compute_metrics=False)
    self.model_dir = as_path(model_dir) if model_dir else None
    self._tensorboard = tensorboard

  def evaluate(self, params: Any, step: int, model_state: Any = None
               ) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} and {"<mixture>/average": {metric: value}}
    (`eval_averages`), also written to the model directory."""
    size = self.config.batch_size
    future, _ = self._seqio.evaluate(
        compute_metrics=True, step=step,
        predict_fn=self.fns.predict_fn(params, size, model_state),
        score_fn=self.fns.score_fn(params, size, model_state))
    metrics = {task: {name: float(getattr(value, "value", value))
                      for name, value in task_metrics.items()}
               for task, task_metrics in future.result().items()}
    metrics.update(eval_averages.averages(self.config.mixture_or_task_name,
                                          metrics))
    if self.model_dir is not None and jax.process_index() == 0:
      self._write(metrics, step)
    return metrics

  def _write(self, metrics: Mapping[str, Mapping[str, float]],
             step: int) -> None:
    out = self.model_dir / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    record = {"step": step, "mixture": self.config.mixture_or_task_name,
              "metrics": metrics}
    _unused_path(out, step).write_text(json.dumps(record, indent=1))
    if not self._tensorboard:
      return
    writer = tf.summary.create_file_writer(
        str(self.model_dir / TENSORBOARD_DIR / "eval"))
    with writer.as_default(step=step):
      for task, task_metrics in metrics.items():
        for name, value in task_metrics.items():
          tf.summary.scalar(f"{task}/{name}", value)
    writer.flush()


def _unused_path(out: epath.Path, step: int) -> epath.Path:
  """eval/metrics_<step>.json, or metrics_<step>.<n>.json with the first
  free n when that step was evaluated before (results are never
  overwritten)."""
  path, n = out / f"metrics_{step}.json", 0
  while path.exists():
    n += 1
    path = out / f"metrics_{step}.{n}.json"
  return path
