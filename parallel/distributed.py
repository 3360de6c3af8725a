"""Multi-process training: the mesh from torchrun's environment, the parallelised model, and the
few operations the trainer does differently on many ranks.

``Trainer`` (dsv3_train/trainer.py) talks to a *runtime*: ``LocalRuntime`` for one process,
``DistributedRuntime`` here for many. The runtime slices the data (dp rank), switches gradient
synchronisation per micro-batch, clips by the global norm over all shards, sums router loads over
dp so every rank applies the same bias update, averages metrics over dp, and translates checkpoint
state between this rank's shards and a layout-independent global form, so a checkpoint written at
one (dp, ep) resumes at another.
"""
from __future__ import annotations

import datetime
import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from dsv3_train.config import Config, ConfigError, TrainConfig
from dsv3_train.model.moe import GroupedExperts
from dsv3_train.trainer import LocalRuntime
from parallel.expert import apply_expert_parallel
from parallel.mesh import ParallelDims, ParallelMesh
from parallel import zero


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun / Slurm launchers, 1 for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_launch(cfg: Config) -> ParallelDims:
    """Validate the layout against the launched processes, before any process group exists."""
    dims = ParallelDims(cfg.parallel.pp, cfg.parallel.dp, cfg.parallel.ep)
    world = launched_world_size()
    if world == 1 and dims.world_size > 1:
        raise ConfigError(
            f"parallel.dp ({dims.dp}) x parallel.pp ({dims.pp}) needs {dims.world_size} processes but this "
            f"is one process: launch with torchrun --nproc-per-node {dims.world_size} -m dsv3_train.train ...")
    dims.validate(world_size=world, model=cfg.model)
    return dims


def init_mesh(dims: ParallelDims, device_type: str = "cpu", timeout_s: float = 600.0) -> ParallelMesh:
    """Join the launcher's process group (env:// rendezvous) and build the mesh on ``device_type``
    (cuda: NCCL for CUDA tensors, gloo for the few CPU ones; set the CUDA device first)."""
    if not dist.is_initialized():
        dist.init_process_group(backend="cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return dims.build_mesh(device_type)


def parallelize(model: nn.Module, mesh: ParallelMesh, zero_stage: int) -> None:
    """Shard experts over ep (all-to-all dispatch), then ZeRO-shard dense params over dp and
    expert params over edp."""
    if mesh.dims.ep > 1:
        apply_expert_parallel(model, mesh.group("ep"), mesh.group("ep_counts"))
    zero.apply_zero(model, mesh, stage=zero_stage)


def mean_over(group, values: list[float]) -> list[float]:
    """Average per-rank scalars over the ranks of group."""
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, group=group)
    return (tensor / dist.get_world_size(group)).tolist()


class DistributedRuntime(LocalRuntime):
    """The trainer's view of many ranks (see the module docstring): the local micro-batch loop
    with gradient sync switched per micro-batch, plus the collectives."""

    def __init__(self, mesh: ParallelMesh, model: nn.Module, train: TrainConfig):
        super().__init__(train)
        self.mesh = mesh
        self.dp_group = mesh.group("dp")
        self.dp_rank, self.dp_size = dist.get_rank(self.dp_group), dist.get_world_size(self.dp_group)
        self.is_main = dist.get_rank() == 0
        self.reduce_load = zero.reduce_expert_load(mesh)
        self.checkpoint_layout = ExpertCheckpointLayout(model, mesh)

    def grad_sync(self, model: nn.Module, enabled: bool) -> None:
        zero.set_gradient_sync(model, enabled)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return zero.clip_grad_norm_(model, max_norm)

    def mean(self, values: list[float]) -> list[float]:
        return mean_over(self.dp_group, values)

    def reshard(self, model: nn.Module) -> None:
        zero.reshard(model)


class ExpertCheckpointLayout:
    """Checkpoint state <-> this rank's shards, for the expert weights and their optimizer states.

    ZeRO parameters are DTensors that DCP saves and reshards on its own. Expert weights are not:
    each ep rank holds a block of E/ep experts as its own tensor, ZeRO-sharded over edp, so their
    global (E, ...) shape is unknown to DCP. ``to_global`` gathers a block over edp and presents it
    as the ep-th row block of an (E, ...) DTensor on the ep mesh; edp replicas write identical
    chunks, which DCP deduplicates. ``to_local`` turns a loaded block back into this rank's shard.
    """

    def __init__(self, model: nn.Module, mesh: ParallelMesh, rename: Callable[[str], str] = str):
        """``rename``: a parameter's name in ``model`` -> its key in the state dicts handed in."""
        self.ep_mesh = mesh.expert_mesh["ep"]
        # a list in module order: every rank must issue the gathers below in the same order
        self.expert_names = [rename(f"{name}.{pname}") for name, module in model.named_modules()
                             if isinstance(module, GroupedExperts) for pname, _ in module.named_parameters()]
        self.specs = {}  # fqn -> (mesh, placements) of the ZeRO shard
        for name, param in model.named_parameters():
            if rename(name) in self.expert_names and isinstance(param, DTensor):
                self.specs[rename(name)] = (param.device_mesh, param.placements)

    def _tensors(self, model_state: dict, optim_state: dict):
        """(container, key, fqn) for every expert tensor in the two state dicts. The optimizer's
        per-parameter dicts are replaced by copies first: get_state_dict shares them with the
        live optimizer, which must keep its own shards."""
        per_param = optim_state.get("state", {})
        for fqn in self.expert_names:
            yield model_state, fqn, fqn
            if fqn in per_param:
                per_param[fqn] = dict(per_param[fqn])
                for key, value in per_param[fqn].items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        yield per_param[fqn], key, fqn

    def to_global(self, model_state: dict, optim_state: dict, gather: bool = True) -> None:
        """Expert entries become (E, ...) DTensors on the ep mesh. ``gather=False`` only builds
        empty templates of that shape (what a load fills), without gathering over edp."""
        for container, key, _ in self._tensors(model_state, optim_state):
            value = container[key]
            if not isinstance(value, DTensor):
                block = value
            elif gather:
                block = value.full_tensor()
            else:
                block = torch.empty(value.shape, dtype=value.dtype, device=value.device)
            container[key] = DTensor.from_local(block, self.ep_mesh, [Shard(0)], run_check=False)

    def to_local(self, model_state: dict, optim_state: dict) -> None:
        for container, key, fqn in self._tensors(model_state, optim_state):
            block = container[key].to_local()
            if fqn in self.specs:
                mesh, placements = self.specs[fqn]
                container[key] = distribute_tensor(block, mesh, placements, src_data_rank=None)
            else:
                container[key] = block


def destroy() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
