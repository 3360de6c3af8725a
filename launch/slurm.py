"""Slurm: render the sbatch script, submit it, and turn SLURM_* into torchrun's rendezvous.

The job runs one task per node (``srun --ntasks-per-node=1``); each task is
``python -m launch slurm-node``, which reads the allocation from SLURM_* (head node = the
first host of ``SLURM_JOB_NODELIST``), validates the config on the compute node and execs one
torchrun with ``--nproc-per-node`` = GPUs per node and a c10d rendezvous on the head node.

Requeue safety: ``#SBATCH --requeue`` lets Slurm put a preempted job back in the queue; Slurm
sends USR1 ``requeue_signal_s`` before the time limit and the script requeues itself. Either way
the job starts again in the same run directory, and ``checkpoint.resume=auto`` resumes from the
latest complete checkpoint (a save cut short leaves only a hidden staging directory).
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from dsv3_train.config import ConfigError
from launch.nodelist import expand_nodelist

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass
class SlurmJob:
    """What ``dsv3-launch slurm`` asks Slurm for (flags, or a YAML file via --config)."""

    nodes: int = 1
    """Nodes; one torchrun per node."""
    gpus_per_node: int = 8
    """GPUs per node = training processes per node."""
    partition: Optional[str] = None
    """sbatch --partition."""
    time: str = "24:00:00"
    """Time limit per allocation (Slurm formats: MM, HH:MM:SS, D-HH:MM:SS, ...)."""
    account: Optional[str] = None
    """sbatch --account."""
    cpus_per_task: Optional[int] = None
    """CPUs for the one task per node (data loading threads); None = Slurm's default."""
    container_image: Optional[str] = None
    """Run inside this image with pyxis/enroot (srun --container-image); None = the host's Python."""
    container_mounts: Optional[str] = None
    """srun --container-mounts; the working directory is always mounted."""
    output_dir: Optional[str] = None
    """Run directory (checkpoints, metrics, Slurm logs, the script); None = the config's run dir."""
    job_name: Optional[str] = None
    """sbatch --job-name; None = the config's name."""
    max_restarts: int = 0
    """torchrun restarts of the worker group inside one allocation."""
    requeue: bool = True
    """Let Slurm requeue the job (preemption) and requeue it near the time limit."""
    requeue_signal_s: int = 120
    """Seconds before the time limit at which the script requeues the job."""
    port: Optional[int] = None
    """Rendezvous port on the head node; None = derived from the job id (see rendezvous_port)."""
    gpu_memory: float = 80.0
    """GiB per GPU, for the pre-submit memory estimate."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra #SBATCH lines, e.g. ['--qos=high', '--exclusive']."""

    def check(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ConfigError(f"slurm {name} ({getattr(self, name)}) must be >= 1")
        limit = time_limit_seconds(self.time)
        if self.requeue and self.requeue_signal_s >= limit:
            raise ConfigError(f"requeue_signal_s ({self.requeue_signal_s}) must be shorter than the time limit "
                              f"({self.time} = {limit} s): lower it or raise --time")
        if self.port is not None and not 1024 <= self.port <= 65535:
            raise ConfigError(f"slurm port ({self.port}) must be in 1024..65535")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts ({self.max_restarts}) must be >= 0")


def time_limit_seconds(text: str) -> int:
    """Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = _TIME.match(str(text).strip())
    if not match:
        raise ConfigError(f"slurm time ({text!r}) is not a Slurm time limit: use e.g. 90, 12:00:00 or 2-00:00:00")
    days, a, b, c = match.groups()
    if days is None:
        hours, minutes, seconds = ((0, int(a), int(b or 0)) if c is None else (int(a), int(b), int(c)))
    else:
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
    total = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ConfigError(f"slurm time ({text!r}) must be positive")
    return total


def rendezvous_port(job_id: str) -> int:
    """15000 + job id mod 15000: the same on every node of a job, different for jobs that share
    a head node, and below Linux's ephemeral port range (32768+)."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 15000 + int(digits) % 15000


@dataclass(frozen=True)
class Rendezvous:
    nnodes: int
    head: str
    port: int
    job_id: str
    node_rank: int

    @property
    def endpoint(self) -> str:
        return f"{self.head}:{self.port}"


def rendezvous_from_env(env: Mapping[str, str], port: Optional[int] = None) -> Rendezvous:
    """SLURM_JOB_NODELIST / SLURM_JOB_NUM_NODES / SLURM_JOB_ID / SLURM_NODEID -> rendezvous."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job_id = env.get("SLURM_JOB_ID")
    if not nodelist or not job_id:
        raise ConfigError("SLURM_JOB_NODELIST / SLURM_JOB_ID are unset: slurm-node runs inside a Slurm job; "
                          "submit with dsv3-launch slurm (or use dsv3-launch local)")
    hosts = expand_nodelist(nodelist)
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(hosts))
    if nnodes != len(hosts):
        raise ConfigError(f"SLURM_JOB_NUM_NODES ({nnodes}) disagrees with SLURM_JOB_NODELIST ({nodelist} = "
                          f"{len(hosts)} hosts)")
    return Rendezvous(nnodes, hosts[0], port or rendezvous_port(job_id), job_id, int(env.get("SLURM_NODEID", "0")))


def render_sbatch(job: SlurmJob, overrides: list[str], workdir: Path, output_dir: Path, name: str) -> str:
    """The sbatch script (see the module docstring for what it does)."""
    job_name = re.sub(r"[^A-Za-z0-9._-]+", "-", job.job_name or name)  # #SBATCH lines do not quote
    directives = [f"--job-name={job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
                  f"--gpus-per-node={job.gpus_per_node}", f"--time={job.time}",
                  f"--output={output_dir}/slurm-%j.out", "--open-mode=append", f"--chdir={workdir}"]
    directives += [f"--partition={job.partition}"] * bool(job.partition)
    directives += [f"--account={job.account}"] * bool(job.account)
    directives += [f"--cpus-per-task={job.cpus_per_task}"] * bool(job.cpus_per_task)
    if job.requeue:
        directives += ["--requeue", f"--signal=B:USR1@{job.requeue_signal_s}"]
    directives += list(job.sbatch_args)
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if job.container_image:
        mounts = ",".join(m for m in (f"{workdir}:{workdir}", job.container_mounts) if m)
        srun += [f"--container-image={job.container_image}", f"--container-mounts={mounts}",
                 f"--container-workdir={workdir}"]
    node = ["python", "-m", "launch", "slurm-node", f"--gpus-per-node={job.gpus_per_node}",
            f"--max-restarts={job.max_restarts}"] + ([f"--port={job.port}"] if job.port else [])
    step = " \\\n    ".join([shlex.join(srun), shlex.join(node), "--", *map(shlex.quote, overrides)])
    header = "\n".join(f"#SBATCH {d}" for d in directives)
    return _SCRIPT.format(header=header, step=step, output_dir=output_dir)


_SCRIPT = """#!/bin/bash
# Rendered by dsv3-launch slurm; resubmit as is with: sbatch {output_dir}/sbatch.sh
{header}

export PYTHONUNBUFFERED=1
echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST"

# USR1 arrives shortly before the time limit (--signal): put the job back in the queue. It
# restarts in the same run directory and resumes from the latest checkpoint (resume=auto).
requeue() {{ echo "USR1: requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"; }}
trap requeue USR1

# One task per node; each derives torchrun's c10d rendezvous from SLURM_* (head node = first
# host of SLURM_JOB_NODELIST) and starts --gpus-per-node workers.
{step} &
step_pid=$!
while true; do
  wait "$step_pid"; status=$?
  kill -0 "$step_pid" 2>/dev/null || break  # a trapped signal ends `wait` early; srun still runs
done
exit "$status"
"""


def submit(script_path: Path) -> str:
    """sbatch the script; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("sbatch is not on PATH: submit from a Slurm login node, or use --dry-run to print "
                          "the script")
    result = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise ConfigError(f"sbatch refused the job (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]
