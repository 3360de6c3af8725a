"""Atomic, resumable checkpoints in torch.distributed.checkpoint (DCP) format.

Layout: ``<run_dir>/checkpoints/step_00000100/`` holding DCP shards (model, optimizer, RNG) and
``trainer_state.json`` (step, data position, logger ids). A checkpoint is written into a hidden
temporary directory and renamed into place, so a crash mid-save never leaves a half-written
``step_*`` directory; the previous checkpoint stays loadable. The same format serves the sharded
multi-rank case: every rank writes its own shards, and DCP reshards on load, so a checkpoint
resumes at another data/expert-parallel layout. ``layout`` (see
``parallel.distributed.ExpertCheckpointLayout``) translates tensors whose global shape DCP cannot
see on its own, such as expert-parallel weights, to and from a global form.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

STEP_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{STEP_PREFIX}{step:08d}"


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under root, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / TRAINER_STATE).exists()]
    return max(done, key=lambda p: int(p.name[len(STEP_PREFIX):]), default=None)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], keep_last: int = 2,
                    process_group: Optional[dist.ProcessGroup] = None, layout=None) -> Path:
    """Write step's checkpoint atomically and prune all but the newest keep_last."""
    root = Path(root)
    final = checkpoint_dir(root, step)
    staging = root / f".tmp-{final.name}"
    is_writer = not _distributed() or dist.get_rank(process_group) == 0
    if is_writer:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier(process_group)
    model_state, optim_state = get_state_dict(model, optimizer)
    if layout is not None:
        layout.to_global(model_state, optim_state)
    state = {"model": model_state, "optim": optim_state, "rng": torch.get_rng_state()}
    with warnings.catch_warnings():  # DCP warns that a single process is single-process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(staging), process_group=process_group, no_dist=not _distributed())
    if is_writer:
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        _fsync_dir(staging)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_dir(root)
        _prune(root, keep_last)
    _barrier(process_group)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    process_group: Optional[dist.ProcessGroup] = None, layout=None) -> dict[str, Any]:
    """Restore model, optimizer and RNG in place from path; return the trainer state."""
    path = Path(path)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"checkpoint.resume ({path}) is not a complete checkpoint directory "
                                f"(no {TRAINER_STATE}): point it at a {STEP_PREFIX}* directory")
    model_state, optim_state = get_state_dict(model, optimizer)
    if layout is not None:
        layout.to_global(model_state, optim_state, gather=False)  # templates of the global shapes
    # DCP keeps one rank's copy of a non-tensor value such as a param group's list of names; under
    # pipeline parallelism ranks hold different parameters, so each keeps its own list.
    own_names = [list(group["params"]) for group in optim_state.get("param_groups", [])]
    state = {"model": model_state, "optim": optim_state, "rng": torch.get_rng_state()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), process_group=process_group, no_dist=not _distributed())
    for group, names in zip(state["optim"].get("param_groups", []), own_names):
        group["params"] = names
    if layout is not None:
        layout.to_local(state["model"], state["optim"])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"])
    return json.loads((path / TRAINER_STATE).read_text())


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted((p for p in root.iterdir() if p.name.startswith(STEP_PREFIX)),
                   key=lambda p: int(p.name[len(STEP_PREFIX):]))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _barrier(process_group: Optional[dist.ProcessGroup]) -> None:
    if _distributed():
        dist.barrier(group=process_group)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
