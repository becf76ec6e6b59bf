"""Run moe_jax on every worker of a Cloud TPU VM slice.

  python launch/tpu.py --name=my-slice --zone=us-central2-b \
      --accelerator_type=v4-32 [--dry_run] -- train --gin_file=...

Steps (each a `gcloud` command; `--dry_run` prints them and runs nothing):
  1. create the slice unless `--reuse` (then it must exist);
  2. copy this checkout to every worker (a tarball, `scp --worker=all`);
  3. install it with the TPU build of JAX on every worker;
  4. start `python -m moe_jax.main ...` on every worker at once. JAX finds the
     other workers itself (`--distributed=auto`), so every worker gets the same
     command and gin flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launch.common import job_command, show  # noqa: E402

# Runtime image per TPU generation (Cloud TPU VM software versions).
_RUNTIME = {
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
# TensorCores (v4, v5p: the number in the name) or chips (v5e, v6e) per host.
_PER_HOST = {"v4": 8, "v5p": 8, "v5litepod": 4, "v6e": 4}
REMOTE_DIR = "moe_jax"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice named like v4-32: generation and size."""
  generation: str
  size: int

  @classmethod
  def parse(cls, accelerator_type: str) -> "Slice":
    match = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
    if not match:
      raise ValueError(
          f"accelerator_type must look like v4-32, v5p-128, v5litepod-16 or "
          f"v6e-16; got accelerator_type={accelerator_type!r}")
    return cls(match.group(1), int(match.group(2)))

  @property
  def num_hosts(self) -> int:
    """Workers (VMs) in the slice; a slice of 8 or fewer is one host."""
    return max(1, self.size // _PER_HOST[self.generation])

  @property
  def runtime(self) -> str:
    return _RUNTIME[self.generation]


def commands(name: str, zone: str, accelerator_type: str, main_args:
             Sequence[str], reuse: bool, project: str | None) -> list[list[str]]:
  """Every gcloud command of a launch, in order."""
  tpu = Slice.parse(accelerator_type)
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  where = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
  steps = []
  if reuse:
    steps.append(gcloud + ["describe", name] + where)
  else:
    steps.append(gcloud + ["create", name] + where + [
        f"--accelerator-type={accelerator_type}", f"--version={tpu.runtime}"])
  steps.append(["tar", "czf", "/tmp/moe_jax.tgz", "--exclude=.git", "-C",
                str(REPO_ROOT), "."])
  steps.append(gcloud + ["scp", "/tmp/moe_jax.tgz", f"{name}:~/"] + where +
               ["--worker=all"])
  install = (f"mkdir -p {REMOTE_DIR} && tar xzf moe_jax.tgz -C {REMOTE_DIR} && "
             f"pip install -e ./{REMOTE_DIR} 'jax[tpu]'")
  steps.append(gcloud + ["ssh", name] + where +
               ["--worker=all", f"--command={install}"])
  run = f"cd {REMOTE_DIR} && " + show(job_command(main_args, "auto"))
  steps.append(gcloud + ["ssh", name] + where + ["--worker=all",
                                                 f"--command={run}"])
  return steps


def main(argv: Sequence[str]) -> int:
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--name", required=True, help="TPU VM name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--accelerator_type", required=True, help="e.g. v4-32")
  parser.add_argument("--project", default=None)
  parser.add_argument("--reuse", action="store_true",
                      help="use an existing slice instead of creating one")
  parser.add_argument("--dry_run", action="store_true",
                      help="print the commands, run nothing")
  args = parser.parse_args(argv[:split])
  steps = commands(args.name, args.zone, args.accelerator_type,
                   argv[split + 1:], args.reuse, args.project)
  tpu = Slice.parse(args.accelerator_type)
  print(f"# {args.accelerator_type}: {tpu.num_hosts} workers, one process each")
  for step in steps:
    print(show(step))
    if not args.dry_run:
      subprocess.run(step, check=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
