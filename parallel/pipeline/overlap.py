"""Phase-split stage execution and the overlapped forward&backward pair (DESIGN.md principle 4).

A stage's forward is a generator that yields each time it has *launched* an expert all-to-all:
a MoE block (with the all-to-all dispatcher) runs as

1. attention: x + MLA(norm(x)), then the router, then the dispatch is launched;  -- yield
2. experts: the shared experts (they need no routed rows), then wait for the dispatched rows,
   run the local experts, launch the combine;                                      -- yield
3. combine: wait for the rows coming home, weight and sum them, add the shared experts' output
   and the residual; the next block's step 1 follows in the same phase.

Dense blocks (and MoE blocks whose dispatcher has no asynchronous halves) run whole inside a
phase. The ops are exactly those of ``Block.forward`` / ``MoE.forward`` (the same values added
in the same order; only the shared experts run earlier). Running the shared experts between the
dispatch's launch and its wait hides part of it even outside a pair, in forward and, because
autograd runs their backward after the dispatch's reverse launch, in backward too.

When overlapping, a ``Tape`` cuts the autograd graph at every yield: each tensor that crosses a
phase boundary is replaced by a detached leaf, so the stage's graph becomes segments whose
backwards can run one at a time, in reverse. A segment's backward starts by waiting for the
all-to-all the previous one launched (``_AllToAllStart.backward``) and ends by launching the next
(``_AllToAllWait.backward``), so backward phases mirror forward phases.

``interleave(forward, backward)`` then alternates one backward phase of micro-batch B with one
forward phase of micro-batch A: every all-to-all is in flight while the other micro-batch
computes. Without overlap the tape does not cut (one segment, one autograd call) and the pair
runs forward then backward. Cutting changes only where autograd accumulates, not what it
computes: tests hold overlap on == off to fp32 rounding.

A backward phase is longer than a forward phase, so an exchange a backward phase launches can
outlast the forward phase that should hide it. ``WaitFiller`` closes that gap as DeepSeek-V3 does
by splitting backward into input- and weight-gradient parts: with overlap on, every backward
queues its weight-gradient GEMMs (``defer_weight_grad``), and every exchange's ``wait`` first runs
queued GEMMs while the exchange is still in flight, and only then blocks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from dsv3_train.model.moe import MoE
from dsv3_train.model.transformer import _cross_entropy, shifted_targets
from dsv3_train.precision import DeferredWeightGrads

from .stage import PipelineStage

MAIN, MTP, BALANCE = "main", "mtp", "balance"


@dataclass
class Segment:
    """One piece of a cut forward: the tensors it hands on and the losses it computed."""

    outputs: list[torch.Tensor] = field(default_factory=list)
    leaves: list[Optional[torch.Tensor]] = field(default_factory=list)
    """The leaf that replaced each output downstream (None: the stage output, graded from outside)."""
    losses: list[tuple[torch.Tensor, float]] = field(default_factory=list)
    """(scalar loss, weight in the total loss)."""


class Tape:
    """The segments of one forward (one chunk, one micro-batch) and the loss values it produced."""

    def __init__(self, cut: bool):
        self.cut = cut
        self.segments = [Segment()]
        self.values: dict[str, list[torch.Tensor]] = {MAIN: [], MTP: [], BALANCE: []}
        """Detached loss terms by kind, summed by the runtime at the end of the step (no sync here)."""

    def boundary(self, carry: dict) -> None:
        """A phase ended: replace every graph tensor in ``carry`` by a leaf (when cutting)."""
        if not self.cut:
            return
        segment = self.segments[-1]
        for name, value in carry.items():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                leaf = value.detach().requires_grad_()
                segment.outputs.append(value)
                segment.leaves.append(leaf)
                carry[name] = leaf
        self.segments.append(Segment())

    def add_loss(self, kind: str, loss: torch.Tensor, weight: float) -> None:
        self.segments[-1].losses.append((loss, weight))
        self.values[kind].append(loss.detach())

    def finish(self, output: torch.Tensor) -> None:
        """The stage output: its gradient comes from the next stage."""
        self.segments[-1].outputs.append(output)
        self.segments[-1].leaves.append(None)

    def backward_steps(self, output_grad: Optional[torch.Tensor], loss_scale: float) -> Iterator[None]:
        """Backward segment by segment, last first; yields between segments (after a launch)."""
        for index in reversed(range(len(self.segments))):
            segment = self.segments[index]
            tensors, grads = [], []
            for out, leaf in zip(segment.outputs, segment.leaves):
                grad = output_grad if leaf is None else leaf.grad
                if grad is not None and out.requires_grad:
                    tensors.append(out)
                    grads.append(grad)
            for loss, weight in segment.losses:
                if loss.requires_grad:
                    tensors.append(loss)
                    grads.append(torch.full_like(loss, weight * loss_scale))
            if tensors:
                torch.autograd.backward(tensors, grads)
            self.segments[index] = Segment()  # free the graph's references
            if index > 0:
                yield


def run_forward(program: Iterator[None], carry: dict, tape: Tape, autocast) -> Iterator[None]:
    """Drive a stage program: cut at each of its yields, and yield there too."""
    while True:
        with autocast():
            try:
                next(program)
            except StopIteration:
                return
        tape.boundary(carry)
        yield


class WaitFiller:
    """Runs queued weight-gradient GEMMs while an expert all-to-all is in flight.

    The runtime registers the queue of the ``B`` it is running (``add``) and empties it when that
    action (the ``B``, or the F&B pair it is part of) ends (``remove``). An exchange launched
    through ``wrap(exchange)`` returns work whose ``wait`` first runs queued GEMMs, oldest first,
    one at a time while the exchange is not complete. Only *when* a weight gradient is computed changes: the same GEMM on the same operands
    (autocast off, as the backward runs it, even when the wait is inside a forward phase),
    accumulated into the same ``.grad`` within the same action, so gradients keep their bits and
    their order from run to run. (An ``I``'s queue is not filled from: its GEMMs wait for the
    chunk's ``W``, and running some of them early, as timing allows, would make the order in which
    a weight's gradients accumulate depend on timing.)
    """

    def __init__(self, device_type: str = "cpu") -> None:
        self.device_type = device_type
        self.queues: list[DeferredWeightGrads] = []
        self.filled = 0
        """GEMM groups run inside waits (since the last ``reset``)."""
        self.filled_s = 0.0
        """Seconds they took."""

    def reset(self) -> None:
        self.filled, self.filled_s = 0, 0.0

    def add(self, queue: DeferredWeightGrads) -> None:
        self.queues.append(queue)

    def remove(self, queue: DeferredWeightGrads) -> None:
        self.queues = [q for q in self.queues if q is not queue]

    def fill(self, done: Callable[[], bool]) -> None:
        """Run queued GEMMs until ``done()`` or nothing is queued."""
        while not done():
            queue = next((q for q in self.queues if len(q)), None)  # a registered queue may
            if queue is None:                                        # still be filling up
                return
            start = time.perf_counter()
            with torch.autocast(self.device_type, enabled=False):  # a forward phase may be waiting
                queue.compute_one()
            self.filled += 1
            self.filled_s += time.perf_counter() - start

    def wrap(self, exchange=None):
        """``exchange`` (all_to_all_single's signature; None: dist.all_to_all_single) whose
        returned work fills its wait."""
        inner = exchange or dist.all_to_all_single

        def filling(out, inp, out_splits=None, in_splits=None, group=None, async_op=False):
            work = _FillingWork(inner(out, inp, out_splits, in_splits, group=group, async_op=True), self)
            if async_op:
                return work
            work.wait()
            return None

        return filling


class _FillingWork:
    def __init__(self, work, filler: WaitFiller):
        self.work, self.filler = work, filler

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def wait(self) -> bool:
        self.filler.fill(self.work.is_completed)
        return self.work.wait()


def interleave(forward: Iterator[None], backward: Iterator[None], backward_first: bool = True) -> None:
    """The overlapped pair: one backward phase, one forward phase, ... until both are done.

    The backward goes first: its first segment is short (the last block's gate weighting and
    residual) and ends by launching the reverse combine, which the forward's first phase
    (attention) then hides. Forward first leaves the forward's first dispatch to that short
    segment (``python bench/pipeline.py --part pair-order`` measures both)."""
    active = [backward, forward] if backward_first else [forward, backward]
    while active:
        for steps in list(active):
            try:
                next(steps)
            except StopIteration:
                active.remove(steps)


def run_in_sequence(*programs: Iterator[None]) -> None:
    """The same pair without overlap: each program runs to its end."""
    for steps in programs:
        for _ in steps:
            pass


def has_async_dispatch(block) -> bool:
    return isinstance(block.ffn, MoE) and hasattr(block.ffn.dispatcher, "dispatch_start")


def block_program(block, carry: dict, tape: Tape, cos, sin) -> Iterator[None]:
    """One block on ``carry["h"]`` (B, T, D), split at its two all-to-all launches."""
    if not has_async_dispatch(block):
        carry["h"], balance = block(carry["h"], cos, sin)
        tape.add_loss(BALANCE, balance, 1.0)
        return
    moe = block.ffn
    x = carry["h"]
    # 1. attention -> router -> dispatch launched
    h = x + block.attn(block.attn_norm(x), cos, sin)
    normed = block.ffn_norm(h)
    routing = moe.router(normed)
    tape.add_loss(BALANCE, routing.balance_loss, 1.0)
    flat = normed.flatten(0, 1)  # (N, D)
    dispatch = moe.dispatcher.dispatch_start(flat, routing.indices)
    carry.update(h=h, flat=flat, gates=routing.weights, rows=dispatch.received)
    yield
    # 2. shared experts while the rows travel -> routed experts -> combine launched
    dispatch.received = carry.pop("rows")
    flat = carry.pop("flat")
    if moe.shared is not None:
        carry["shared"] = moe.shared(flat)  # (N, D)
    rows, tokens_per_expert, handle = dispatch.wait()
    combine = moe.dispatcher.combine_start(moe.experts(rows, tokens_per_expert), None, handle)
    carry["back"] = combine.received
    yield
    # 3. combine -> + shared experts -> residual
    combine.received, combine.weights = carry.pop("back"), carry.pop("gates")
    y = combine.wait()  # (N, D)
    if moe.shared is not None:
        y = y + carry.pop("shared")
    h = carry["h"]
    carry["h"] = h + y.view_as(h)


def stage_program(stage: PipelineStage, carry: dict, tape: Tape, tokens: torch.Tensor,
                  mtp_weight: float, eos_id: Optional[int]) -> Iterator[None]:
    """A stage's forward on one micro-batch of packed windows ``tokens`` (B, T+1).

    The first stage embeds ``tokens[:, :T]`` into ``carry["h"]``; the others start from the
    received ``carry["h"]``. The last stage adds Transformer.loss's terms to the tape:
    L_main, (lambda / D) * L_MTP^k, and every block's balance loss (weight 1).
    """
    seq_len = tokens.shape[1] - 1
    cos, sin = stage.rope(seq_len)
    if stage.is_first:
        carry["h"] = stage.embed(tokens[:, :seq_len])
    for block in stage.layers.values():
        yield from block_program(block, carry, tape, cos, sin)
    if not stage.is_last:
        return
    h = carry["h"]
    tape.add_loss(MAIN, _cross_entropy(stage.head(stage.norm(h)), shifted_targets(tokens, 1, eos_id)), 1.0)
    depth = len(stage.mtp)
    for k, module in enumerate(stage.mtp, start=1):  # V3 eqs. 21-25, as Transformer.loss
        cos, sin = stage.rope(seq_len - k)
        carry["h"] = module.merge(carry["h"][:, : seq_len - k], stage.embed(tokens[:, k:seq_len]))
        yield from block_program(module.block, carry, tape, cos, sin)
        targets = shifted_targets(tokens, k + 1, eos_id)  # (B, T-k)
        loss = _cross_entropy(stage.head(module.norm(carry["h"])), targets)
        tape.add_loss(MTP, loss, mtp_weight / depth)
