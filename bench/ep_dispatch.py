"""Expert-parallel dispatch + combine throughput: our all-to-all dispatcher vs an all-gather one.

Each rank holds N tokens, their top-k routing and E/W of the experts (ep = dp = W, one ``ep``
group of all ranks). One timed step is forward + backward through dispatch -> the local
``GroupedExperts`` -> combine, with gradients for the tokens, the gates and the expert weights.

* ``all-to-all`` -- :class:`parallel.expert.AllToAllDispatcher`: each (token, expert) copy
  travels to its expert's rank and back (uneven ``all_to_all_single``), forward and backward.
* ``all-gather`` -- :class:`AllGatherDispatcher` below, the other classic design (Megatron-Core's
  ``MoEAllGatherTokenDispatcher``): every rank all-gathers all tokens and their routing, runs its
  experts on the copies routed to them, and reduce-scatters the partial outputs home.

Before timing, the two are asserted equal on every rank (output, token, gate and expert-weight
gradients; fp32, rtol = atol = 1e-5). Tokens/s counts the tokens of all ranks; a step's time is the
slowest rank's, and a cell is the median over iterations after warmup. The two dispatchers take
turns inside every iteration, so load from elsewhere on the machine hits both alike; the ratio is
the median of the per-iteration (paired) ratios, printed with its range. CPU ms per step (a rank
process's CPU time, gloo's threads included, waiting excluded) shows the work each design makes a
rank do; outside load inflates it much less than wall time.

Bytes per token are counted, not estimated: one extra step runs with every collective wrapped,
and each call adds the bytes this rank sends, as the usual algorithms move them: all_to_all_single
the rows for other ranks; all-gather (ring) (W-1) x its input; reduce-scatter (ring) (W-1)/W x its
input. The sum over ranks is divided by the tokens of all ranks (forward + backward, all payloads:
rows, counts, indices, gates). Gloo's framing is not counted.

Usage::

    python bench/ep_dispatch.py                       # 2 and 4 ranks, both shapes
    python bench/ep_dispatch.py --ranks 2 --shapes fine --iters 3

Ranks are spawned with ``parallel.testing.run_ranks`` (gloo, OMP_NUM_THREADS=1, one torch thread
each). More ranks than cores oversubscribes the CPU; the bench says so when it happens.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3_train.model.moe import GroupedExperts  # noqa: E402
from parallel.expert import AllToAllDispatcher  # noqa: E402
from parallel.mesh import ParallelDims  # noqa: E402
from parallel.testing import run_ranks  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    n_experts: int
    top_k: int
    hidden: int

    def label(self) -> str:
        return f"{self.name}: d={self.dim}, E={self.n_experts} top-{self.top_k}, H={self.hidden}"


SHAPES = {
    # fine-grained experts: 4 copies of each token travel
    "fine": Shape("fine", dim=256, n_experts=16, top_k=4, hidden=128),
    # coarse experts: 2 copies, same expert FLOPs per token as "fine"
    "coarse": Shape("coarse", dim=256, n_experts=8, top_k=2, hidden=256),
}


# ---------------------------------------------------------------------------- the all-gather peer

def _all_gather(local: torch.Tensor, group) -> torch.Tensor:
    gathered = local.new_empty(dist.get_world_size(group) * local.shape[0], *local.shape[1:])
    dist.all_gather_single(gathered, local.contiguous(), group=group)
    return gathered


def _reduce_scatter(full: torch.Tensor, group) -> torch.Tensor:
    out = full.new_empty(full.shape[0] // dist.get_world_size(group), *full.shape[1:])
    dist.reduce_scatter_single(out, full.contiguous(), group=group)
    return out


class _GatherFromGroup(torch.autograd.Function):
    """(n, ...) per rank -> (W*n, ...) rank-major; backward reduce-scatters (sums our slice's grads)."""

    @staticmethod
    def forward(ctx, local, group):
        ctx.group = group
        return _all_gather(local, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


class _ReduceScatterToGroup(torch.autograd.Function):
    """(W*n, ...) per rank -> sum over ranks of slice [rank]; backward all-gathers."""

    @staticmethod
    def forward(ctx, partial, group):
        ctx.group = group
        return _reduce_scatter(partial, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


@dataclass
class _GatherHandle:
    copies: torch.Tensor  # (M,) flat (gathered token, slot) index of each local copy, by local expert
    token_of_row: torch.Tensor  # (M,) gathered token index of each row
    n_gathered: int  # W*N


class AllGatherDispatcher:
    """Every rank sees all tokens of the group and keeps the copies routed to its own experts.

    dispatch: 1. all-gather tokens (W*N, D) and routing (W*N, K) over the group;
              2. keep the copies whose expert lives here, stably sorted by local expert;
              3. gather their rows and count rows per local expert.
    combine:  4. all-gather the gates; weight each row and scatter-add it onto its gathered token,
                 a partial (W*N, D) output holding this rank's experts' share;
              5. reduce-scatter: sum the partials over ranks, keep this rank's N tokens.
    Backward is the mirror: 5 all-gathers the output gradient, 1 and 4 reduce-scatter theirs.
    Same interface as ``AllToAllDispatcher.dispatch``/``combine``; needs equal N on every rank.
    """

    def __init__(self, n_experts: int, group):
        self.group, self.ep = group, dist.get_world_size(group)
        self.local_experts = n_experts // self.ep
        self.first_expert = dist.get_rank(group) * self.local_experts

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor):
        gathered_x = _GatherFromGroup.apply(x, self.group)  # (W*N, D), step 1
        gathered_idx = _all_gather(indices, self.group)  # (W*N, K)
        local_expert = gathered_idx.flatten() - self.first_expert  # (W*N*K,)
        mine = ((local_expert >= 0) & (local_expert < self.local_experts)).nonzero().squeeze(1)
        copies = mine[local_expert[mine].argsort(stable=True)]  # step 2
        token_of_row = copies // indices.shape[1]
        counts = torch.bincount(local_expert[copies], minlength=self.local_experts).tolist()
        rows = gathered_x.index_select(0, token_of_row)  # step 3
        return rows, counts, _GatherHandle(copies, token_of_row, gathered_x.shape[0])

    def combine(self, expert_out: torch.Tensor, weights: torch.Tensor, handle: _GatherHandle):
        gathered_w = _GatherFromGroup.apply(weights, self.group)  # (W*N, K), step 4
        gates = gathered_w.flatten()[handle.copies].unsqueeze(-1).to(expert_out.dtype)  # (M, 1)
        partial = expert_out.new_zeros(handle.n_gathered, expert_out.shape[1])
        partial = partial.index_add(0, handle.token_of_row, expert_out * gates)  # (W*N, D)
        return _ReduceScatterToGroup.apply(partial, self.group)  # (N, D), step 5


# ----------------------------------------------------------------------------- per-rank workers

def _inputs(shape: Shape, n_tokens: int, rank: int):
    """This rank's tokens, routing (k distinct experts, uniform), gates and upstream gradient."""
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(n_tokens, shape.dim, generator=gen)
    indices = torch.rand(n_tokens, shape.n_experts, generator=gen).topk(shape.top_k, dim=-1).indices
    weights = torch.rand(n_tokens, shape.top_k, generator=gen) + 0.1
    upstream = torch.randn(n_tokens, shape.dim, generator=gen)
    return x, indices, weights, upstream


def _local_experts(shape: Shape, rank: int, world: int) -> GroupedExperts:
    """This rank's slice of one seeded full set of experts."""
    torch.manual_seed(0)
    full = GroupedExperts(shape.n_experts, shape.dim, shape.hidden)
    local = shape.n_experts // world
    experts = GroupedExperts(local, shape.dim, shape.hidden)
    with torch.no_grad():
        for name in ("w13", "w2"):
            torch.nn.init.normal_(getattr(full, name), 0.0, 0.02)
            getattr(experts, name).copy_(getattr(full, name)[rank * local:(rank + 1) * local])
    return experts


def _step(dispatcher, experts, x, indices, weights, upstream) -> torch.Tensor:
    """Forward + backward through dispatch -> experts -> combine; returns the output."""
    experts.zero_grad(set_to_none=True)
    x.grad = weights.grad = None
    rows, counts, handle = dispatcher.dispatch(x, indices)
    y = dispatcher.combine(experts(rows, counts), weights, handle)
    y.backward(upstream)
    return y.detach()


def _assert_equal(runs: dict, inputs: tuple) -> float:
    """Output and every gradient of the two dispatchers agree; returns the largest |difference|."""
    x, _, weights, _ = inputs
    results = {}
    for name, (dispatcher, experts) in runs.items():
        y = _step(dispatcher, experts, *inputs)
        results[name] = [y, x.grad.clone(), weights.grad.clone(), experts.w13.grad, experts.w2.grad]
    ours, peer = results.values()
    for a, b in zip(ours, peer):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    return max((a - b).abs().max().item() for a, b in zip(ours, peer))


_WRAPPED = ("all_to_all_single", "all_gather_single", "reduce_scatter_single")


def _count_bytes(run, inputs: tuple, group) -> int:
    """Bytes this rank sends during one step, collective by collective (see module docstring)."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    sent = [0]
    originals = {name: getattr(dist, name) for name in _WRAPPED}

    def counting(name):
        def call(output, tensor, *args, **kwargs):
            nbytes = tensor.numel() * tensor.element_size()
            if name == "all_to_all_single":
                splits = args[1] if len(args) > 1 else kwargs.get("input_split_sizes")
                row_bytes = nbytes // max(tensor.shape[0], 1)
                own = splits[me] * row_bytes if splits else nbytes // world
                sent[0] += nbytes - own
            elif name == "all_gather_single":
                sent[0] += (world - 1) * nbytes
            else:
                sent[0] += (world - 1) * nbytes // world
            return originals[name](output, tensor, *args, **kwargs)
        return call

    for name in _WRAPPED:
        setattr(dist, name, counting(name))
    try:
        _step(*run, *inputs)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return sent[0]


def _worker(rank: int, world: int, shape: Shape, n_tokens: int, warmup: int, iters: int) -> dict:
    group = ParallelDims(dp=world, ep=world).build_mesh("cpu").group("ep")
    experts = _local_experts(shape, rank, world)
    runs = {"all-to-all": (AllToAllDispatcher(shape.n_experts, group), experts),
            "all-gather": (AllGatherDispatcher(shape.n_experts, group), copy.deepcopy(experts))}
    x, indices, weights, upstream = _inputs(shape, n_tokens, rank)
    inputs = (x.requires_grad_(), indices, weights.requires_grad_(), upstream)
    max_diff = _assert_equal(runs, inputs)
    sent = {name: _count_bytes(run, inputs, group) for name, run in runs.items()}
    seconds = {name: [] for name in runs}
    cpu_seconds = {name: [] for name in runs}  # this process's CPU time: work, not waiting
    for i in range(warmup + iters):
        for name, run in runs.items():
            dist.barrier(group)
            start, cpu_start = time.perf_counter(), time.process_time()
            _step(*run, *inputs)
            if i >= warmup:
                seconds[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(time.process_time() - cpu_start)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "sent": sent, "max_diff": max_diff}


# ------------------------------------------------------------------------------------ the driver

def measure(shape: Shape, world: int, n_tokens: int, warmup: int, iters: int, timeout: float) -> dict:
    """Spawn the ranks for one shape; reduce their timings and byte counts to one table row."""
    per_rank = run_ranks(_worker, world, shape, n_tokens, warmup, iters, timeout=timeout)
    total_tokens = world * n_tokens
    row = {"max_diff": max(r["max_diff"] for r in per_rank)}
    slowest = {}
    for name in per_rank[0]["seconds"]:
        slowest[name] = [max(r["seconds"][name][i] for r in per_rank) for i in range(iters)]
        row[name] = {"tok_s": total_tokens / statistics.median(slowest[name]),
                     "bytes": sum(r["sent"][name] for r in per_rank) / total_tokens,
                     "cpu_ms": statistics.mean(statistics.median(r["cpu_seconds"][name])
                                               for r in per_rank) * 1e3}
    # Paired: the two ran back to back in each iteration, so a burst of outside load hits both.
    paired = sorted(g / a for a, g in zip(slowest["all-to-all"], slowest["all-gather"]))
    row["ratio"] = (statistics.median(paired), paired[0], paired[-1])
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per spawned run")
    args = parser.parse_args(argv)

    cores = len(os.sched_getaffinity(0))
    print(f"torch {torch.__version__}, gloo, 1 thread per rank, {cores} cores, {args.tokens} tokens per "
          f"rank, median of {args.iters} fwd+bwd after {args.warmup} warmup", flush=True)
    oversubscribed = [w for w in args.ranks if w > cores]
    if oversubscribed:
        print(f"note: {oversubscribed} ranks on {cores} cores oversubscribes the CPU; those rows "
              f"measure time-sliced ranks, not parallel ones", flush=True)
    began = time.perf_counter()
    rows = []
    for world in args.ranks:
        for name in args.shapes:
            shape = SHAPES[name]
            start = time.perf_counter()
            row = measure(shape, world, args.tokens, args.warmup, args.iters, args.timeout)
            print(f"{world} ranks, {shape.label()}: outputs and gradients equal (max |diff| "
                  f"{row['max_diff']:.1e}); " + ", ".join(f"{k} {row[k]['tok_s']:,.0f} tok/s"
                                                      for k in ("all-to-all", "all-gather"))
                  + f" ({time.perf_counter() - start:.0f} s)", flush=True)
            rows.append((world, shape, row))

    print("\n| shape | ranks | all-to-all tok/s | all-gather tok/s | all-to-all/all-gather "
          "(min-max) | all-to-all bytes/token | all-gather bytes/token | all-to-all CPU ms "
          "| all-gather CPU ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for world, shape, row in rows:
        ours, peer = row["all-to-all"], row["all-gather"]
        ratio, low, high = row["ratio"]
        print(f"| {shape.label()} | {world}{' *' if world > cores else ''} | {ours['tok_s']:,.0f} | "
              f"{peer['tok_s']:,.0f} | {ratio:.2f} ({low:.2f}-{high:.2f}) | {ours['bytes']:,.0f} | "
              f"{peer['bytes']:,.0f} | {ours['cpu_ms']:.0f} | {peer['cpu_ms']:.0f} |")
    print("\ntok/s: tokens of all ranks / median step time (slowest rank). ratio: median over iterations "
          "of all-gather step time / all-to-all step time (paired), with its range. CPU ms: CPU "
          "time of one rank's process per step (all its threads, gloo's included; waiting excluded), "
          "median over iterations, mean over ranks.")
    if oversubscribed:
        print(f"\n* more ranks than the {cores} cores: oversubscribed")
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
