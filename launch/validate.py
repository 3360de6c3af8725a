"""Pre-flight checks: everything that can be refused before a single process starts.

``dsv3_train.config`` already refuses bad values when the config is composed (ranges, model
shape, ep | dp, experts divisible by ep). Here are the rules that need to know where and how
the run starts (:class:`Target`): the world size the launcher will create, elastic restarts and
Slurm requeues (which only help when a restarted run resumes), paths, the wandb key, the
precision backend on the machine that trains, and the per-GPU memory estimate.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dsv3_train.config import Config, ConfigError
from launch.compose import override_value
from launch.layout import Layout


@dataclass(frozen=True)
class Target:
    """Where and how the training processes will start."""

    nnodes: int = 1
    nproc_per_node: int = 1
    max_restarts: int = 0
    """torchrun restarts all workers this often after a failure."""
    requeue: bool = False
    """Slurm may requeue the job (preemption, time limit)."""
    gpu_memory_gib: Optional[float] = None
    """Check the memory estimate against this; None skips it (CPU runs)."""
    on_this_machine: bool = True
    """The processes start here: check this machine's GPUs and precision backend."""

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def fill_data_parallel(overrides: list[str], target: Target) -> list[str]:
    """Add ``parallel.dp=world/pp`` when the overrides leave dp unset; an explicit dp is kept
    (and checked by :func:`validate_launch`)."""
    if target.nnodes < 1 or target.nproc_per_node < 1:
        raise ConfigError(f"nodes ({target.nnodes}) and processes per node ({target.nproc_per_node}) must be >= 1")
    if override_value(overrides, "parallel.dp") is not None:
        return list(overrides)
    pp = override_value(overrides, "parallel.pp") or 1
    if not isinstance(pp, int) or pp < 1 or target.world_size % pp:
        raise ConfigError(f"parallel.pp ({pp}) must divide the world size ({target.world_size} = "
                          f"{target.nnodes} node(s) x {target.nproc_per_node}): choose pp in "
                          f"{[d for d in range(1, target.world_size + 1) if target.world_size % d == 0]}")
    return [*overrides, f"parallel.dp={target.world_size // pp}"]


def layout_of(cfg: Config, gpus_per_node: int = 8) -> Layout:
    p = cfg.parallel
    schedule = getattr(p, "schedule", None) or ("1f1b" if p.pp > 1 else "none")
    return Layout(p.pp, p.dp, p.ep, p.zero_stage, schedule, gpus_per_node)


def validate_launch(cfg: Config, target: Target) -> None:
    """Every launcher-level rule, in the order a user would fix them; ConfigError on the first."""
    _check_target(target)
    layout = layout_of(cfg, target.nproc_per_node)
    layout.check(cfg.model, cfg.train.grad_accum, world_size=target.world_size)
    _check_restarts(cfg, target)
    _check_paths(cfg)
    _check_wandb(cfg)
    if target.on_this_machine:
        from dsv3_train.trainer import resolve_device

        check_precision_backend(cfg)
        resolve_device(cfg.train.device)  # train.device=cuda needs a GPU where the processes start
        if cfg.train.device != "cpu":
            _check_visible_gpus(target)
    if target.gpu_memory_gib is not None:
        from launch.plan import check_fits, inputs_from_config

        check_fits(inputs_from_config(cfg, layout, target.gpu_memory_gib), suggest_recompute=False)


def _check_target(target: Target) -> None:
    if target.max_restarts < 0:
        raise ConfigError(f"--max-restarts ({target.max_restarts}) must be >= 0 (0 = fail on the first crash)")
    if target.nnodes < 1 or target.nproc_per_node < 1:
        raise ConfigError(f"nodes ({target.nnodes}) and processes per node ({target.nproc_per_node}) must be >= 1")


def _check_restarts(cfg: Config, target: Target) -> None:
    """A restart (torchrun) or requeue (Slurm) only helps if the new processes resume."""
    if not (target.max_restarts or target.requeue):
        return
    why = f"--max-restarts {target.max_restarts}" if target.max_restarts else "a requeued Slurm job"
    off = "--max-restarts 0" if target.max_restarts else "--no-requeue"
    if cfg.checkpoint.resume == "never":
        raise ConfigError(f"checkpoint.resume (never) would make {why} start again from step 0: set "
                          f"checkpoint.resume=auto (or {off})")
    if cfg.checkpoint.every == 0:
        raise ConfigError(f"checkpoint.every (0) saves only at the end, so {why} would repeat the whole run: "
                          f"set checkpoint.every to a step count, e.g. checkpoint.every=100")


def _check_paths(cfg: Config) -> None:
    from dsv3_train.data import check_source

    check_source(cfg.data)
    if cfg.data.tokenizer is not None and not Path(cfg.data.tokenizer).expanduser().is_file():
        raise ConfigError(f"data.tokenizer ({cfg.data.tokenizer}) is not a file: point it at a tokenizer.json "
                          f"or set data.tokenizer=null to train one")
    resume = cfg.checkpoint.resume
    if resume in ("auto", "never"):
        return
    from dsv3_train.checkpoint import TRAINER_STATE

    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ConfigError(f"checkpoint.resume ({resume}) does not exist: use auto, never or a "
                          f"<run_dir>/checkpoints/step_* directory")
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"checkpoint.resume ({resume}) is not a complete checkpoint (no {TRAINER_STATE}): "
                          f"point it at a step_* directory, e.g. the newest under {path}")


def _check_wandb(cfg: Config) -> None:
    if cfg.logger.kind != "wandb" or cfg.logger.mode != "online":
        return
    netrc = Path.home() / ".netrc"
    if os.environ.get("WANDB_API_KEY") or (netrc.is_file() and "api.wandb.ai" in netrc.read_text()):
        return
    raise ConfigError("logger.mode (online) needs a wandb key and none is set: export WANDB_API_KEY, run "
                      "`wandb login`, or use logger.mode=offline (sync later with `wandb sync`)")


def check_precision_backend(cfg) -> None:
    """precision.fp8_backend=te needs CUDA and Transformer Engine where the processes start: the
    precision package's own check (dsv3_train/precision/te.py), run before anything starts."""
    precision = getattr(cfg, "precision", None)
    if precision is None or not getattr(precision, "uses_te", False):
        return
    from dsv3_train.precision.te import require_transformer_engine

    require_transformer_engine()


def _check_visible_gpus(target: Target) -> None:
    if not _cuda_available():
        return  # CPU workers (gloo): any number of processes
    import torch

    visible = torch.cuda.device_count()
    if target.nproc_per_node > visible:
        raise ConfigError(f"--nproc-per-node ({target.nproc_per_node}) exceeds the {visible} visible GPU(s): "
                          f"use --nproc-per-node {visible} or fewer (check CUDA_VISIBLE_DEVICES)")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
