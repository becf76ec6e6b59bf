"""Launchers: dry runs print the right commands; the SLURM script wires env."""

import os
import stat
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch import local, slurm, tpu

REPO = Path(__file__).resolve().parent.parent
MAIN_ARGS = ["train", "--gin_file=gin/runs/mini_flan_cpu.gin",
             "--gin.TRAIN_STEPS=10"]


def _dry_run(script: str, *args: str) -> str:
  result = subprocess.run(
      [sys.executable, str(REPO / "launch" / script), *args, "--dry_run",
       "--", *MAIN_ARGS], capture_output=True, text=True, check=True, cwd=REPO)
  return result.stdout


@pytest.mark.parametrize("accelerator_type,workers,runtime", [
    ("v4-32", 4, "tpu-ubuntu2204-base"),
    ("v5p-128", 16, "v2-alpha-tpuv5"),
])
def test_tpu_dry_run(accelerator_type, workers, runtime):
  out = _dry_run("tpu.py", "--name=slice", "--zone=us-central2-b",
                 f"--accelerator_type={accelerator_type}")
  lines = out.strip().splitlines()
  assert lines[0] == f"# {accelerator_type}: {workers} workers, one process each"
  create, tar, scp, install, run = lines[1:]
  assert create.startswith("gcloud compute tpus tpu-vm create slice")
  assert f"--accelerator-type={accelerator_type}" in create
  assert f"--version={runtime}" in create
  assert tar.startswith("tar czf /tmp/moe_jax.tgz")
  for step in (scp, install, run):
    assert "--worker=all" in step and "--zone=us-central2-b" in step
  assert "pip install -e ./moe_jax" in install and "jax[tpu]" in install
  assert ("python3 -m moe_jax.main train --gin_file=gin/runs/mini_flan_cpu.gin"
          " --gin.TRAIN_STEPS=10 --distributed=auto") in run


def test_tpu_reuse_describes_instead_of_creating():
  steps = tpu.commands("slice", "z", "v4-8", MAIN_ARGS, reuse=True,
                       project="p")
  assert steps[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
  assert "--project=p" in steps[0]
  assert tpu.Slice.parse("v4-8").num_hosts == 1


def test_tpu_bad_accelerator_type():
  with pytest.raises(ValueError, match="accelerator_type"):
    tpu.Slice.parse("v9-32")


def test_slurm_dry_run():
  out = _dry_run("slurm.py", "--nodes=4", "--gpus_per_node=8",
                 "--partition=gpu")
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
               "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu"):
    assert line in out.splitlines()
  assert "srun bash -c" in out
  assert "--distributed=env" in out
  assert out.strip().splitlines()[-1] == "sbatch moe_jax.sbatch"


def _executable(path: Path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_gives_each_task_its_place(tmp_path):
  """Runs the batch script with stand-ins for scontrol, srun and python3."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "scontrol", "#!/bin/bash\nprintf 'node7\\nnode8\\n'\n")
  # srun starts SLURM_NTASKS copies of its command, one SLURM_PROCID each.
  _executable(bin_dir / "srun", "#!/bin/bash\nfor i in $(seq 0 $((SLURM_NTASKS-1))); do "
              "SLURM_PROCID=$i \"$@\"; done\n")
  _executable(bin_dir / "python3", "#!/bin/bash\necho \"$MOE_JAX_COORDINATOR_ADDRESS "
              "$MOE_JAX_NUM_PROCESSES $MOE_JAX_PROCESS_ID $*\"\n")
  script = tmp_path / "job.sbatch"
  script.write_text(slurm.sbatch_script(2, 8, MAIN_ARGS, port=4000,
                                        workdir=str(tmp_path)))
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_NTASKS": "2"}
  out = subprocess.run(["bash", str(script)], env=env, capture_output=True,
                       text=True, check=True).stdout.splitlines()
  tail = "-m moe_jax.main " + " ".join(MAIN_ARGS) + " --distributed=env"
  assert out == [f"node7:4000 2 0 {tail}", f"node7:4000 2 1 {tail}"]


def test_local_dry_run_environment():
  out = _dry_run("local.py", "--num_processes=2", "--devices_per_process=4",
                 "--port=4321").strip().splitlines()
  assert len(out) == 2
  for pid, line in enumerate(out):
    env = dict(word.split("=", 1) for word in shlex.split(line)
               if word.split("=", 1)[0].isupper())  # NAME=value words
    assert env["XLA_FLAGS"].split()[-1] == (
        "--xla_force_host_platform_device_count=4")
    assert "MOE_JAX_COORDINATOR_ADDRESS=localhost:4321" in line
    assert f"MOE_JAX_PROCESS_ID={pid}" in line
    assert "MOE_JAX_NUM_PROCESSES=2" in line
  assert local.process_env(1, 2, 4, 1, "")["JAX_PLATFORMS"] == "cpu"


def test_local_processes_keep_the_callers_xla_flags():
  env = local.process_env(0, 2, 4, 1, "--xla_dump_to=d "
                          "--xla_force_host_platform_device_count=8")
  assert env["XLA_FLAGS"].split() == [
      "--xla_dump_to=d", "--xla_force_host_platform_device_count=4"]


def test_launchers_need_a_command():
  with pytest.raises(ValueError, match="after '--'"):
    tpu.commands("s", "z", "v4-8", [], reuse=False, project=None)
