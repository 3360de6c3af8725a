"""``dsv3-launch {local,slurm,slurm-node,plan} [options] [hydra overrides]`` (see launch/__init__).

Every command composes the training config from the same overrides the training processes will
receive and validates it (config rules, then launcher rules) before anything starts; an invalid
config ends with ``error: <value and fix>`` and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

from dsv3_train.config import ConfigError
from launch.compose import compose, split_parallel
from launch.torchrun import DEFAULT_MODULE, exec_torchrun, shell_line, torchrun_command
from launch.validate import Target, fill_data_parallel, validate_launch


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"local": local, "slurm": slurm, "slurm-node": slurm_node, "plan": plan}
    if not argv or argv[0] not in commands:
        sys.exit(f"usage: dsv3-launch {{{','.join(commands)}}} [options] [overrides]; "
                 f"dsv3-launch <command> --help for its options")
    try:
        sys.exit(commands[argv[0]](argv[1:]))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"dsv3-launch {command}", description=description)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the training config, e.g. model=toy")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Options and overrides in any order; everything after -- is an override."""
    tail = argv[argv.index("--") + 1:] if "--" in argv else []
    head = argv[:argv.index("--")] if "--" in argv else argv
    args = parser.parse_intermixed_args(head)
    args.overrides = [*args.overrides, *tail]
    return args


# ----------------------------------------------------------------------------- local
def local(argv: list[str]) -> int:
    parser = _parser("local", "Validate, then run torchrun on this machine.")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="training processes (default: the visible GPUs, or 1 on CPU)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes; > 1 needs --rdzv-endpoint on every node")
    parser.add_argument("--rdzv-endpoint", default=None, help="host:port of the head node (multi-node)")
    parser.add_argument("--rdzv-id", default="dsv3", help="rendezvous id shared by the nodes of one run")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="restart all workers this often after a failure (they resume from the latest checkpoint)")
    parser.add_argument("--module", default=DEFAULT_MODULE, help="entry module taking the training config")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the command, start nothing")
    args = _parse(parser, argv)
    nproc = args.nproc_per_node or _visible_gpus() or 1
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise ConfigError(f"--nnodes ({args.nnodes}) needs --rdzv-endpoint HOST:PORT of the head node, the same "
                          f"on every node (or use dsv3-launch slurm)")
    memory = _gpu_memory_gib()
    target = Target(args.nnodes, nproc, args.max_restarts, gpu_memory_gib=memory, on_this_machine=True)
    overrides = fill_data_parallel(args.overrides, target)
    validate_launch(compose(overrides), target)
    command = torchrun_command(overrides, nproc, args.nnodes, args.max_restarts, args.rdzv_endpoint,
                               args.rdzv_id, args.module)
    print(f"dsv3-launch: {shell_line(command)}", flush=True)
    if args.dry_run:
        return 0
    exec_torchrun(command)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpu_memory_gib() -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 1024 ** 3


# ----------------------------------------------------------------------------- slurm
def slurm(argv: list[str]) -> int:
    from launch.slurm import SlurmJob, render_sbatch, submit

    parser = _parser("slurm", "Validate, render an sbatch script and submit it (or print it with --dry-run).")
    parser.add_argument("--config", default=None, help="YAML file with SlurmJob fields; flags override it")
    for spec in fields(SlurmJob):
        flag = "--" + spec.name.replace("_", "-")
        if spec.name == "requeue":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=spec.__doc__)
        elif spec.name == "sbatch_args":
            parser.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=None,
                                help="an extra #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)")
        else:
            kind = {"nodes": int, "gpus_per_node": int, "cpus_per_task": int, "max_restarts": int,
                    "requeue_signal_s": int, "port": int, "gpu_memory": float}.get(spec.name, str)
            parser.add_argument(flag, type=kind, default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    args = _parse(parser, argv)
    job = _slurm_job(args)
    job.check()
    target = Target(job.nodes, job.gpus_per_node, job.max_restarts, requeue=job.requeue,
                    gpu_memory_gib=job.gpu_memory, on_this_machine=False)
    overrides = fill_data_parallel(args.overrides, target)
    cfg = compose(overrides)
    validate_launch(cfg, target)
    output_dir = Path(job.output_dir or cfg.run_dir).expanduser().absolute()
    overrides = [*overrides, f"hydra.run.dir={output_dir}"]
    script = render_sbatch(job, overrides, Path.cwd(), output_dir, cfg.name)
    if args.dry_run:
        print(script, end="")
        return 0
    output_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the --output folder
    script_path = output_dir / "sbatch.sh"
    script_path.write_text(script)
    job_id = submit(script_path)
    print(f"submitted job {job_id}: {job.nodes} node(s) x {job.gpus_per_node} GPUs; "
          f"log {output_dir}/slurm-{job_id}.out")
    return 0


def _slurm_job(args: argparse.Namespace):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from launch.slurm import SlurmJob

    flags = {f.name: getattr(args, f.name) for f in fields(SlurmJob) if getattr(args, f.name) is not None}
    try:
        merged = OmegaConf.structured(SlurmJob)
        if args.config:
            merged = OmegaConf.merge(merged, OmegaConf.load(args.config))
        return OmegaConf.to_object(OmegaConf.merge(merged, flags))
    except (OmegaConfBaseException, OSError) as error:
        raise ConfigError(f"slurm job config: {str(error).splitlines()[0]}") from None


def slurm_node(argv: list[str]) -> int:
    """Runs on each node of the allocation (the sbatch script's srun step)."""
    from launch.slurm import rendezvous_from_env

    parser = _parser("slurm-node", "Inside a Slurm job: SLURM_* -> torchrun rendezvous, validate, exec torchrun.")
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--max-restarts", type=int, default=0)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--module", default=DEFAULT_MODULE)
    parser.add_argument("--dry-run", action="store_true", help="print the torchrun command, start nothing")
    args = _parse(parser, argv)
    rdzv = rendezvous_from_env(os.environ, args.port)
    target = Target(rdzv.nnodes, args.gpus_per_node, args.max_restarts, on_this_machine=True)
    validate_launch(compose(args.overrides), target)
    command = torchrun_command(args.overrides, args.gpus_per_node, rdzv.nnodes, args.max_restarts,
                               rdzv.endpoint, rdzv.job_id, args.module)
    print(f"dsv3-launch node {rdzv.node_rank}/{rdzv.nnodes}: {shell_line(command)}", flush=True)
    if args.dry_run:
        return 0
    exec_torchrun(command)


# ----------------------------------------------------------------------------- plan
def plan(argv: list[str]) -> int:
    from launch.layout import Layout
    from launch.memory import PRECISIONS, RECOMPUTE
    from launch.plan import check_fits, inputs_from_config, render

    parser = _parser("plan", "Print the process layout and a per-GPU memory estimate; launch nothing. "
                             "Layout from parallel.pp / dp / ep / zero_stage / schedule overrides.")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--world-size", type=int, default=None, help="GPUs in all (default nodes x gpus-per-node)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default=None,
                        help="byte sizes of weights/grads/optimizer/activations (default: train.precision)")
    parser.add_argument("--recompute", choices=list(RECOMPUTE), default="none",
                        help="activation recomputation (the trainer does none today)")
    args = _parse(parser, argv)
    parallel, rest = split_parallel(args.overrides)
    cfg = compose(rest)
    world = args.world_size or args.nodes * args.gpus_per_node
    pp = parallel.get("pp", 1)
    if not isinstance(pp, int) or pp < 1 or world % pp:
        raise ConfigError(f"parallel.pp ({pp}) must divide the world size ({world}): choose pp in "
                          f"{[d for d in range(1, world + 1) if world % d == 0]}")
    layout = Layout(pp=pp, dp=parallel.get("dp", world // pp), ep=parallel.get("ep", 1),
                    zero_stage=parallel.get("zero_stage", 1),
                    schedule=parallel.get("schedule") or ("1f1b" if pp > 1 else "none"),
                    gpus_per_node=args.gpus_per_node)
    if layout.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage ({layout.zero_stage}) must be 1, 2 or 3")
    layout.check(cfg.model, cfg.train.grad_accum, world_size=world)
    inputs = inputs_from_config(cfg, layout, args.gpu_memory, args.precision, args.recompute)
    print(render(inputs), flush=True)
    check_fits(inputs)
    print(f"fits: yes ({args.gpu_memory:g} GiB per GPU)")
    return 0
