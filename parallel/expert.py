"""Expert parallelism: the all-to-all token dispatcher that plugs into ``MoE.dispatcher``.

Each rank of an ``ep`` group holds experts ``[r * E/ep, (r+1) * E/ep)``. Per MoE layer:

dispatch
  1. sort this rank's token copies by global expert (so also by destination rank);
  2. exchange per-expert counts with one small all-to-all (every rank learns what it receives);
  3. all-to-all the rows with uneven splits (``all_to_all_single``; gloo's list form rejects them);
  4. regroup the received rows by local expert (they arrive grouped by source rank).
combine
  5. undo step 4; 6. all-to-all the expert outputs back (splits swapped);
  7. weight each copy by its gate and scatter-add it onto its token.

Steps 3 and 6 are asynchronous halves: ``dispatch_start``/``PendingDispatch.wait`` and
``combine_start``/``PendingCombine.wait`` let a caller compute something else while rows travel
(the DualPipe overlap). Autograd runs the reverse all-to-all in backward, also split into a launch
(in the wait's backward) and a wait (in the start's backward), so independent backward work that
autograd schedules between them overlaps it too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from dsv3_train.model.moe import GroupedExperts, MoE


class _Flight:
    """A collective in flight: the pending work object, shared by a start and its wait."""

    def __init__(self, exchange=None):
        self.exchange = exchange  # all_to_all_single's signature; None: dist.all_to_all_single
        self.work: Optional[dist.Work] = None
        self.grad: Optional[torch.Tensor] = None  # the reverse exchange's result, in backward

    def finish(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


def _launch(rows: torch.Tensor, out_splits: list[int], in_splits: list[int], group, flight: _Flight):
    out = rows.new_empty(sum(out_splits), *rows.shape[1:])
    exchange = flight.exchange or dist.all_to_all_single
    flight.work = exchange(out, rows.contiguous(), out_splits, in_splits, group=group, async_op=True)
    return out


class _AllToAllStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, out_splits, in_splits, group, flight):
        ctx.splits, ctx.group, ctx.flight = (out_splits, in_splits), group, flight
        return _launch(rows, out_splits, in_splits, group, flight)

    @staticmethod
    def backward(ctx, grad):
        # _AllToAllWait.backward launched the reverse exchange of this very grad; collect it.
        ctx.flight.finish()
        grad_rows, ctx.flight.grad = ctx.flight.grad, None
        return grad_rows, None, None, None, None


class _AllToAllWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, received, out_splits, in_splits, group, flight):
        ctx.splits, ctx.group, ctx.flight = (out_splits, in_splits), group, flight
        flight.finish()
        return received.view_as(received)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        ctx.flight.grad = _launch(grad, in_splits, out_splits, ctx.group, ctx.flight)
        return grad, None, None, None, None


@dataclass
class _Pending:
    received: torch.Tensor
    splits: tuple[list[int], list[int]]
    group: object
    flight: _Flight

    def _wait_rows(self) -> torch.Tensor:
        return _AllToAllWait.apply(self.received, *self.splits, self.group, self.flight)


@dataclass
class DispatchHandle:
    order: torch.Tensor  # (N*K,) token copies sorted by global expert
    token_of_row: torch.Tensor  # (N*K,) token index of each sorted copy
    n_tokens: int
    send_splits: list[int]  # rows to each ep rank
    recv_splits: list[int]  # rows from each ep rank
    regroup: torch.Tensor  # received row order -> grouped by local expert
    received_rows: Optional[torch.Tensor] = None  # set by PendingDispatch.wait


@dataclass
class PendingDispatch(_Pending):
    handle: DispatchHandle = None
    tokens_per_expert: list[int] = None

    def wait(self):
        """-> (rows grouped by local expert, rows per local expert, handle)."""
        rows = self._wait_rows()[self.handle.regroup]
        self.handle.received_rows = rows
        return rows, self.tokens_per_expert, self.handle


@dataclass
class PendingCombine(_Pending):
    handle: DispatchHandle = None
    weights: torch.Tensor = None  # (N, K) gates

    def wait(self) -> torch.Tensor:
        """-> combined output (N, D)."""
        h = self.handle
        rows = self._wait_rows()  # (N*K, D) in sorted order
        gates = self.weights.flatten()[h.order].unsqueeze(-1).to(rows.dtype)
        out = rows.new_zeros(h.n_tokens, rows.shape[-1])
        return out.index_add_(0, h.token_of_row, rows * gates)


class AllToAllDispatcher:
    """Token dispatcher over an expert-parallel process group (see the module docstring)."""

    def __init__(self, n_experts: int, ep_group, counts_group=None):
        self.n_experts, self.group = n_experts, ep_group
        # step 2 on a group of its own when given (ParallelMesh.ep_counts): on NCCL a count
        # exchange on the ep group would wait for every row exchange launched before it
        self.counts_group = counts_group if counts_group is not None else ep_group
        self.ep = dist.get_world_size(ep_group)
        if n_experts % self.ep:
            raise ValueError(f"n_experts ({n_experts}) must be divisible by the ep group size ({self.ep})")
        self.local_experts = n_experts // self.ep
        # The row exchanges of steps 3 and 6 (not the count exchange): all_to_all_single by
        # default; parallel.pipeline.transport swaps in an emulated link or a CUDA comm stream.
        self.exchange = None

    def dispatch_start(self, x: torch.Tensor, indices: torch.Tensor) -> PendingDispatch:
        """x (N, D), indices (N, K) -> rows travelling to their experts' ranks."""
        flat = indices.flatten()  # (N*K,)
        order = flat.argsort(stable=True)  # step 1
        token_of_row = order // indices.shape[1]
        counts = torch.bincount(flat, minlength=self.n_experts)  # (E,)
        recv_counts = torch.empty_like(counts)  # step 2: (ep * E_local,) from each source rank
        dist.all_to_all_single(recv_counts, counts, group=self.counts_group)
        send_splits = counts.view(self.ep, self.local_experts).sum(1).tolist()
        recv_matrix = recv_counts.view(self.ep, self.local_experts)  # (source rank, local expert)
        recv_splits = recv_matrix.sum(1).tolist()
        # step 4's permutation: received rows are (source, expert)-major; we want (expert, source).
        segment = torch.repeat_interleave(torch.arange(recv_matrix.numel(), device=recv_matrix.device),
                                          recv_matrix.flatten())
        source, expert = segment // self.local_experts, segment % self.local_experts
        regroup = (expert * self.ep + source).argsort(stable=True)
        handle = DispatchHandle(order, token_of_row, x.shape[0], send_splits, recv_splits, regroup)
        flight = _Flight(self.exchange)
        received = _AllToAllStart.apply(x.index_select(0, token_of_row), recv_splits, send_splits, self.group, flight)  # step 3
        return PendingDispatch(received, (recv_splits, send_splits), self.group, flight, handle,
                               recv_matrix.sum(0).tolist())

    def combine_start(self, expert_out: torch.Tensor, weights: torch.Tensor, handle: DispatchHandle) -> PendingCombine:
        """Local experts' outputs (grouped by local expert) -> rows travelling home."""
        rows = handle.received_rows
        if rows is not None and rows.requires_grad and not expert_out.requires_grad:
            # This rank's experts got no rows, so their output is detached. Keep it in the graph:
            # backward's reverse all-to-all needs every rank of the group, also this one.
            expert_out = expert_out + rows.sum() * 0
        received_order = expert_out[handle.regroup.argsort()]  # step 5
        flight = _Flight(self.exchange)
        back = _AllToAllStart.apply(received_order, handle.send_splits, handle.recv_splits, self.group, flight)
        return PendingCombine(back, (handle.send_splits, handle.recv_splits), self.group, flight, handle, weights)

    # The synchronous interface MoE calls (same as LocalDispatcher's).
    def dispatch(self, x: torch.Tensor, indices: torch.Tensor):
        return self.dispatch_start(x, indices).wait()

    def combine(self, expert_out: torch.Tensor, weights: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        return self.combine_start(expert_out, weights, handle).wait()


def shard_experts(moe: MoE, ep_group, counts_group=None) -> None:
    """Keep only this rank's experts in ``moe`` and route through the all-to-all dispatcher."""
    ep, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    full = moe.experts
    local = full.n_experts // ep
    sharded = GroupedExperts(local, full.w2.shape[1], full.hidden, precision=full.precision)
    with torch.no_grad():
        sharded.w13.copy_(full.w13[rank * local:(rank + 1) * local])
        sharded.w2.copy_(full.w2[rank * local:(rank + 1) * local])
    sharded.expert_offset = rank * local
    moe.experts = sharded
    moe.dispatcher = AllToAllDispatcher(full.n_experts, ep_group, counts_group)


def apply_expert_parallel(model: nn.Module, ep_group, counts_group=None) -> None:
    """Shard the experts of every MoE layer of model over ep_group (count exchanges on
    ``counts_group``, default ep_group)."""
    for module in list(model.modules()):
        if isinstance(module, MoE):
            shard_experts(module, ep_group, counts_group)
