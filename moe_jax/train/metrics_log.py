"""Where training metrics go: a console progress line, a JSONL file and
TensorBoard event files.

Only process 0 writes (every process computes the same replicated metrics).
TensorBoard is written with `tf.summary`, imported when the logger is made.
Routing health (`moe_jax.train.routing_monitor`) joins every record: load
statistics per sparse layer, a TensorBoard histogram of each layer's
per-expert load (one bucket per expert), a `routing:` console line, and
warnings printed at once and stored under `routing_warnings`.

metrics.jsonl is flushed after every step, so every step up to the latest
checkpoint is on disk whenever the process dies. A resumed run replaces
the records of the steps it runs again (and a line cut short by a kill),
so the file holds each step once, in order.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Mapping, Optional

import jax
from etils import epath
import numpy as np

from moe_jax.paths import as_path
from moe_jax.train import routing_monitor

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Dense bf16 peak TFLOP/s per device, for the MFU estimate, by device kind.
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v6 lite": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
}


def peak_tflops(device: jax.Device) -> Optional[float]:
  """Peak TFLOP/s of `device` from `PEAK_TFLOPS`, None if unknown (CPU)."""
  for kind, peak in PEAK_TFLOPS.items():
    if device.device_kind.startswith(kind):
      return peak
  return None


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
  """`logger(step, metrics)` after every step; `logger.close()` at the end.

  Args:
    model_dir: the run's directory (metrics.jsonl, tensorboard/train), local
      or remote.
    total_steps: the step the run ends at (for the ETA).
    tokens_per_step: target + input tokens of a global batch (tokens/s).
    flops_per_step: model FLOPs of one training step (forward + backward),
      counting only active experts, for MFU; None: no MFU.
    log_every: steps between console lines.
    peak_tflops_per_device: overrides `PEAK_TFLOPS`.
    tensorboard: also write TensorBoard event files.
    monitor: thresholds of the routing warnings.
  """

  def __init__(self, model_dir: str, total_steps: int, tokens_per_step: int,
               flops_per_step: Optional[float], log_every: int = 10,
               peak_tflops_per_device: Optional[float] = None,
               tensorboard: bool = True,
               monitor: routing_monitor.MonitorConfig = (
                   routing_monitor.MonitorConfig())):
    self._writes = jax.process_index() == 0
    self._total_steps = total_steps
    self._tokens_per_step = tokens_per_step
    self._log_every = max(1, log_every)
    peak = peak_tflops_per_device or peak_tflops(jax.devices()[0])
    self._peak_flops = (peak * 1e12 * jax.device_count()
                        if peak and flops_per_step else None)
    self._flops_per_step = flops_per_step
    self._last_time = None
    self._last_step = None
    self._jsonl = self._summary = None
    self._monitor = routing_monitor.RoutingMonitor(monitor)
    model_dir = as_path(model_dir)
    self._path = model_dir / METRICS_FILE
    if self._writes:
      model_dir.mkdir(parents=True, exist_ok=True)
    if self._writes and tensorboard:
      import tensorflow as tf  # only TensorBoard needs it
      self._summary = tf.summary.create_file_writer(
          str(model_dir / TENSORBOARD_DIR / "train"))
      self._tf = tf

  def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
    now = time.perf_counter()
    if self._last_time is None:  # the first step includes compilation
      self._last_time, self._last_step = now, step
      rate = {}
    else:
      steps_per_s = (step - self._last_step) / max(now - self._last_time,
                                                   1e-9)
      rate = {"steps_per_second": steps_per_s,
              "tokens_per_second": steps_per_s * self._tokens_per_step}
      if self._peak_flops:
        rate["mfu"] = steps_per_s * self._flops_per_step / self._peak_flops
    if not self._writes:
      return
    if self._jsonl is None:
      self._jsonl = _open_before(self._path, step)
    report = self._monitor(step, metrics)
    metrics = {**metrics, **report.metrics}
    record = {"step": step, **metrics, **rate}
    if report.warnings:
      record[routing_monitor.WARNINGS] = [
          {**dataclasses.asdict(w), "message": w.message}
          for w in report.warnings]
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._summary is not None:
      with self._summary.as_default(step=step):
        for name, value in {**metrics, **rate}.items():
          if isinstance(value, list):
            self._histogram(name, value)
          else:
            self._tf.summary.scalar(name, value)
    for warning in report.warnings:
      print(f"WARNING routing: {warning.message}", flush=True)
    if step % self._log_every == 0 or step == self._total_steps:
      self._console(step, metrics, rate)
      self._last_time, self._last_step = now, step

  def _histogram(self, name: str, counts: list[float]) -> None:
    """A TensorBoard histogram with bucket e = [e - 0.5, e + 0.5) holding
    counts[e] (the tokens expert e received, or its selection bias)."""
    from tensorboard.plugins.histogram import metadata  # beside tensorflow
    edges = np.arange(len(counts), dtype=np.float64)
    buckets = np.stack([edges - 0.5, edges + 0.5,
                        np.asarray(counts, np.float64)], axis=-1)
    self._tf.summary.write(
        name, buckets, metadata=metadata.create_summary_metadata(
            name, "one bucket per expert"))

  def _console(self, step: int, metrics: Mapping[str, float],
               rate: Mapping[str, float]) -> None:
    line = (f"step {step:>6}/{self._total_steps}  loss {metrics['loss']:.4f}  "
            f"ce {metrics['cross_entropy']:.4f}")
    if "fraction_tokens_left_behind" in metrics:
      line += (f"  aux {metrics['auxiliary_loss']:.3f}  dropped "
               f"{metrics['fraction_tokens_left_behind']:.3f}")
    if rate:
      line += f"  {rate['tokens_per_second']:,.0f} tok/s"
      line += f"  MFU {rate['mfu']:.1%}" if "mfu" in rate else "  MFU n/a"
      remaining = (self._total_steps - step) / max(rate["steps_per_second"],
                                                   1e-9)
      line += f"  ETA {_duration(remaining)}"
    print(line, flush=True)
    routing = routing_monitor.console_summary(metrics)
    if routing:
      print(routing, flush=True)

  def close(self) -> None:
    if self._writes:
      if self._jsonl is not None:
        self._jsonl.close()
      if self._summary is not None:
        self._summary.flush()


def _open_before(path: epath.Path, step: int):
  """`path` opened for appending `step` and later, after dropping the
  records of `step` and later and any line that is not a whole record."""
  kept, changed = [], False
  if path.exists():
    for line in path.read_text().splitlines(keepends=True):
      try:
        keep = line.endswith("\n") and json.loads(line)["step"] < step
      except (ValueError, KeyError, TypeError):
        keep = False
      kept += [line] if keep else []
      changed |= not keep
  if changed:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text("".join(kept))
    partial.replace(path)
  return path.open("a")
