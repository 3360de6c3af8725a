"""Cut a Transformer into pipeline stages and keep the ones a rank runs.

Stage s of S holds the contiguous blocks ``stage_layers(n_layers, S)[s]``; stage 0 also embeds the
tokens, the last stage also holds the final norm, the output head, the MTP modules and the loss.
S is pp for 1F1B, ZB1P and DualPipe, 2 * pp for DualPipeV (``schedules.layout``).

The embedding has two users: stage 0, and the MTP modules of the last stage, which embed the
tokens t_{i+k} with the *main* embedding (DeepSeek-V3 shares it). Where the two stages live:

* DualPipe: ranks 0 and pp-1 each hold stage 0 of one direction and the last stage of the other,
  so each holds one embedding that both of its chunks use (shared physically, as DeepSeek's
  paper intends). DualPipeV: rank 0 holds stages 0 and 2pp-1: the same.
* 1F1B / ZB1P with pp > 1: the last rank holds a *copy* of the embedding, initialised identically
  and kept identical by summing its gradient with rank 0's before every optimizer step (what
  Megatron does for tied embeddings). Only rank 0's copy counts in the gradient norm.

DualPipe holds two copies of every stage: rank r runs stage r for direction 0 and stage pp-1-r for
direction 1, and rank pp-1-r the same two stages the other way round. The pair holds the same
parameter set; the runtime sums the pair's gradients (and router loads) before the step, so the
parameters stay identical. A rank's direction-0 chunk is the copy it counts in the norm.

The embedding is held by the rank (``RankStages.embed``), never registered inside a stage, so it
is one FSDP unit of its own and each chunk can call it. Parameter names are the Transformer's
(``layers.3.attn.wq.weight``, ``embed.weight``): ``RankStages.canonical_parameters`` maps them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

from torch import nn

from dsv3_train.model.moe import Router
from dsv3_train.model.transformer import Transformer

from .schedules import layout, stage_layers, validate


class PipelineStage(nn.Module):
    """Stage ``index`` of ``n_stages``: its blocks, plus norm/head/MTP on the last stage.

    The forward itself is written as phases in ``overlap.stage_program``: a stage is data here.
    """

    def __init__(self, model: Transformer, index: int, n_stages: int,
                 embed: Optional[nn.Embedding]):
        super().__init__()
        self.index, self.n_stages = index, n_stages
        self.layers = nn.ModuleDict({str(i): model.layers[i]
                                     for i in stage_layers(len(model.layers), n_stages)[index]})
        if self.is_last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
        # Held by the rank (see the module docstring); a list keeps nn.Module from registering it.
        self._embed = [embed] if (self.is_first or (self.is_last and len(model.mtp))) else [None]
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1

    @property
    def embed(self) -> nn.Embedding:
        return self._embed[0]

    def rope(self, seq_len: int):
        return self.rope_cos[:seq_len], self.rope_sin[:seq_len]

    def extra_repr(self) -> str:
        return f"stage {self.index} of {self.n_stages}, layers {list(self.layers)}"


@dataclass
class CopySync:
    """Parameters that have a copy on another pp rank: gradients are summed with it."""

    peer: int
    """pp index of the rank holding the copies."""
    names: list[str]
    """Canonical names, sorted: both ranks list them in the same order."""


@dataclass
class StagePlan:
    """What a rank of a schedule holds: its chunks, whether it holds an embedding, its copies."""

    schedule: str
    pp: int
    pp_rank: int
    n_stages: int
    chunks: dict[tuple[int, int], int]
    """(direction, stage) -> stage, for the chunks this rank runs (DualPipe: two directions)."""
    holds_embed: bool
    copy_peer: Optional[int] = None
    """pp index of the rank whose parameters this rank's copies mirror (None: no copies)."""
    embed_is_copy: bool = False
    """1F1B-like: this rank's embedding is the last stage's copy of rank 0's."""
    owned_stages: set[int] = field(default_factory=set)
    """Stages whose parameters this rank counts in the gradient norm."""


def plan_stages(schedule: str, pp: int, pp_rank: int, n_layers: int, mtp_depth: int) -> StagePlan:
    """The stage placement of ``schedule`` on ``pp`` ranks, seen from ``pp_rank``."""
    validate(schedule, pp, 4 * pp, n_layers)  # layers must split into equal stages; says the fix
    n_stages, placement = layout(schedule, pp)
    chunks = {(d, s): s for d, row in enumerate(placement) for s, r in enumerate(row) if r == pp_rank}
    stages = set(chunks.values())
    last = n_stages - 1
    holds_embed = 0 in stages or (last in stages and mtp_depth > 0)
    plan = StagePlan(schedule, pp, pp_rank, n_stages, chunks, holds_embed)
    if schedule == "dualpipe":
        plan.copy_peer = pp - 1 - pp_rank
        plan.owned_stages = {s for (d, s) in chunks if d == 0}
    else:
        plan.owned_stages = stages
        if holds_embed and 0 not in stages:  # 1F1B / ZB1P: the last rank's MTP embedding copy
            plan.copy_peer, plan.embed_is_copy = placement[0][0], True
        elif holds_embed and mtp_depth > 0 and last not in stages:
            plan.copy_peer = placement[0][last]  # rank 0's side of the same pair
    return plan


class RankStages(nn.Module):
    """The chunks one pp rank runs, and the embedding they share (see the module docstring).

    An ``nn.Module`` so that the optimizer, ``update_expert_biases`` and ``train()`` see every
    parameter once; its forward is never called (the runtime runs the chunks).
    """

    def __init__(self, model: Transformer, plan: StagePlan):
        super().__init__()
        self.plan = plan
        self.cfg = model.cfg
        self.embed = model.embed if plan.holds_embed else None
        self.stages = nn.ModuleDict({
            f"stage{s}": PipelineStage(model, s, plan.n_stages, self.embed)
            for s in sorted(set(plan.chunks.values()))})

    def chunk(self, direction: int, stage: int) -> PipelineStage:
        """The module running ``stage`` for micro-batches of ``direction``."""
        return self.stages[f"stage{self.plan.chunks[(direction, stage)]}"]

    def zero_roots(self) -> list[nn.Module]:
        """The modules that are FSDP roots under ZeRO: the embedding, then each stage."""
        return ([self.embed] if self.embed is not None else []) + list(self.stages.values())

    def canonical_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters by their name in the unsplit Transformer."""
        return {canonical_name(name): param for name, param in self.named_parameters()}

    def stage_of(self, name: str) -> int:
        """The stage a canonical parameter name belongs to."""
        if name.startswith("embed."):
            return 0
        if name.startswith("layers."):
            layer = int(name.split(".")[1])
            per = self.cfg.n_layers // self.plan.n_stages
            return layer // per
        return self.plan.n_stages - 1  # norm, head, mtp

    def copy_sync(self) -> Optional[CopySync]:
        """The parameters whose gradients are summed with another rank's copies, or None."""
        plan = self.plan
        if plan.copy_peer is None:
            return None
        names = sorted(self.canonical_parameters())
        if plan.schedule != "dualpipe":
            names = [n for n in names if n.startswith("embed.")]
        return CopySync(plan.copy_peer, names)

    def counts_in_norm(self, name: str) -> bool:
        """Whether this rank's copy of a parameter is the one counted in the global norm."""
        if name.startswith("embed."):
            return not self.plan.embed_is_copy and (self.plan.schedule != "dualpipe"
                                                    or 0 in self.plan.owned_stages)
        return self.stage_of(name) in self.plan.owned_stages

    def routers_in_order(self) -> Iterator[tuple[str, nn.Module]]:
        """Routers by canonical name, sorted: the order both ranks of a DualPipe pair use."""
        named = {}
        for name, module in self.named_modules():
            if isinstance(module, Router):
                named[canonical_name(name)] = module
        return iter(sorted(named.items()))


def canonical_name(name: str) -> str:
    """A name in ``RankStages`` ("stages.stage1.layers.2.attn.wq.weight") -> its name in the
    unsplit Transformer ("layers.2.attn.wq.weight")."""
    return name.split(".", 2)[2] if name.startswith("stages.") else name


def split_model(model: Transformer, schedule: str, pp: int, pp_rank: int) -> RankStages:
    """Keep the stages ``pp_rank`` runs under ``schedule`` (build ``model`` identically everywhere,
    e.g. from one seed, so that copies start equal)."""
    cfg = model.cfg
    plan = plan_stages(schedule, pp, pp_rank, cfg.n_layers, len(model.mtp))
    return RankStages(model, plan)

