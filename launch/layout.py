"""Where every rank sits: process groups, pipeline stages and experts, for a planned layout.

The rank order is ``parallel/mesh.py``'s: ``rank = pp_index * dp + edp_index * ep + ep_index``.
Stage placement and the schedule rules are the pipeline package's (``parallel.pipeline.layout`` /
``validate``): 1F1B and ZB1P put stage r on pp rank r; DualPipe puts stage r *and* stage PP-1-r on
pp rank r (two copies of the model, one per direction); DualPipeV splits the model into 2P stages
and puts stages r and 2P-1-r on pp rank r. For planning, blocks are split into contiguous stages
as evenly as possible (earlier stages take the extra block, since the last stage also holds the
output head and the MTP modules); the pipeline runtime itself wants equal stages.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsv3_train.config import ConfigError
from parallel.mesh import ParallelDims
from parallel.pipeline import SCHEDULES as PIPELINE_SCHEDULES, ScheduleError
from parallel.pipeline import layout as pipeline_layout, validate as validate_schedule

SCHEDULES = ("none", *PIPELINE_SCHEDULES)
IN_FLIGHT = {"none": lambda pp: 1, "1f1b": lambda pp: pp, "zb1p": lambda pp: pp,
             "dualpipe": lambda pp: pp + 1, "dualpipev": lambda pp: 2 * pp + 1}
"""Micro-batch x stage activations a rank holds at its peak (DualPipe table; DualPipeV's stages are
half as deep, on a 2P-stage model)."""


@dataclass(frozen=True)
class Layout:
    pp: int
    dp: int
    ep: int
    zero_stage: int = 1
    schedule: str = "none"
    """Pipeline schedule: none (pp = 1), 1f1b, zb1p, dualpipe or dualpipev."""
    gpus_per_node: int = 8

    # the mesh's own derivations (pp x dp, dp / ep), without ParallelDims' eager checks: a Layout may
    # be built from a plan that ``check`` is about to reject
    world_size = ParallelDims.world_size
    edp = ParallelDims.edp

    @property
    def n_stages(self) -> int:
        return 1 if self.schedule == "none" else pipeline_layout(self.schedule, self.pp)[0]

    def stages_of(self, pp_rank: int) -> list[int]:
        """Model stages held by a pipeline rank (direction 0 first)."""
        if self.schedule == "none":
            return [0]
        _, placement = pipeline_layout(self.schedule, self.pp)
        return [stage for ranks in placement for stage, rank in enumerate(ranks) if rank == pp_rank]

    def chunks_in_flight(self) -> int:
        return IN_FLIGHT[self.schedule](self.pp)

    def check(self, model, microbatches: int, world_size: int | None = None) -> None:
        """Divisibility and schedule rules; ConfigError naming the value and the fix."""
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"parallel.schedule ({self.schedule!r}) is unknown: choose one of {list(SCHEDULES)}")
        dims = ParallelDims(self.pp, self.dp, self.ep)  # ep | dp, degrees >= 1
        if world_size is not None and world_size % self.gpus_per_node and world_size > self.gpus_per_node:
            raise ConfigError(f"world size ({world_size}) is not a whole number of nodes of {self.gpus_per_node} "
                              f"GPUs: use a multiple of {self.gpus_per_node} GPUs")
        dims.validate(world_size=world_size, model=model)
        if self.pp == 1 and self.schedule != "none":
            raise ConfigError(f"parallel.schedule ({self.schedule}) needs parallel.pp >= 2: raise parallel.pp "
                              f"or set parallel.schedule=none")
        if self.pp > 1 and self.schedule == "none":
            raise ConfigError(f"parallel.pp ({self.pp}) needs a pipeline schedule: set parallel.schedule to one "
                              f"of {list(PIPELINE_SCHEDULES)}")
        self._check_schedule(microbatches)
        if self.n_stages > model.n_layers:
            raise ConfigError(f"{self.schedule} on parallel.pp ({self.pp}) needs {self.n_stages} stages but "
                              f"model.n_layers is {model.n_layers}: every stage needs a block; lower parallel.pp")

    def _check_schedule(self, microbatches: int) -> None:
        if self.schedule == "none":
            return
        try:
            validate_schedule(self.schedule, self.pp, microbatches)
        except ScheduleError as error:  # the pipeline's rule, in the config's words
            message = str(error)
            if "microbatches" in message:
                message = message.replace("microbatches", "train.grad_accum") + " (micro-batches per step)"
            raise ConfigError(message) from None


def stage_blocks(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous block ranges per stage, sizes differing by at most one (extra blocks first)."""
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for stage in range(n_stages):
        size = base + (stage < extra)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def rank_of(layout: Layout, pp_index: int, edp_index: int, ep_index: int) -> int:
    return pp_index * layout.dp + edp_index * layout.ep + ep_index


def groups(layout: Layout) -> dict[str, list[list[int]]]:
    """Every process group along each mesh axis, as lists of global ranks."""
    L, ranks = layout, range(layout.world_size)
    return {
        "pp": [[d + p * L.dp for p in range(L.pp)] for d in range(L.dp)],
        "dp": [list(ranks[p * L.dp:(p + 1) * L.dp]) for p in range(L.pp)],
        "ep": [[rank_of(L, p, e, i) for i in range(L.ep)] for p in range(L.pp) for e in range(L.edp)],
        "edp": [[rank_of(L, p, e, i) for e in range(L.edp)] for p in range(L.pp) for i in range(L.ep)],
    }


def format_ranks(ranks: list[int]) -> str:
    """[0..63] -> '0-63'; an arithmetic run -> '0,128,...,1920'; a short list as is."""
    if len(ranks) == 1:
        return str(ranks[0])
    step = ranks[1] - ranks[0]
    arithmetic = all(b - a == step for a, b in zip(ranks, ranks[1:]))
    if arithmetic and step == 1:
        return f"{ranks[0]}-{ranks[-1]}"
    if arithmetic and len(ranks) > 4:
        return f"{ranks[0]},{ranks[1]},...,{ranks[-1]}"
    return ",".join(map(str, ranks))


def nodes_of(layout: Layout, ranks: list[int]) -> list[int]:
    return sorted({rank // layout.gpus_per_node for rank in ranks})
