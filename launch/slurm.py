"""Run moe_jax on a SLURM GPU cluster: one process per node, all its GPUs.

  python launch/slurm.py --nodes=4 --gpus_per_node=8 [--partition=gpu] \
      [--dry_run] -- train --gin_file=...

Writes an sbatch script and submits it (`--dry_run`: prints the script and the
`sbatch` command instead). Inside the job every task reads its place from
SLURM: the first node of SLURM_JOB_NODELIST is the coordinator, SLURM_PROCID
the process id, SLURM_NTASKS the number of processes; moe_jax starts with
`--distributed=env` on those values.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launch.common import job_command, show  # noqa: E402
from moe_jax import distributed  # noqa: E402


def sbatch_script(nodes: int, gpus_per_node: int, main_args: Sequence[str],
                  job_name: str = "moe_jax", partition: str | None = None,
                  time_limit: str = "24:00:00", port: int = 12355,
                  workdir: str = ".") -> str:
  """The batch script: SBATCH header, environment, one srun."""
  if nodes < 1 or gpus_per_node < 1:
    raise ValueError(f"nodes and gpus_per_node must be >= 1; got nodes={nodes}"
                     f", gpus_per_node={gpus_per_node}")
  header = [
      "#!/bin/bash",
      f"#SBATCH --job-name={job_name}",
      f"#SBATCH --nodes={nodes}",
      "#SBATCH --ntasks-per-node=1",
      f"#SBATCH --gpus-per-node={gpus_per_node}",
      f"#SBATCH --time={time_limit}",
      "#SBATCH --output=%x-%j.out",
  ]
  if partition:
    header.append(f"#SBATCH --partition={partition}")
  body = [
      "set -euo pipefail",
      f"cd {workdir}",
      # sed reads all of its input: `head` could SIGPIPE scontrol under
      # pipefail and fail the job.
      "coordinator=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | sed -n 1p)",
      f"export {distributed.COORDINATOR_ADDRESS}=\"$coordinator:{port}\"",
      f"export {distributed.NUM_PROCESSES}=\"$SLURM_NTASKS\"",
      # SLURM_PROCID differs per task: the quoted inner shell expands it.
      f"srun bash -c 'export {distributed.PROCESS_ID}=$SLURM_PROCID; "
      "exec \"$@\"' task " + show(job_command(main_args, "env")),
  ]
  return "\n".join(header + [""] + body) + "\n"


def main(argv: Sequence[str]) -> int:
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--nodes", type=int, required=True)
  parser.add_argument("--gpus_per_node", type=int, default=8)
  parser.add_argument("--partition", default=None)
  parser.add_argument("--time", default="24:00:00")
  parser.add_argument("--job_name", default="moe_jax")
  parser.add_argument("--port", type=int, default=12355)
  parser.add_argument("--dry_run", action="store_true",
                      help="print the script and the sbatch command only")
  args = parser.parse_args(argv[:split])
  script = sbatch_script(args.nodes, args.gpus_per_node, argv[split + 1:],
                         args.job_name, args.partition, args.time, args.port,
                         workdir=str(Path.cwd()))
  if args.dry_run:
    print(script)
    print(show(["sbatch", f"{args.job_name}.sbatch"]))
    return 0
  with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
    f.write(script)
  print(show(["sbatch", f.name]))
  return subprocess.run(["sbatch", f.name], check=False).returncode


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
