"""``dsv3-launch plan``: the process layout and a per-GPU memory estimate, launching nothing.

``estimate`` gives one :class:`RankMemory` per pipeline rank (all ranks of one pp index hold the
same amounts); ``check_fits`` refuses a layout whose worst rank exceeds the GPU's memory and
names the single changes that would fit, with their estimates; ``render`` prints the report.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dsv3_train.config import ConfigError
from launch import memory
from launch.layout import Layout, format_ranks, groups, nodes_of, stage_blocks
from launch.memory import GIB, Params


@dataclass(frozen=True)
class PlanInputs:
    """What a plan is computed from: the model and batch (from the config) and the layout."""

    model: object  # ModelConfig
    micro_batch_size: int
    seq_len: int
    grad_accum: int
    layout: Layout
    precision: str = "fp32"
    recompute: str = "none"
    gpu_memory_gib: float = 80.0

    @property
    def tokens_per_microbatch(self) -> int:
        return self.micro_batch_size * self.seq_len


@dataclass(frozen=True)
class RankMemory:
    """Estimated bytes on one GPU of pipeline rank ``pp_rank``."""

    pp_rank: int
    params: Params  # held by this GPU before ZeRO sharding (experts: this ep rank's share)
    weights: float
    grads: float
    optimizer: float
    activations: float
    kv_latents: float
    logits: float
    overhead: float = memory.OVERHEAD_GIB * GIB

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits + self.overhead


def stage_contents(inputs: PlanInputs, stage: int) -> tuple[Params, list[bool]]:
    """Parameters of one stage (all routed experts counted) and its blocks (True = MoE)."""
    m, layout = inputs.model, inputs.layout
    blocks = stage_blocks(m.n_layers, layout.n_stages)[stage]
    moe = [b >= m.n_dense_layers for b in blocks]
    params = sum((memory.block_params(m, is_moe) for is_moe in moe), Params())
    if stage == 0:
        params += Params(memory.embedding_params(m))
    if stage == layout.n_stages - 1:
        params += Params(memory.head_params(m))
        for _ in range(m.mtp_depth):
            params += memory.mtp_params(m)
        moe = moe + [True] * m.mtp_depth  # MTP blocks run on the last stage
    return params, moe


def estimate(inputs: PlanInputs) -> list[RankMemory]:
    layout, m = inputs.layout, inputs.model
    precision = memory.PRECISIONS[inputs.precision]
    tokens = inputs.tokens_per_microbatch
    ranks = []
    for pp_rank in range(layout.pp):
        stages = layout.stages_of(pp_rank)
        held, chunk_bytes, kv_bytes = Params(), 0.0, 0.0
        for stage in stages:
            params, moe = stage_contents(inputs, stage)
            held += Params(params.dense, params.expert // layout.ep)
            per_token = sum(memory.block_activation_bytes(m, is_moe, precision, inputs.recompute) for is_moe in moe)
            chunk_bytes = max(chunk_bytes, per_token * tokens)
            kv_bytes = max(kv_bytes, len(moe) * memory.kv_latent_bytes(m, precision) * tokens)
        chunks = layout.chunks_in_flight()
        activations = chunks * chunk_bytes
        if inputs.recompute == "full":  # one block's activations, rebuilt during its backward
            activations += tokens * memory.block_activation_bytes(m, True, precision, "none")
        holds_head = layout.n_stages - 1 in stages
        logits = tokens * m.vocab_size * precision.act * (1 + m.mtp_depth) if holds_head else 0.0
        ranks.append(RankMemory(
            pp_rank=pp_rank, params=held,
            weights=_sharded(held, precision.weight, layout, shard=layout.zero_stage >= 3),
            grads=_sharded(held, precision.grad, layout, shard=layout.zero_stage >= 2),
            optimizer=_sharded(held, precision.optim, layout, shard=layout.zero_stage >= 1),
            activations=activations, kv_latents=chunks * kv_bytes if inputs.recompute != "full" else 0.0,
            logits=logits))
    return ranks


def _sharded(params: Params, bytes_per: int, layout: Layout, shard: bool) -> float:
    """Dense parameters shard over dp, this ep rank's experts over edp."""
    if not shard:
        return float(params.total * bytes_per)
    return params.dense * bytes_per / layout.dp + params.expert * bytes_per / layout.edp


def peak(inputs: PlanInputs) -> RankMemory:
    return max(estimate(inputs), key=lambda r: r.total)


def check_fits(inputs: PlanInputs, suggest_recompute: bool = True) -> RankMemory:
    """The worst rank's estimate; ConfigError naming the changes that fit when it does not
    (recomputation only when asked: the trainer does not recompute yet)."""
    worst = peak(inputs)
    budget = inputs.gpu_memory_gib * GIB
    if worst.total <= budget:
        return worst
    fixes = [f"{label} ({peak(variant).total / GIB:.1f} GiB)" for label, variant in _alternatives(inputs)
             if _valid(variant) and peak(variant).total <= budget
             and (suggest_recompute or variant.recompute == inputs.recompute)]
    advice = ("fix: " + " or ".join(fixes)) if fixes else "no single change fits: use more GPUs or a smaller model"
    raise ConfigError(f"estimated {worst.total / GIB:.1f} GiB per GPU (pp rank {worst.pp_rank}) exceeds the "
                      f"{inputs.gpu_memory_gib:g} GiB of --gpu-memory; {advice}")


def _valid(inputs: PlanInputs) -> bool:
    try:
        inputs.layout.check(inputs.model, inputs.grad_accum, inputs.layout.world_size)
    except ConfigError:
        return False
    return True


def _alternatives(inputs: PlanInputs):
    """Single changes worth suggesting, in order of cost to the run."""
    layout, m = inputs.layout, inputs.model
    for stage in range(layout.zero_stage + 1, 4):
        yield f"parallel.zero_stage={stage}", dataclasses.replace(
            inputs, layout=dataclasses.replace(layout, zero_stage=stage))
    for mode in memory.RECOMPUTE[memory.RECOMPUTE.index(inputs.recompute) + 1:]:  # cheapest first
        yield f"--recompute {mode}", dataclasses.replace(inputs, recompute=mode)
    if inputs.micro_batch_size > 1:
        half = inputs.micro_batch_size // 2
        yield (f"train.micro_batch_size={half} train.grad_accum={inputs.grad_accum * 2}",
               dataclasses.replace(inputs, micro_batch_size=half, grad_accum=inputs.grad_accum * 2))
    ep = layout.ep * 2
    if layout.dp % ep == 0 and m.n_routed_experts % ep == 0:
        yield f"parallel.ep={ep}", dataclasses.replace(inputs, layout=dataclasses.replace(layout, ep=ep))
    if layout.schedule != "none" and layout.dp % 2 == 0:  # same world and global batch
        variant, accum = dataclasses.replace(layout, pp=layout.pp * 2, dp=layout.dp // 2), inputs.grad_accum * 2
        yield (f"parallel.pp={variant.pp} parallel.dp={variant.dp} train.grad_accum={accum}",
               dataclasses.replace(inputs, layout=variant, grad_accum=accum))


# ----------------------------------------------------------------------------- report
def render(inputs: PlanInputs) -> str:
    """The whole report: sizes, batch, groups, stages, experts, memory per pipeline rank."""
    per_rank = [*_rank_lines(inputs), ""] if inputs.layout.world_size <= SMALL_WORLD else []
    return "\n".join([*_header(inputs), "", *_group_lines(inputs.layout), "", *per_rank, *_stage_lines(inputs),
                      *_expert_lines(inputs), "", *_memory_lines(inputs)])


SMALL_WORLD = 16
"""Worlds up to this size also get a line per rank."""


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _rank_lines(inputs: PlanInputs) -> list[str]:
    L, m = inputs.layout, inputs.model
    per_rank = m.n_routed_experts // L.ep
    lines = ["  rank  node  pp  dp  edp  ep  stages  experts"]
    for rank in range(L.world_size):
        pp_index, dp_index = divmod(rank, L.dp)
        edp_index, ep_index = divmod(dp_index, L.ep)
        stages = ",".join(map(str, L.stages_of(pp_index)))
        experts = f"{ep_index * per_rank}-{(ep_index + 1) * per_rank - 1}"
        lines.append(f"  {rank:<5} {rank // L.gpus_per_node:<5} {pp_index:<3} {dp_index:<3} {edp_index:<4} "
                     f"{ep_index:<3} {stages:<7} {experts}")
    return lines


def _header(inputs: PlanInputs) -> list[str]:
    m, L = inputs.model, inputs.layout
    size = memory.model_size(m)
    nodes = -(-L.world_size // L.gpus_per_node)
    global_rows = inputs.micro_batch_size * inputs.grad_accum * L.dp
    return [
        f"model {m.name}: {_count(size.total)} parameters ({_count(size.main)} main model + "
        f"{_count(size.total - size.main)} MTP), {_count(size.active)} active per token",
        f"world {L.world_size} GPUs = {nodes} node(s) x {min(L.gpus_per_node, L.world_size)} GPUs: "
        f"pp {L.pp} x dp {L.dp} "
        f"(dp = edp {L.edp} x ep {L.ep}); schedule {L.schedule}; ZeRO-{L.zero_stage}; "
        f"precision {inputs.precision}; recompute {inputs.recompute}",
        f"global batch {global_rows} sequences x {inputs.seq_len} tokens = {_count(global_rows * inputs.seq_len)} "
        f"tokens (micro-batch {inputs.micro_batch_size}, {inputs.grad_accum} micro-batches per dp rank)",
    ]


def _group_lines(layout: Layout) -> list[str]:
    lines = ["groups (rank = pp_index * dp + edp_index * ep + ep_index):"]
    for axis, members in groups(layout).items():
        first, last = members[0], members[-1]
        spans = len(nodes_of(layout, first))
        example = f"[{format_ranks(first)}]" + (f" ... [{format_ranks(last)}]" if len(members) > 1 else "")
        lines.append(f"  {axis:<4}{len(members):>6} x {len(first):<5} ranks  {example}  "
                     f"({spans} node{'s' if spans > 1 else ''} each)")
    return lines


def _stage_lines(inputs: PlanInputs) -> list[str]:
    L, m = inputs.layout, inputs.model
    where = {"dualpipe": f"; DualPipe: pp rank r holds stage r and stage {L.pp - 1}-r",
             "dualpipev": f"; DualPipeV: pp rank r holds stage r and stage {2 * L.pp - 1}-r"}.get(L.schedule, "")
    lines = [f"stages ({L.n_stages} of {m.n_layers} blocks{where}):"]
    if m.n_layers % L.n_stages:
        lines.append(f"  note: {m.n_layers} blocks do not split into {L.n_stages} equal stages; the plan splits "
                     f"them unevenly, the pipeline runtime (parallel/pipeline) wants equal stages")
    ranges = stage_blocks(m.n_layers, L.n_stages)
    for pp_rank in range(L.pp):
        ranks = list(range(pp_rank * L.dp, (pp_rank + 1) * L.dp))
        parts = [_describe_stage(inputs, s, ranges[s]) for s in L.stages_of(pp_rank)]
        lines.append(f"  pp {pp_rank:<3} ranks {format_ranks(ranks):<11} nodes "
                     f"{format_ranks(nodes_of(L, ranks)):<7} {'; '.join(parts)}")
    return lines


def _describe_stage(inputs: PlanInputs, stage: int, blocks: range) -> str:
    m, last = inputs.model, inputs.layout.n_stages - 1
    dense = sum(b < m.n_dense_layers for b in blocks)
    text = f"stage {stage}: " + ("embed + " if stage == 0 else "")
    text += f"blocks {blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else f"block {blocks[0]}"
    text += f" ({dense} dense)" if dense else ""
    if stage == last:
        text += " + head" + (f" + MTP x{m.mtp_depth}" if m.mtp_depth else "")
    return text


def _expert_lines(inputs: PlanInputs) -> list[str]:
    m, L = inputs.model, inputs.layout
    per_rank = m.n_routed_experts // L.ep
    return [f"experts: {m.n_routed_experts} routed per MoE layer, {per_rank} per GPU: ep rank e holds experts "
            f"{per_rank}e..{per_rank}e+{per_rank - 1} of every MoE layer on its stages, replicated over "
            f"{L.edp} edp rank(s)"]


def _memory_lines(inputs: PlanInputs) -> list[str]:
    ranks = estimate(inputs)
    head = (f"memory per GPU (GiB; {inputs.gpu_memory_gib:g} available; "
            f"{memory.PRECISIONS[inputs.precision].note}):")
    columns = "  pp   params(B)  weights  grads  optim  activ  (MLA KV)  logits  overhead   total"
    lines = [head, columns]
    for r in ranks:
        lines.append(f"  {r.pp_rank:<3} {r.params.total / 1e9:>9.2f} {r.weights / GIB:>8.1f} {r.grads / GIB:>6.1f} "
                     f"{r.optimizer / GIB:>6.1f} {r.activations / GIB:>6.1f} {r.kv_latents / GIB:>9.2f} "
                     f"{r.logits / GIB:>7.1f} {r.overhead / GIB:>9.1f} {r.total / GIB:>7.1f}")
    worst = max(ranks, key=lambda r: r.total)
    lines.append(f"peak: {worst.total / GIB:.1f} GiB on pp rank {worst.pp_rank} "
                 f"({inputs.layout.chunks_in_flight()} micro-batch x stage activations in flight)")
    return lines


def inputs_from_config(cfg, layout: Layout, gpu_memory_gib: float, precision: str | None = None,
                       recompute: str = "none") -> PlanInputs:
    """Plan inputs for a composed :class:`~dsv3_train.config.Config` (what the trainer would do:
    its precision, no recomputation) unless precision / recompute say otherwise."""
    if precision is None:  # precision.linear=fp8 (when the config has it), else train.precision
        fp8 = getattr(getattr(cfg, "precision", None), "linear", None) == "fp8"
        precision = "fp8" if fp8 else cfg.train.precision if cfg.train.precision in memory.PRECISIONS else "bf16"
    if precision not in memory.PRECISIONS:
        raise ConfigError(f"--precision ({precision}) must be one of {list(memory.PRECISIONS)}")
    if recompute not in memory.RECOMPUTE:
        raise ConfigError(f"--recompute ({recompute}) must be one of {list(memory.RECOMPUTE)}")
    if gpu_memory_gib <= 0:
        raise ConfigError(f"--gpu-memory ({gpu_memory_gib:g}) must be > 0 GiB")
    return PlanInputs(cfg.model, cfg.train.micro_batch_size, cfg.train.seq_len, cfg.train.grad_accum, layout,
                      precision, recompute, gpu_memory_gib)
