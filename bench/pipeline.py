"""Pipeline schedules on gloo ranks: our runtime against torch.distributed.pipelining, and overlap.

Part 1, ``schedules`` (2 ranks, pp=2, dp=ep=1): one optimizer step's forward and backward (no
optimizer step) of the same model on the same ranks, under

* ours: ``PipelineRuntime`` running our 1F1B, DualPipe and DualPipeV IR;
* torch: ``Schedule1F1B`` and ``ScheduleDualPipeV`` over ``PipelineStage``s wrapping our stage
  modules (the same forward code, run whole). Their non-last stages cannot hand a balance loss
  to the loss function, so torch's runs skip the backward of those (a few scalars' worth).

Every iteration runs each schedule once, in turn, so load from elsewhere on the machine hits all
alike; a step's time is the slowest rank's, a cell the median over iterations after warmup.
Our runtimes also time each compute action, and the bench logs their point-to-point calls
(``_CommLog``). The runtime waits a receive inside the compute that consumes it; those waits are
taken out of the action's time, so the *measured bubble* (1 - compute time / step time) counts
waiting for a late tensor as idle. Measured alongside: each isend / irecv call's time (``post``),
the delay from an isend returning to a waiting receiver having the tensor (``p2p``), and the
step's time outside the program (step minus the span of its compute actions: sends waited,
DualPipe's copy-gradient sum, the tied-embedding sum). The *simulated bubble* is
``parallel.pipeline.simulate`` of the IR the runtime ran, with (a) one mean cost per kind for
all stages; (b) each stage's own mean F, B, I, W (the last stage also runs the head, the MTP
block and the loss, stage 0 the embedding; F&B pairs through the measured pair_overlap); (c) (b)
plus p2p and post; (d) (c) with the time outside the program added to the step.

Part 2, ``overlap`` (4 ranks, pp=2 x dp=2 x ep=2): DualPipe and DualPipeV with the expert
all-to-all through ``transport.EmulatedLink``, calibrated so that the emulated all-to-all time of
a step equals its compute time (per exchange: half latency, half bytes / bandwidth). With
overlap off every F&B pair runs forward then backward; with overlap on its phases interleave.
Exposed all-to-all = time ranks spent blocked waiting for an exchange, as a share of the
emulated all-to-all time. With overlap on, weight-gradient GEMMs fill the waits
(``overlap.WaitFiller``). ``pair-order`` alternates pairs that start with the backward phase
(the runtime's default) and with the forward phase, step by step, on one calibrated link.

Usage::

    python bench/pipeline.py                   # both parts, 5 timed iterations each
    python bench/pipeline.py --part overlap --iters 3
    python bench/pipeline.py --part schedules --iters 5   # part 1 only, ~25 s
    python bench/pipeline.py --part pair-order --iters 4  # F&B pair: backward or forward first

Ranks are spawned with ``parallel.testing.run_ranks`` (gloo, one torch thread each); part 2 puts
4 ranks on however many cores there are, and the bench says when that oversubscribes them.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3_train.config import ModelConfig  # noqa: E402
from dsv3_train.model.transformer import Transformer  # noqa: E402
from parallel.mesh import ParallelDims  # noqa: E402
from parallel.pipeline import Compute, CostModel, Overlapped, TensorKey, build, simulate  # noqa: E402
from parallel.pipeline.overlap import Tape, run_forward, run_in_sequence, stage_program  # noqa: E402
from parallel.pipeline.runtime import PipelineRuntime, build_pipeline  # noqa: E402
from parallel.pipeline.stage import split_model  # noqa: E402
from parallel.pipeline.transport import EmulatedLink  # noqa: E402
from parallel.testing import run_ranks  # noqa: E402

CFG = ModelConfig(vocab_size=1024, dim=128, n_layers=8, n_dense_layers=0, n_heads=4, inter_dim=256,
                  moe_inter_dim=64, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                  n_expert_groups=2, n_limited_groups=1, kv_lora_rank=64, qk_nope_head_dim=32,
                  qk_rope_head_dim=16, v_head_dim=32, max_seq_len=128, mtp_depth=1)
SEQ_LEN, MICRO_BATCH, MICROBATCHES, MTP_WEIGHT = 64, 2, 8, 0.3


def _batch(sequences: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (sequences, SEQ_LEN + 1), generator=gen)


def _slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def _mean_over_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def _timed_here(run, model: nn.Module) -> float:
    """This rank's seconds for one step, started together."""
    model.zero_grad(set_to_none=True)
    dist.barrier()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _timed(run, model: nn.Module) -> float:
    return _slowest(_timed_here(run, model))


# ------------------------------------------------------------------------------- part 1: peers
class _TorchStage(nn.Module):
    """One of our stages behind torch.distributed.pipelining's interface: (x, tokens=) -> h or loss."""

    def __init__(self, stage):
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        carry, tape = ({} if self.stage.is_first else {"h": x}), Tape(cut=False)
        program = stage_program(self.stage, carry, tape, tokens, MTP_WEIGHT, None)
        run_in_sequence(run_forward(program, carry, tape, contextlib.nullcontext))
        if self.stage.is_last:  # (1,): torch merges the last stage's outputs along dim 0
            return sum(loss * weight for segment in tape.segments for loss, weight in segment.losses).reshape(1)
        return carry["h"]


def _torch_schedule(name: str, rank: int, pp: int):
    """-> (run one step, the module holding its parameters)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

    torch.manual_seed(0)
    stages = split_model(Transformer(CFG), name, pp, rank)
    n_stages = stages.plan.n_stages
    wrapped = [PipelineStage(_TorchStage(stage), stage.index, n_stages, torch.device("cpu"))
               for stage in stages.stages.values()]
    loss_fn = lambda output, target: output.sum()  # noqa: E731 - the last stage returns its loss
    if name == "1f1b":
        schedule = Schedule1F1B(wrapped[0], MICROBATCHES, loss_fn=loss_fn)
    else:
        schedule = ScheduleDualPipeV(sorted(wrapped, key=lambda s: s.stage_index), MICROBATCHES, loss_fn=loss_fn)
    batch = _batch(MICRO_BATCH * MICROBATCHES, 0)
    first = any(s.is_first for s in wrapped)
    last = any(s.is_last for s in wrapped)

    def run():
        args = (batch,) if first else ()
        extra = {"target": torch.zeros(batch.shape[0]), "losses": []} if last else {}
        schedule.step(*args, tokens=batch, return_outputs=False, **extra)
    return run, stages


class _LoggedRecv:
    """A pending receive whose wait is logged as (tensor key, start, end)."""

    def __init__(self, key: TensorKey, pending, log: "_CommLog"):
        self.key, self.pending, self.log = key, pending, log

    def wait(self) -> torch.Tensor:
        start = time.perf_counter()
        tensor = self.pending.wait()
        self.log.waits.append((self.key, start, time.perf_counter()))
        return tensor


class _CommLog:
    """Wraps a runtime's point-to-point calls and logs one step of them (``clear`` per step):
    ``posts``: seconds each isend / irecv call took; ``sent``: tensor key -> when its isend
    returned; ``waits``: (key, start, end) of every receive wait."""

    def __init__(self, runtime: PipelineRuntime):
        self.posts, self.sent, self.waits = [], {}, []
        send, recv = runtime.p2p.send, runtime.p2p.recv

        def logged_send(key, *rest):
            start = time.perf_counter()
            work = send(key, *rest)
            self.sent[key] = time.perf_counter()
            self.posts.append(self.sent[key] - start)
            return work

        def logged_recv(key, *rest):
            start = time.perf_counter()
            pending = _LoggedRecv(key, recv(key, *rest), self)
            self.posts.append(time.perf_counter() - start)
            return pending
        runtime.p2p.send, runtime.p2p.recv = logged_send, logged_recv

    def clear(self) -> None:
        self.posts, self.sent, self.waits = [], {}, []


def _net_of_waits(start: float, end: float, waits: list) -> float:
    """Seconds of [start, end] not spent in ``waits``."""
    return end - start - sum(max(0.0, min(end, w_end) - max(start, w_start)) for _, w_start, w_end in waits)


def _our_schedule(name: str, rank: int, pp: int):
    torch.manual_seed(0)
    stages = split_model(Transformer(CFG), name, pp, rank)
    schedule = build(name, pp, MICROBATCHES, n_layers=CFG.n_layers)
    runtime = PipelineRuntime(stages, schedule, dist.group.WORLD, profile=True)
    batch = _batch(MICRO_BATCH * MICROBATCHES, 0)
    runtime.comm_log = _CommLog(runtime)

    def run():
        runtime.comm_log.clear()
        runtime.step(batch, MTP_WEIGHT)
    return run, stages, runtime


def _action_keys(program) -> list[tuple[str, int, Optional[int]]]:
    """(kind, stage, backward's stage or None) of each compute action, in the runtime's timeline order."""
    keys = []
    for action in program:
        if isinstance(action, Overlapped):
            keys.append((f"F&{action.backward.kind}", action.forward.stage, action.backward.stage))
        elif isinstance(action, Compute):
            keys.append((action.kind, action.stage, None))
    return keys


class _StepProfile:
    """One rank's record of our runtime's timed steps (perf_counter is the host's monotonic clock,
    so ranks on one host compare times directly)."""

    def __init__(self):
        self.samples = {}   # (kind, stage, backward stage) -> seconds of compute, net of receive waits
        self.busy, self.waited, self.posting, self.outside, self.posts = [], [], [], [], []
        self.steps = []     # per step: ({key: when its isend returned}, [(key, wait start, wait end)])

    def record(self, here: float, runtime: PipelineRuntime) -> None:
        timeline, log = runtime.timeline, runtime.comm_log
        net = [_net_of_waits(start, end, log.waits) for _, start, end in timeline]
        self.busy.append(sum(net))
        self.waited.append(sum(end - start for _, start, end in log.waits))
        self.posting.append(sum(log.posts))
        self.posts += log.posts
        self.outside.append(here - (timeline[-1][2] - timeline[0][1]))  # step minus the program's span
        for (kind, _, _), net_s, key in zip(timeline, net, _action_keys(runtime.program), strict=True):
            assert kind == key[0], (kind, key)
            self.samples.setdefault(key, []).append(net_s)
        self.steps.append((dict(log.sent), list(log.waits)))


def _p2p_delays(profiles: list[_StepProfile]) -> list[float]:
    """Seconds from a tensor's isend returning to its receiver having it, for every receive whose
    wait began before that isend returned (so the wait's end is the arrival)."""
    delays = []
    for step in zip(*(p.steps for p in profiles)):
        sent = {key: end for sent_here, _ in step for key, end in sent_here.items()}
        delays += [w_end - sent[key] for _, waits in step for key, w_start, w_end in waits if w_start < sent[key]]
    return delays


def _schedules_worker(rank: int, world: int, warmup: int, iters: int) -> dict:
    runs = {}
    for name in ("1f1b", "dualpipe", "dualpipev"):
        run, model, runtime = _our_schedule(name, rank, world)
        runs[f"ours {name}"] = (run, model, runtime)
    for name in ("1f1b", "dualpipev"):
        run, model = _torch_schedule(name, rank, world)
        runs[f"torch {name}"] = (run, model, None)
    times = {label: [] for label in runs}
    profiles = {label: _StepProfile() for label, (_, _, runtime) in runs.items() if runtime is not None}
    for iteration in range(warmup + iters):
        for label, (run, model, runtime) in runs.items():
            here = _timed_here(run, model)
            seconds = _slowest(here)
            if iteration >= warmup:
                times[label].append(seconds)
                if label in profiles:
                    profiles[label].record(here, runtime)
    gathered = [None] * world
    dist.all_gather_object(gathered, profiles)
    out = {label: {"step_s": statistics.median(times[label]), "times": times[label]} for label in runs}
    for label in profiles:
        row, ranks = out[label], [g[label] for g in gathered]
        row["measured_bubble"] = 1 - _mean([statistics.median(p.busy) for p in ranks]) / row["step_s"]
        row["waited_s"] = _mean([statistics.median(p.waited) for p in ranks])
        row["posting_s"] = _mean([statistics.median(p.posting) for p in ranks])
        row["post_s"] = statistics.mean(post for p in ranks for post in p.posts)
        row["outside_s"] = max(statistics.median(p.outside) for p in ranks)
        row["samples"] = {}
        for p in ranks:
            for key, values in p.samples.items():
                row["samples"].setdefault(key, []).extend(values)
        delays = _p2p_delays(ranks)
        # gloo often delivers a small tensor inside the isend call: a negative median is 0 here
        row["p2p_s"] = max(0.0, statistics.median(delays)) if delays else 0.0
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _uniform_costs(samples: dict) -> CostModel:
    """One mean per kind for every stage (the simulator's model before per-stage costs)."""
    by_kind = {}
    for (kind, _, _), values in samples.items():
        by_kind.setdefault("F&B" if kind.startswith("F&") else kind, []).extend(values)
    means = {kind: _mean(values) for kind, values in by_kind.items()}
    return CostModel(forward=means["F"], backward=means.get("B", means["F"] * 2), weight=means.get("W", 0.0),
                     input_grad=means.get("I"), forward_backward=means.get("F&B"))


def _per_stage_costs(samples: dict) -> CostModel:
    """Each stage's mean F, B, I, W; a stage without a lone B gets I + W. F&B pairs give
    pair_overlap = sum(pair [+ W if I]) / sum(F of the forward's stage + B of the backward's)."""
    stages = sorted({stage for (kind, stage, _) in samples if not kind.startswith("F&")})
    per_stage = {}
    for s in stages:
        means = {kind: _mean(values) for (kind, stage, _), values in samples.items() if stage == s and "&" not in kind}
        means.setdefault("W", 0.0)
        if "B" not in means:
            means["B"] = means["I"] + means["W"]
        per_stage[s] = means
    measured = modelled = 0.0
    for (kind, f, b), values in samples.items():
        if kind.startswith("F&"):
            measured += sum(values) + (per_stage[b]["W"] * len(values) if kind == "F&I" else 0.0)
            modelled += (per_stage[f]["F"] + per_stage[b]["B"]) * len(values)
    uniform = _uniform_costs(samples)
    return CostModel(forward=uniform.forward, backward=uniform.backward, weight=uniform.weight,
                     per_stage=per_stage, pair_overlap=measured / modelled if modelled else 1.0)


def _simulated(label: str, cost: CostModel, pp: int):
    name = label.split()[1]
    return simulate(build(name, pp, MICROBATCHES, n_layers=CFG.n_layers), cost)  # the IR the runtime ran


def part_schedules(warmup: int, iters: int) -> None:
    pp = 2
    rows = run_ranks(_schedules_worker, pp, warmup, iters, timeout=1200)[0]
    print(f"\n## Part 1: step time, pp={pp} (2 ranks), {MICROBATCHES} micro-batches of {MICRO_BATCH} x "
          f"{SEQ_LEN} tokens, {CFG.n_layers} MoE blocks + MTP, median of {iters}\n")
    print("| schedule | step ms | measured bubble | receive waits ms | posting ms | outside the program ms "
          "| p2p ms | post ms | simulated: one cost per kind | per-stage costs | per-stage + p2p + post "
          "| per-stage + p2p + post + outside |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, row in rows.items():
        if "samples" not in row:
            print(f"| {label} | {row['step_s'] * 1e3:.0f} |" + " |" * 10)
            continue
        measured = row["measured_bubble"]
        staged = _per_stage_costs(row["samples"])
        uniform = _simulated(label, _uniform_costs(row["samples"]), pp).bubble_fraction
        per_stage = _simulated(label, staged, pp).bubble_fraction
        with_comm = _simulated(label, replace(staged, p2p=row["p2p_s"], post=row["post_s"]), pp)
        with_outside = 1 - sum(with_comm.busy) / (pp * (with_comm.step_time + row["outside_s"]))
        cells = " | ".join(f"{value:.1%} ({(value - measured) * 100:+.1f})"
                           for value in (uniform, per_stage, with_comm.bubble_fraction, with_outside))
        print(f"| {label} | {row['step_s'] * 1e3:.0f} | {measured:.1%} | {row['waited_s'] * 1e3:.0f} | "
              f"{row['posting_s'] * 1e3:.0f} | {row['outside_s'] * 1e3:.0f} | {row['p2p_s'] * 1e3:.1f} | "
              f"{row['post_s'] * 1e3:.1f} | {cells} |")
    print("\n(simulated bubble, and in brackets its difference from the measured one in points)")
    print()
    for ours, theirs in (("ours dualpipev", "torch dualpipev"), ("ours 1f1b", "torch 1f1b"),
                         ("ours dualpipev", "ours 1f1b"), ("ours dualpipe", "ours 1f1b")):
        ratios = sorted(a / b for a, b in zip(rows[ours]["times"], rows[theirs]["times"]))
        print(f"{ours} / {theirs}: {statistics.median(ratios):.2f} "
              f"(per-iteration range {ratios[0]:.2f}-{ratios[-1]:.2f})")
    for label, row in rows.items():
        if "samples" in row:
            cost = _per_stage_costs(row["samples"])
            stages = "; ".join(f"stage {s}: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(c.items()))
                               for s, c in cost.per_stage.items())
            print(f"  {label} mean ms per action: {stages}; pair_overlap {cost.pair_overlap:.2f}")


# ----------------------------------------------------------------------------- part 2: overlap
def _overlap_runs(mesh, link: EmulatedLink, names: tuple[str, ...], microbatches: int):
    dp_rank = mesh.dims.rank_coordinates(dist.get_rank())["dp"]
    batch = _batch(MICRO_BATCH * microbatches * mesh.dims.dp, 0).chunk(mesh.dims.dp)[dp_rank]
    runs = {}
    for name in names:
        for overlap in (False, True):
            torch.manual_seed(0)
            stages, runtime = build_pipeline(Transformer(CFG), mesh, name, microbatches,
                                             zero_stage=2, overlap=overlap)
            runtime.profile = True
            runtime.set_exchange(link.exchange)
            runs[(name, overlap)] = (lambda rt=runtime: rt.step(batch, MTP_WEIGHT)), stages, runtime
    return runs


def _exposed_by_action(waits: list[tuple[float, float]], timeline: list[tuple[str, float, float]]) -> list[float]:
    """Seconds of ``waits`` inside the rank's F actions, B / I actions, and F&B pairs."""
    out = [0.0, 0.0, 0.0]
    for kind, a_start, a_end in timeline:
        slot = 2 if kind.startswith("F&") else 0 if kind == "F" else 1 if kind in ("B", "I") else None
        if slot is not None:
            out[slot] += sum(max(0.0, min(end, a_end) - max(start, a_start)) for start, end in waits)
    return out


def _paired_share(schedule) -> float:
    """Share of a schedule's compute chunks that run inside F&B pairs (all ranks)."""
    from parallel.pipeline.ir import Compute, Overlapped

    chunks = [a for program in schedule.ranks for a in program if isinstance(a, (Compute, Overlapped))]
    paired = sum(2 for a in chunks if isinstance(a, Overlapped))
    total = sum(2 if isinstance(a, Overlapped) else 1 for a in chunks
                if not (isinstance(a, Compute) and a.kind == "W"))
    return paired / total


def _calibrate(link: EmulatedLink, run, model, runtime, warmup: int) -> tuple[float, float, float]:
    """Set ``link`` so that the exchanges of a step of ``run`` (overlap off, instant link) take as
    long as its compute: half latency, half bytes / bandwidth. Median of 3 steps after ``warmup``:
    one step's compute moves by 10-30 % on this shared host, and so would the link.
    Returns (compute s, exchanges, s blocked in gloo's own all-to-all) per step."""
    link.latency_s, link.bandwidth = 0.0, float("inf")
    samples = []
    for iteration in range(warmup + 3):
        link.stats.reset()
        _timed(run, model)
        busy = sum(end - start for _, start, end in runtime.timeline)
        if iteration >= warmup:
            samples.append(_mean_over_ranks([busy, link.stats.exchanges, link.stats.exposed_s]))
    busy, exchanges, real_exposed = (statistics.median(column) for column in zip(*samples))
    per_exchange = busy / exchanges
    nbytes = CFG.dim * 4 * MICRO_BATCH * SEQ_LEN * CFG.n_activated_experts  # rows of one micro-batch
    link.latency_s, link.bandwidth = per_exchange / 2, nbytes / (per_exchange / 2)
    return busy, exchanges, real_exposed


def _overlap_worker(rank: int, world: int, warmup: int, iters: int, microbatches: int) -> dict:
    mesh = ParallelDims(pp=2, dp=2, ep=2).build_mesh("cpu")
    link = EmulatedLink()  # calibrated below
    names = ("dualpipe", "dualpipev")
    runs = _overlap_runs(mesh, link, names, microbatches)
    busy, exchanges, real_exposed = _calibrate(link, *runs[("dualpipe", False)], warmup)
    fields = ("step", "exposed", "emulated", "exposed_in_f", "exposed_in_b", "exposed_in_pairs", "peer",
              "filled", "compute")
    results = {key: {field: [] for field in fields} for key in runs}
    for iteration in range(warmup + iters):
        for key, (run, model, runtime) in runs.items():
            link.stats.reset()
            if runtime.filler is not None:
                runtime.filler.reset()
            seconds = _timed(run, model)
            by_action = _exposed_by_action(link.stats.waits, runtime.timeline)
            filled = runtime.filler.filled_s if runtime.filler is not None else 0.0
            compute = sum(end - start for _, start, end in runtime.timeline) - link.stats.exposed_s
            values = _mean_over_ranks([link.stats.exposed_s, link.stats.emulated_s, *by_action,
                                       link.stats.peer_s, filled, compute])
            if iteration >= warmup:
                for field, value in zip(fields, [seconds, *values]):
                    results[key][field].append(value)
    out = {key: {field: statistics.median(values) for field, values in fields.items()}
           for key, fields in results.items()}
    for key, (_, _, runtime) in runs.items():
        out[key]["paired_share"] = _paired_share(runtime.schedule)
    timelines = {}  # one more DualPipe step each way, as it ran: for the timeline PNGs
    for overlap in (False, True):
        run, model, runtime = runs[("dualpipe", overlap)]
        link.stats.reset()
        _timed(run, model)
        timelines[overlap] = (runtime.pp_rank, runtime.dp_rank, list(runtime.timeline), list(link.stats.waits))
    return {"runs": out, "timelines": timelines, "calibration": {"compute_s": busy, "exchanges": exchanges, "real_exposed_s": real_exposed,
                                         "latency_s": link.latency_s, "bandwidth": link.bandwidth}}


def _draw_measured(per_rank: list, microbatches: int, overlap: bool, path: Path) -> None:
    """The measured DualPipe step of dp rank 0's pp ranks, with its all-to-all waits."""
    from parallel.pipeline.printer import draw_timeline
    from parallel.pipeline.simulator import CostModel, SimulationResult, Slot

    schedule = build("dualpipe", 2, microbatches, n_layers=CFG.n_layers)
    rows = sorted((pp, timeline, waits) for pp, dp, timeline, waits in per_rank if dp == 0)
    t0 = min(start for _, timeline, _ in rows for _, start, _ in timeline)
    lines, marks = [], []
    for pp, timeline, waits in rows:
        actions = [a for a in schedule.ranks[pp] if isinstance(a, (Compute, Overlapped))]
        lines.append([Slot(a, (start - t0) * 1e3, (end - t0) * 1e3) for a, (_, start, end) in zip(actions, timeline)])
        marks.append([((start - t0) * 1e3, (end - t0) * 1e3) for start, end in waits])
    step = max(slot.end for line in lines for slot in line)
    busy = [sum(slot.end - slot.start for slot in line) for line in lines]
    result = SimulationResult(schedule, CostModel(), lines, step, busy, [0.0] * 2, [0] * 2)
    exposed = sum(end - start for line in marks for start, end in line) / len(marks)
    draw_timeline(result, path, unit="ms", marks=marks, width=18.0,
                  title=f"measured: DualPipe pp=2 (dp rank 0 of pp2 x dp2 x ep2), {microbatches} micro-batches, "
                        f"overlap {'on' if overlap else 'off'}: step {step:.0f} ms, waiting for all-to-alls "
                        f"{exposed:.0f} ms per rank (red)")


def part_overlap(warmup: int, iters: int, microbatches: int, timeline_dir: Optional[Path] = None) -> None:
    ranks = 4
    cores = len(os.sched_getaffinity(0))
    per_rank = run_ranks(_overlap_worker, ranks, warmup, iters, microbatches, timeout=1800)
    result = per_rank[0]
    if timeline_dir is not None:
        for overlap in (False, True):
            path = timeline_dir / f"measured-dualpipe-overlap-{'on' if overlap else 'off'}.png"
            _draw_measured([r["timelines"][overlap] for r in per_rank], microbatches, overlap, path)
            print(f"wrote {path}")
    cal = result["calibration"]
    print(f"\n## Part 2: exposed all-to-all, pp=2 x dp=2 x ep=2 (4 ranks on {cores} cores"
          f"{', oversubscribed' if ranks > cores else ''}), {microbatches} micro-batches of "
          f"{MICRO_BATCH} x {SEQ_LEN} tokens per dp rank, median of {iters}\n")
    print(f"Emulated link: latency {cal['latency_s'] * 1e3:.2f} ms + {cal['bandwidth'] / 1e6:.0f} MB/s, "
          f"calibrated so a DualPipe step's {cal['exchanges']:.0f} exchanges take its "
          f"{cal['compute_s'] * 1e3:.0f} ms of compute (with an instant link, waiting for gloo's own "
          f"all-to-all took {cal['real_exposed_s'] * 1e3:.0f} ms of it).\n")
    print("| schedule | overlap | step ms | compute ms | all-to-all ms (emulated) | all-to-all / compute "
          "| exposed ms | exposed | hidden | of exposed: peer late | exposed, link only "
          "| chunks in F&B pairs | exposed in F / B,I / F&B actions | W run in waits |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    runs = result["runs"]
    for (name, overlap), row in runs.items():
        share = row["exposed"] / row["emulated"]
        link_only = (row["exposed"] - row["peer"]) / row["emulated"]
        print(f"| {name} | {'on' if overlap else 'off'} | {row['step'] * 1e3:.0f} | "
              f"{row['compute'] * 1e3:.0f} | {row['emulated'] * 1e3:.0f} | "
              f"{row['emulated'] / row['compute']:.2f} | {row['exposed'] * 1e3:.0f} | {share:.0%} | {1 - share:.0%} "
              f"| {row['peer'] * 1e3:.0f} ms | {link_only:.0%} | {row['paired_share']:.0%} "
              f"| {row['exposed_in_f'] * 1e3:.0f} / {row['exposed_in_b'] * 1e3:.0f} / "
              f"{row['exposed_in_pairs'] * 1e3:.0f} ms | {row['filled'] * 1e3:.0f} ms |")
    for name in sorted({name for name, _ in runs}):
        on, off = runs[(name, True)], runs[(name, False)]
        print(f"\n{name}: exposed all-to-all on/off {on['exposed'] / off['exposed']:.2f}, "
              f"step time on/off {on['step'] / off['step']:.2f}")


def _pair_order_worker(rank: int, world: int, steps: int, microbatches: int) -> dict:
    """Exposed share with the overlapped pair starting with the backward or with the forward,
    alternating step by step in one process (same link, same load)."""
    mesh = ParallelDims(pp=2, dp=2, ep=2).build_mesh("cpu")
    link = EmulatedLink()
    runs = _overlap_runs(mesh, link, ("dualpipe", "dualpipev"), microbatches)
    _calibrate(link, *runs[("dualpipe", False)], warmup=1)
    out = {}
    for name in ("dualpipe", "dualpipev"):
        run, model, runtime = runs[(name, True)]
        _timed(run, model)
        for step in range(2 * steps):
            runtime.pair_backward_first = step % 2 == 0
            link.stats.reset()
            _timed(run, model)
            exposed, emulated = _mean_over_ranks([link.stats.exposed_s, link.stats.emulated_s])
            key = (name, "backward first" if runtime.pair_backward_first else "forward first")
            out.setdefault(key, []).append(exposed / emulated)
    return out


def part_pair_order(steps: int, microbatches: int) -> None:
    result = run_ranks(_pair_order_worker, 4, steps, microbatches, timeout=1800)[0]
    print(f"\n## Pair order: exposed all-to-all, pp=2 x dp=2 x ep=2, {microbatches} micro-batches, "
          f"the two orders alternating step by step ({steps} steps each)\n")
    print("| schedule | pair starts with | exposed, per step | median |")
    print("|---|---|---|---:|")
    for (name, order), shares in result.items():
        print(f"| {name} | {order} | {', '.join(f'{x:.0%}' for x in shares)} | {statistics.median(shares):.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("schedules", "overlap", "both", "pair-order"), default="both",
                        help="both = schedules + overlap; pair-order: backward-first vs forward-first F&B")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--overlap-microbatches", type=int, default=16,
                        help="micro-batches per step in part 2 (DualPipe pairs F&B in its main phase only)")
    parser.add_argument("--timeline-dir", type=Path, default=None,
                        help="part 2: write the measured DualPipe timelines (overlap off / on) as PNGs here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {len(os.sched_getaffinity(0))} cores")
    if args.part in ("schedules", "both"):
        part_schedules(args.warmup, args.iters)
    if args.part in ("overlap", "both"):
        part_overlap(args.warmup, args.iters, args.overlap_microbatches, args.timeline_dir)
    if args.part == "pair-order":
        part_pair_order(args.iters, args.overlap_microbatches)


if __name__ == "__main__":
    main()
