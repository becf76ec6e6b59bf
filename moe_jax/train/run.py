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
import os
import re
from typing import Optional

import flax.linen as nn
import gin
import jax
import numpy as np

from moe_jax import distributed, flops, knobs, partitioning
from moe_jax.axes import Logical
from moe_jax.models import TransformerConfig, build_model
from moe_jax.models import configured_model_config
from moe_jax.train import checkpoints, eval_checks, loop, routing_monitor
from moe_jax.train import warm_start
from moe_jax.train.checkpoints import Checkpointer
from moe_jax.train.data import BatchStream, DataConfig, Objective
from moe_jax.train.evaluation import EvalConfig, Evaluator
from moe_jax.train.metrics_log import MetricsLogger
from moe_jax.train.objective import LossConfig
from moe_jax.train.optimizers import OptimizerConfig, make_optimizer
from moe_jax.train.step import TrainState, model_inputs, split_model_state


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


class _Trainer:
  """What `train` sets up once: model, optimizer, mesh, data."""

  def __init__(self, run: Run):
    self.run = run
    self.model = build_model(run.model)
    self.optimizer = make_optimizer(run.optimizer)
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
    self.stream = BatchStream(run.data, jax.process_index(),
                              jax.process_count())
    self.batch_sharding = nn.logical_to_mesh_sharding(
        jax.sharding.PartitionSpec("batch", None), self.mesh, self.rules)

  def batch(self, step: int) -> dict[str, jax.Array]:
    local = self.stream(step)
    size = self.run.data.batch_size
    return {k: jax.make_array_from_process_local_data(
        self.batch_sharding, v, (size,) + v.shape[1:])
            for k, v in local.items()}

  def _init_variables(self, rng):
    local = self.stream(0)
    example = {k: np.zeros((self.run.data.batch_size,) + v.shape[1:], v.dtype)
               for k, v in local.items()}
    return self.model.init(rng, **model_inputs(example),
                           enable_dropout=False)

  def state_shardings(self, key) -> TrainState:
    """Shardings of the train state (params by their logical axes, the
    model state replicated)."""
    with partitioning.axis_rules(self.mesh, self.rules):
      variables = jax.eval_shape(self._init_variables, key)
    boxed = variables["params"]
    param_shardings = partitioning.shardings_for(boxed, self.mesh, self.rules)
    abstract_params = nn.unbox(boxed)
    abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
    opt_shardings = partitioning.optimizer_state_shardings(
        abstract_opt, abstract_params, param_shardings, self.mesh)
    replicated = partitioning.replicated(self.mesh)
    return TrainState(replicated, param_shardings, opt_shardings,
                      jax.tree.map(lambda _: replicated,
                                   split_model_state(variables)))

  def initial_state(self, key, shardings: TrainState) -> TrainState:
    with partitioning.axis_rules(self.mesh, self.rules):
      params, model_state = jax.jit(
          lambda k: self._split(self._init_variables(k)),
          out_shardings=(shardings.params, shardings.model_state))(key)
    source = self.run.train.init_checkpoint
    if source is not None:
      filled, copied = warm_start.from_checkpoint(
          params, source, self.run.train.init_mode,
          self.run.train.init_params_include, self.run.model,
          self.run.train.init_format)
      if jax.process_index() == 0:
        print(f"initialized {len(copied)} parameter arrays from {source}")
      params = jax.device_put(filled, shardings.params)
    opt_state = jax.jit(self.optimizer.init,
                        out_shardings=shardings.opt_state)(params)
    step = jax.device_put(np.zeros((), np.int32), shardings.step)
    return TrainState(step, params, opt_state, model_state)

  @staticmethod
  def _split(variables):
    """(unboxed params, model state) of initialized `variables`."""
    return nn.unbox(variables["params"]), split_model_state(variables)


def train(run: Run) -> TrainResult:
  """Trains (resuming from MODEL_DIR if it has checkpoints), evaluates every
  `eval_every` steps and at the end, and returns the result."""
  cfg = run.train
  trainer = _Trainer(run)
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

  shardings = trainer.state_shardings(jax.random.PRNGKey(cfg.seed))
  with partitioning.axis_rules(trainer.mesh, trainer.rules), (
      distributed.peer_watch(situation)):
    result = loop.train(
        trainer.model, trainer.optimizer, run.loss, trainer.batch,
        cfg.num_steps, checkpointer, seed=cfg.seed, on_step=on_step,
        initial_state=lambda key: trainer.initial_state(key, shardings),
        state_shardings=shardings,
        after_step=after_step if evaluator is not None else None)
    if evaluator is not None and not result.preempted:
      evaluate(int(result.state.step), result.state)
  logger.close()
  checkpointer.close()
  return TrainResult(result, eval_metrics)
