"""The main job: a gin-configured training run on a device mesh, with
checkpoints, logging and periodic evaluation.

A run is described by macros that gin files bind (gin/runs/*.gin):

  MODEL_CONFIG      moe_jax.models.config.TransformerConfig (gin/models/)
  TRAIN_CONFIG      TrainConfig below
  DATA_CONFIG       moe_jax.train.data.DataConfig
  OPTIMIZER_CONFIG  moe_jax.train.optimizers.OptimizerConfig
  LOSS_CONFIG       moe_jax.train.objective.LossConfig
  EVAL_CONFIG       moe_jax.train.evaluation.EvalConfig (optional)

and the mesh comes from `partitioning.make_mesh` / `logical_axis_rules`.
`configured_run()` reads them (every knob is checked before anything is
compiled); `train(run)` runs it. Python users can build a `Run` directly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Callable, Optional

import flax.linen as nn
import gin
import jax
import numpy as np
import optax

from moe_jax import distributed, flops, knobs, partitioning
from moe_jax.axes import Logical
from moe_jax.models import TransformerConfig, build_model
from moe_jax.models import configured_model_config
from moe_jax.train import checkpoints, eval_checks, loop, routing_monitor
from moe_jax.train import warm_start
from moe_jax.train.checkpoints import Checkpointer
from moe_jax.train.data import ArrayStream, BatchStream, DataConfig, Objective
from moe_jax.train.evaluation import EvalConfig, Evaluator
from moe_jax.train.metrics_log import MetricsLogger
from moe_jax.train.objective import LossConfig
from moe_jax.train.optimizers import OptimizerConfig, make_optimizer
from moe_jax.train.step import (TrainState, make_train_step, model_inputs,
                                split_model_state)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Attributes:
    model_dir: checkpoints, config.gin, metrics.jsonl, TensorBoard, eval;
      a local folder or a remote one (gs://bucket/run).
    num_steps: train until this many updates are done (resuming counts).
    save_every: steps between checkpoints.
    keep_checkpoints: how many checkpoints to keep.
    log_every: steps between console lines.
    eval_every: steps between evaluations (0: only at the end).
    seed: parameter initialization and dropout.
    init_checkpoint: a model directory (its latest step) or a step
      directory to initialize parameters from when the run starts fresh.
    init_mode: `warm_start.InitMode`.
    init_format: `warm_start.CheckpointFormat` of init_checkpoint ('t5x':
      a T5X checkpoint in flaxformer's names, e.g. a released T5 v1.1 /
      Switch / ST-MoE one).
    init_params_include: regex over '/'-joined parameter paths (MATCHING).
    overwrite_config: accept a model directory written with another config.
    async_checkpointing: write checkpoints in the background.
    peak_tflops_per_device: for MFU where the device kind is unknown.
    monitor: thresholds of the routing warnings
      (`routing_monitor.MonitorConfig`).
    tensorboard: write TensorBoard event files (train and eval) beside
      metrics.jsonl.
  """
  model_dir: str
  num_steps: int
  save_every: int = 100
  keep_checkpoints: int = 3
  log_every: int = 10
  eval_every: int = 0
  seed: int = 0
  init_checkpoint: Optional[str] = None
  init_mode: warm_start.InitMode = warm_start.InitMode.MATCHING
  init_format: warm_start.CheckpointFormat = (
      warm_start.CheckpointFormat.MOE_JAX)
  init_params_include: str = ".*"
  overwrite_config: bool = False
  async_checkpointing: bool = True
  peak_tflops_per_device: Optional[float] = None
  monitor: routing_monitor.MonitorConfig = routing_monitor.MonitorConfig()
  tensorboard: bool = True

  def __post_init__(self):
    if not isinstance(self.model_dir, (str, os.PathLike)) or not str(
        self.model_dir).strip():
      raise ValueError("model_dir (MODEL_DIR) must name a directory; got "
                       f"model_dir={self.model_dir!r}")
    knobs.choice(warm_start.InitMode, "init_mode", self.init_mode)
    knobs.choice(warm_start.CheckpointFormat, "init_format",
                 self.init_format)
    for knob in ("num_steps", "save_every", "keep_checkpoints", "log_every"):
      if getattr(self, knob) < 1:
        raise ValueError(f"{knob} must be >= 1; got {knob}="
                         f"{getattr(self, knob)}")
    if self.eval_every < 0:
      raise ValueError(f"eval_every must be >= 0; got eval_every="
                       f"{self.eval_every}")
    try:
      re.compile(self.init_params_include)
    except re.error as e:
      raise ValueError(f"init_params_include is not a regex: {e}") from None


@dataclasses.dataclass(frozen=True)
class Run:
  model: TransformerConfig
  train: TrainConfig
  data: DataConfig
  optimizer: OptimizerConfig = OptimizerConfig()
  loss: LossConfig = LossConfig()
  eval: Optional[EvalConfig] = None
  config_text: str = ""   # stored beside the checkpoints

  def __post_init__(self):
    # Here rather than at the first evaluation, after training.
    if self.eval is not None and self.eval.mixture_or_task_name:
      eval_checks.check_eval_tasks(self.eval.mixture_or_task_name,
                                   self.eval.split, self.data.objective)


@gin.configurable("moe_jax_run")
def _run_parts(train=gin.REQUIRED, data=gin.REQUIRED,
               optimizer=gin.REQUIRED, loss=gin.REQUIRED, evaluation=None):
  return train, data, optimizer, loss, evaluation


def configured_run() -> Run:
  """The `Run` the parsed gin files describe (macros above)."""
  model = configured_model_config()
  with gin.unlock_config():
    gin.parse_config("\n".join([
        "moe_jax_run.train = %TRAIN_CONFIG",
        "moe_jax_run.data = %DATA_CONFIG",
        "moe_jax_run.optimizer = %OPTIMIZER_CONFIG",
        "moe_jax_run.loss = %LOSS_CONFIG",
        "moe_jax_run.evaluation = %EVAL_CONFIG"]))
  parts = _run_parts()
  for (name, value), kind in zip(
      zip(("TRAIN_CONFIG", "DATA_CONFIG", "OPTIMIZER_CONFIG", "LOSS_CONFIG"),
          parts), (TrainConfig, DataConfig, OptimizerConfig, LossConfig)):
    if not isinstance(value, kind):
      raise ValueError(f"{name} must be a {kind.__name__}; got {value!r}")
  return Run(model, *parts[:4], eval=parts[4], config_text=gin.config_str())


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """Attributes:
    loop: the training loop's result (final state, history, resume point,
      preemption).
    eval_metrics: step -> {task: {metric: value}} of every evaluation.
  """
  loop: loop.LoopResult
  eval_metrics: dict[int, dict[str, dict[str, float]]]


def _tokens_per_example(data: DataConfig) -> int:
  lengths = data.task_feature_lengths
  if Objective(data.objective) == Objective.ENC_DEC:
    return lengths["inputs"] + lengths["targets"]
  return lengths.get("inputs", 0) + lengths["targets"]


@dataclasses.dataclass(frozen=True)
class _Programs:
  """What a run traces: built once per process for each (model, optimizer,
  loss, batch shapes, mesh, rules), the 16 last used kept, so runs that
  share them (a study's seeds and stages) trace and place nothing again.

  Attributes:
    model, optimizer: built from the run's configs.
    shardings: of the train state (params by their logical axes, the model
      state replicated).
    init: jitted PRNG key -> (unboxed params, model state), placed.
    opt_init: jitted params -> optimizer state, placed.
    step: the jitted train step (`make_train_step`), keeping `shardings`.
  """
  model: nn.Module
  optimizer: optax.GradientTransformation
  shardings: TrainState
  init: Callable[[jax.Array], tuple[Any, Any]]
  opt_init: Callable[[Any], Any]
  step: Callable


BatchShapes = tuple[tuple[str, tuple[int, ...], str], ...]
Stream = ArrayStream | BatchStream


@functools.lru_cache(maxsize=16)
def _programs(model_config: TransformerConfig,
              optimizer_config: OptimizerConfig, loss_config: LossConfig,
              batch_shapes: BatchShapes, mesh: jax.sharding.Mesh,
              rules: partitioning.LogicalRules) -> _Programs:
  """The `_Programs` of a run whose global batch holds `batch_shapes`
  ((feature, [B, ...] shape, dtype) triples)."""
  model = build_model(model_config)
  optimizer = make_optimizer(optimizer_config)
  example = {name: np.zeros(shape, dtype)
             for name, shape, dtype in batch_shapes}

  def variables(key):
    return model.init(key, **model_inputs(example), enable_dropout=False)

  with partitioning.axis_rules(mesh, rules):
    abstract = jax.eval_shape(variables, jax.random.PRNGKey(0))
  boxed = abstract["params"]
  param_shardings = partitioning.shardings_for(boxed, mesh, rules)
  abstract_params = nn.unbox(boxed)
  opt_shardings = partitioning.optimizer_state_shardings(
      jax.eval_shape(optimizer.init, abstract_params), abstract_params,
      param_shardings, mesh)
  replicated = partitioning.replicated(mesh)
  shardings = TrainState(replicated, param_shardings, opt_shardings,
                         jax.tree.map(lambda _: replicated,
                                      split_model_state(abstract)))

  def init(key):
    values = variables(key)
    return nn.unbox(values["params"]), split_model_state(values)

  return _Programs(
      model, optimizer, shardings,
      jax.jit(init, out_shardings=(shardings.params, shardings.model_state)),
      jax.jit(optimizer.init, out_shardings=shardings.opt_state),
      make_train_step(model, optimizer, loss_config, shardings))


class _Trainer:
  """What `train` sets up once: mesh, data, the traced programs."""

  def __init__(self, run: Run, stream: Optional[Stream] = None):
    self.run = run
    self.mesh = partitioning.make_mesh()
    self.rules = partitioning.logical_axis_rules()
    partitioning.check_divides("BATCH_SIZE (data.DataConfig.batch_size)",
                               run.data.batch_size, Logical.BATCH, self.mesh,
                               self.rules)
    for stack in ("encoder_moe", "decoder_moe"):
      moe = getattr(run.model, stack)
      if moe is not None:
        partitioning.check_divides("NUM_EXPERTS (MoeLayer.num_experts)",
                                   moe.layer.num_experts, Logical.EXPERT,
                                   self.mesh, self.rules)
    if stream is None:
      stream = BatchStream(run.data, jax.process_index(), jax.process_count())
    elif (stream.config, stream.process_index, stream.process_count) != (
        run.data, jax.process_index(), jax.process_count()):
      raise ValueError(
          "the given stream was read with another data config or process "
          f"(process {stream.process_index} of {stream.process_count}, "
          f"{stream.config}); this run's: process {jax.process_index()} of "
          f"{jax.process_count()}, {run.data}")
    self.stream = stream
    self.batch_sharding = nn.logical_to_mesh_sharding(
        jax.sharding.PartitionSpec("batch", None), self.mesh, self.rules)
    shapes = tuple(sorted(
        (name, (run.data.batch_size,) + value.shape[1:], value.dtype.str)
        for name, value in self.stream(0).items()))
    self.programs = _programs(run.model, run.optimizer, run.loss, shapes,
                              self.mesh, self.rules)

  def batch(self, step: int) -> dict[str, jax.Array]:
    local = self.stream(step)
    size = self.run.data.batch_size
    return {k: jax.make_array_from_process_local_data(
        self.batch_sharding, v, (size,) + v.shape[1:])
            for k, v in local.items()}

  def initial_state(self, key) -> TrainState:
    programs = self.programs
    with partitioning.axis_rules(self.mesh, self.rules):
      params, model_state = programs.init(key)
    source = self.run.train.init_checkpoint
    if source is not None:
      filled, copied = warm_start.from_checkpoint(
          params, source, self.run.train.init_mode,
          self.run.train.init_params_include, self.run.model,
          self.run.train.init_format)
      if jax.process_index() == 0:
        print(f"initialized {len(copied)} parameter arrays from {source}")
      params = jax.device_put(filled, programs.shardings.params)
    step = jax.device_put(np.zeros((), np.int32), programs.shardings.step)
    return TrainState(step, params, programs.opt_init(params), model_state)


def train(run: Run, stream: Optional[Stream] = None) -> TrainResult:
  """Trains (resuming from MODEL_DIR if it has checkpoints), evaluates every
  `eval_every` steps and at the end, and returns the result. `stream`: the
  run's batches read before (default: a `BatchStream` of `run.data`)."""
  cfg = run.train
  trainer = _Trainer(run, stream)
  evaluator = (Evaluator(run.eval, run.model, run.data.objective,
                         cfg.model_dir, cfg.tensorboard)
               if run.eval and run.eval.mixture_or_task_name else None)
  distributed.barrier("moe_jax.train: start-up done")
  checkpointer = Checkpointer(cfg.model_dir, run.config_text, cfg.save_every,
                              cfg.keep_checkpoints, cfg.async_checkpointing,
                              cfg.overwrite_config, trainer.stream)
  tokens = run.data.batch_size * _tokens_per_example(run.data)
  lengths = run.data.task_feature_lengths
  counts = flops.count(run.model, lengths.get("inputs", 0), lengths["targets"])
  logger = MetricsLogger(cfg.model_dir, cfg.num_steps, tokens,
                         3 * counts.forward_flops * run.data.batch_size,
                         cfg.log_every, cfg.peak_tflops_per_device,
                         cfg.tensorboard, cfg.monitor)
  eval_metrics = {}

  def evaluate(step: int, state: TrainState) -> None:
    metrics = evaluator.evaluate(state.params, step, state.model_state)
    eval_metrics[step] = metrics
    if jax.process_index() == 0:
      for task, values in metrics.items():
        shown = ", ".join(f"{k} {v:.2f}" for k, v in values.items())
        print(f"eval step {step} {task}: {shown}", flush=True)

  def after_step(step: int, state: TrainState) -> None:
    if cfg.eval_every and step % cfg.eval_every == 0 and (
        step < cfg.num_steps):
      evaluate(step, state)

  done = (checkpoints.steps(cfg.model_dir) or [0])[-1]  # steps finished

  def on_step(step: int, metrics: dict) -> None:
    nonlocal done
    done = step
    logger(step, metrics)

  def situation() -> str:
    saved = checkpoints.steps(cfg.model_dir)
    resume = (f"resume from checkpoint {saved[-1]}" if saved else
              "start again (no checkpoint yet)")
    return (f"during step {done + 1}. Rerun the same command to {resume} "
            f"in {cfg.model_dir}")

  programs = trainer.programs
  with partitioning.axis_rules(trainer.mesh, trainer.rules), (
      distributed.peer_watch(situation)):
    result = loop.train(
        programs.model, programs.optimizer, run.loss, trainer.batch,
        cfg.num_steps, checkpointer, seed=cfg.seed, on_step=on_step,
        initial_state=trainer.initial_state,
        state_shardings=programs.shardings, step_fn=programs.step,
        after_step=after_step if evaluator is not None else None)
    if evaluator is not None and not result.preempted:
      evaluate(int(result.state.step), result.state)
  logger.close()
  checkpointer.close()
  return TrainResult(result, eval_metrics)
