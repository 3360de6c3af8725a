"""ParallelDims: validate the pipeline x data x expert layout, then build one DeviceMesh.

Ranks are laid out ``rank = pp_index * dp + dp_index`` with the data-parallel axis split as
``dp_index = edp_index * ep + ep_index``: experts are sharded inside the data-parallel axis
(DeepSeek-V3), and the ``ep`` ranks of one expert group are contiguous so that an EP group stays
inside a node whenever ep <= GPUs per node. The mesh has named axes ``pp`` and ``dp``; its expert
view has axes ``pp``, ``edp`` and ``ep`` over the same ranks. Groups are handed out from the
mesh; nothing is stored at module level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dsv3_train.config import ConfigError, ModelConfig


def backend_for(device_type: str) -> str:
    """NCCL on CUDA, gloo on CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelDims:
    pp: int = 1
    """Pipeline stages."""
    dp: int = 1
    """Data-parallel ranks per pipeline stage (dense parameters are replicated/ZeRO-sharded here)."""
    ep: int = 1
    """Expert-parallel ranks: each holds n_routed_experts / ep experts; ep divides dp."""

    def __post_init__(self) -> None:
        for name in ("pp", "dp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{name} ({value}) must be an integer >= 1")
        if self.dp % self.ep:
            raise ConfigError(f"parallel.ep ({self.ep}) must divide parallel.dp ({self.dp}): experts are "
                              f"sharded inside the data-parallel axis; choose ep in {_divisors(self.dp)}")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: replicas of each expert shard."""
        return self.dp // self.ep

    def validate(self, world_size: Optional[int] = None, model: Optional[ModelConfig] = None) -> None:
        """Check the layout against the launched world and the model; call before any process group."""
        if world_size is not None and world_size != self.world_size:
            raise ConfigError(
                f"world size ({world_size}) must equal pp ({self.pp}) x dp ({self.dp}) = {self.world_size}: "
                f"launch {self.world_size} processes or set parallel.dp={world_size // self.pp}"
                if world_size % self.pp == 0 else
                f"world size ({world_size}) must equal pp ({self.pp}) x dp ({self.dp}) = {self.world_size}: "
                f"launch {self.world_size} processes or choose pp in {_divisors(world_size)}")
        if model is not None:
            if model.n_routed_experts % self.ep:
                raise ConfigError(
                    f"parallel.ep ({self.ep}) must divide model.n_routed_experts ({model.n_routed_experts}): "
                    f"choose ep in {[d for d in _divisors(model.n_routed_experts) if self.dp % d == 0]}")
            stages = model.n_layers
            if self.pp > stages:
                raise ConfigError(f"parallel.pp ({self.pp}) exceeds model.n_layers ({stages}): every "
                                  f"pipeline stage needs at least one block; choose pp <= {stages}")

    def rank_coordinates(self, rank: int) -> dict[str, int]:
        """Where a global rank sits: its pp, dp, edp and ep indices."""
        pp_index, dp_index = divmod(rank, self.dp)
        edp_index, ep_index = divmod(dp_index, self.ep)
        return {"pp": pp_index, "dp": dp_index, "edp": edp_index, "ep": ep_index}

    def build_mesh(self, device_type: str = "cpu") -> "ParallelMesh":
        """Create the process groups (needs an initialised default group of world_size ranks)."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        self.validate(world_size=dist.get_world_size())
        mesh = init_device_mesh(device_type, (self.pp, self.dp), mesh_dim_names=("pp", "dp"))
        expert_mesh = mesh._unflatten(1, (self.edp, self.ep), ("edp", "ep"))
        counts = None
        if self.ep > 1:  # every rank creates every ep group's twin, in the same order
            ep_groups = [[pp * self.dp + edp * self.ep + e for e in range(self.ep)]
                         for pp in range(self.pp) for edp in range(self.edp)]
            counts, _ = dist.new_subgroups_by_enumeration(ep_groups)
        return ParallelMesh(self, mesh, expert_mesh, counts)


@dataclass
class ParallelMesh:
    """The built mesh and its expert view; hand groups to the code that needs them."""

    dims: ParallelDims
    mesh: object  # DeviceMesh with axes ("pp", "dp")
    expert_mesh: object  # DeviceMesh with axes ("pp", "edp", "ep")
    ep_counts: object = None
    """A second group over this rank's ep group (ep > 1): the dispatcher's per-expert count
    exchange runs there, so that it never queues behind rows in flight on the ep group (NCCL runs
    a communicator's collectives in issue order; the count is needed at once, the rows are not)."""

    def group(self, axis: str):
        """Process group of this rank along a named axis: pp, dp, edp, ep (or ep_counts)."""
        if axis in ("pp", "dp"):
            return self.mesh.get_group(axis)
        if axis in ("edp", "ep"):
            return self.expert_mesh.get_group(axis)
        if axis == "ep_counts":
            return self.ep_counts if self.ep_counts is not None else self.expert_mesh.get_group("ep")
        raise ValueError(f"unknown mesh axis {axis!r}: use one of pp, dp, edp, ep, ep_counts")
