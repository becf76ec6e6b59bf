"""Errors that name the knob and list its choices or numbers, invalid UTF-8
in infer's input file, and seqio's per-task warning shown once."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_jax import infer
from moe_jax.moe import grouped_matmul
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter

ROOT = Path(__file__).resolve().parent.parent


def test_second_expert_policy_error_lists_the_choices():
  router = TokenChoiceRouter(num_selected_experts=2,
                             second_expert_policy="foo")
  with pytest.raises(ValueError, match=r"second_expert_policy must be one "
                     r"of \['all', 'random'\]; got second_expert_policy='foo'"):
    MoeLayer(num_experts=4, router=router)


def test_grouped_matmul_and_objective_errors_list_the_choices():
  choices = [choice.value for choice in grouped_matmul.GroupedMatmul]
  with pytest.raises(ValueError, match=re.escape(
      f"grouped_matmul must be one of {choices}; got grouped_matmul='foo'")):
    grouped_matmul.resolve("foo")
  data = pytest.importorskip("moe_jax.train.data")
  with pytest.raises(ValueError, match=r"objective must be one of \[.*'enc_"
                     r"dec'.*\]; got objective='foo'"):
    data.feature_converter("foo", pack=False)


# Trains with a bad knob on 4 fake devices; prints the error.
_TRAIN = """
import sys
from moe_jax import main
sys.argv = ["moe_jax.main", "train", "--gin_file=gin/runs/mini_flan_cpu.gin",
            "--gin.EVAL_MIXTURE=None", "--gin.TRAIN_STEPS=2",
            "--gin.MODEL_DIR='%s'", *sys.argv[1:]]
try:
  main.main()
except ValueError as e:
  print("ValueError:", e)
"""


@pytest.mark.parametrize("flags, message", [
    (("--gin.BATCH_SIZE=6",),
     "BATCH_SIZE (data.DataConfig.batch_size)=6 must be a multiple of 4: "
     "the 'batch' dimension is split over mesh axes ('data', 'expert') "
     "(data=4, expert=1)"),
    (("--gin.NUM_EXPERTS=6", "--gin.partitioning.make_mesh.expert=4"),
     "NUM_EXPERTS (MoeLayer.num_experts)=6 must be a multiple of 4: the "
     "'expert' dimension is split over mesh axes ('expert',) (expert=4)"),
])
def test_indivisible_batch_or_experts_fail_before_compiling(tmp_path, flags,
                                                            message):
  pytest.importorskip("tasks")
  model_dir = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": (
      "--xla_backend_optimization_level=0 "
      "--xla_force_host_platform_device_count=4")}
  result = subprocess.run(
      [sys.executable, "-c", _TRAIN % model_dir, *flags], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300)
  assert f"ValueError: {message}" in result.stdout, (
      result.stdout[-2000:] + result.stderr[-2000:])
  # Nothing was trained or written: the check runs at set-up.
  assert not (model_dir / "metrics.jsonl").exists()
  assert not (model_dir / "config.gin").exists()


def test_infer_inputs_with_invalid_utf8_name_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"inputs": "a"}\n{"inputs": "b\xffc"}\n')
  with pytest.raises(ValueError, match=rf"{path}:2: not valid UTF-8 "
                     r"\(byte 0xff at byte 14 of the line\)"):
    infer.read_inputs(str(path))
  text = tmp_path / "bad.txt"
  text.write_bytes(b"fine\n\xfe\n")
  with pytest.raises(ValueError, match=rf"{text}:2: not valid UTF-8"):
    infer.read_inputs(str(text))


def test_seqio_function_dataset_warning_is_shown_once(caplog):
  tasks = pytest.importorskip("tasks")
  seqio = pytest.importorskip("seqio")
  from moe_jax.train.data import BatchStream, DataConfig
  mixture = seqio.get_mixture_or_task("mini_flan")
  assert len(mixture.tasks) > 1  # seqio warns once per task
  config = DataConfig(mixture_or_task_name="mini_flan",
                      task_feature_lengths={"inputs": 32, "targets": 8},
                      batch_size=8)
  del tasks
  with caplog.at_level(logging.WARNING):
    BatchStream(config, 0, 1)(0)
  warned = [r for r in caplog.records
            if "uncached FunctionDataset" in r.getMessage()]
  assert len(warned) <= 1
