"""Hydra sweeps (``dsv3-train -m ...``): validate every job first, group runs, map Slurm tasks to ranks.

:class:`LaunchCallback` is a Hydra callback (``hydra.callbacks.launch._target_:
launch.sweep.LaunchCallback``); it does three things:

1. ``on_multirun_start`` (on the submitting machine, before the launcher starts anything):
   expands the sweep the way Hydra's basic sweeper does and composes and validates every job,
   so a bad value in job 7 stops the sweep before job 0 runs.
2. ``on_job_start``: sets ``WANDB_RUN_GROUP`` to the sweep name (the sweep directory's name,
   ``<name>-sweep`` by default) unless ``logger.group`` is set, so a sweep's runs share a group.
3. ``on_job_start`` under hydra-submitit-launcher with ``tasks_per_node > 1``: each Slurm task is
   one training rank, and torch's env:// rendezvous variables (RANK, WORLD_SIZE, LOCAL_RANK,
   MASTER_ADDR, MASTER_PORT) come from SLURM_*. Every rank of a job gets the same run directory
   (``<sweep dir>/<job num>``); different jobs get different directories and ports.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Mapping

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from launch.nodelist import head_node
from launch.slurm import rendezvous_port


class LaunchCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from dsv3_train.config import ConfigError

        try:
            validate_sweep(config)
        except ConfigError as error:
            # Hydra turns a callback's Exception into a warning; SystemExit stops the sweep.
            raise SystemExit(f"error: {error}") from None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.update(job_environment(config, os.environ))


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """``['a=1,2', 'b=x']`` -> ``[['a=1', 'b=x'], ['a=2', 'b=x']]`` (Hydra's basic sweeper order)."""
    from launch.compose import parse_overrides

    choices = []
    for parsed in parse_overrides(overrides):
        if parsed.is_sweep_override():
            key = parsed.get_key_element()
            choices.append([f"{key}={value}" for value in parsed.sweep_string_iterator()])
        else:
            choices.append([parsed.input_line])
    return [list(job) for job in itertools.product(*choices)]


def validate_sweep(config: DictConfig) -> int:
    """Compose and validate every job of the sweep; returns the number of jobs."""
    from dsv3_train.config import ConfigError
    from launch.compose import compose
    from launch.validate import Target, validate_launch

    target = sweep_target(config.hydra.launcher, os.environ)
    jobs = expand_sweep(list(config.hydra.overrides.task))
    for number, overrides in enumerate(jobs):
        try:
            validate_launch(compose(overrides), target)
        except ConfigError as error:
            raise ConfigError(f"sweep job {number} ({' '.join(overrides)}): {error}") from None
    return len(jobs)


def sweep_target(launcher: DictConfig, env: Mapping[str, str]):
    """The processes each job of the sweep will have: nodes x tasks_per_node under submitit
    (started on Slurm, or here by submitit_local), else this process's torchrun / Slurm world."""
    from launch.validate import Target

    launcher_class = str(launcher.get("_target_", ""))
    if "submitit" in launcher_class:
        return Target(nnodes=int(launcher.get("nodes") or 1), nproc_per_node=int(launcher.get("tasks_per_node") or 1),
                      on_this_machine=launcher_class.endswith("LocalLauncher"))
    return Target(nproc_per_node=int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or 1))


def sweep_group(config: DictConfig) -> str | None:
    """The wandb group of a multirun job: the sweep directory's name; None outside sweeps or when
    ``logger.group`` is set."""
    if str(OmegaConf.select(config, "hydra.mode")) != "RunMode.MULTIRUN":
        return None
    if OmegaConf.select(config, "logger.group") is not None:
        return None
    return Path(str(config.hydra.sweep.dir)).name


def job_environment(config: DictConfig, env: Mapping[str, str]) -> dict[str, str]:
    """Variables one job needs: the wandb group, and torch's rendezvous for a Slurm task."""
    update = {}
    group = sweep_group(config)
    if group is not None:
        update["WANDB_RUN_GROUP"] = group
    update.update(torch_env_from_slurm_task(env, job_num=int(OmegaConf.select(config, "hydra.job.num") or 0)))
    return update


def torch_env_from_slurm_task(env: Mapping[str, str], job_num: int = 0) -> dict[str, str]:
    """RANK & co. for a process that *is* one Slurm task of a multi-task job (submitit); nothing
    under torchrun (which sets them itself) or when the job has a single task."""
    if "TORCHELASTIC_RUN_ID" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return {}
    ntasks = int(env["SLURM_NTASKS"])
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    per_node = env.get("SLURM_NTASKS_PER_NODE", str(ntasks // nnodes)).split("(")[0]
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(ntasks), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": per_node, "MASTER_ADDR": head_node(env["SLURM_JOB_NODELIST"]),
            "MASTER_PORT": str(rendezvous_port(env["SLURM_JOB_ID"]) + job_num % 100)}
