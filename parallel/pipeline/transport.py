"""Moving tensors: pipeline point-to-point, an emulated interconnect, a CUDA communication stream.

``PointToPoint`` posts the IR's sends and receives as non-blocking ``isend``/``irecv`` on the pp
group; every tensor of a step has its own tag (from its ``TensorKey``), so messages between two
ranks can never be matched out of order, whatever the transport.

``EmulatedLink`` stands in for a real interconnect on a CPU machine, where gloo's all-to-all
between processes on one host costs almost nothing next to compute: each row exchange of the
expert dispatcher really runs, but its ``wait`` returns no earlier than

    launch time + latency + max(bytes sent, bytes received) / bandwidth,

sleeping for the rest. Sleeping takes no CPU, so whatever the rank computes between launch and
wait hides the transfer exactly as a NIC or NVLink would; the time spent blocked in ``wait`` is
the *exposed* communication, counted in ``LinkStats``.

``CommStream`` (CUDA only) launches each exchange from a dedicated stream that first waits for
the compute stream, and makes the compute stream wait for it in ``wait``: the DualPipe overlap's
communication stream. On NCCL the collective already runs on its own internal stream; this makes
the ordering explicit and keeps the caching allocator from reusing the buffers early.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from dsv3_train.model.moe import MoE

from .ir import ACTIVATION, TensorKey


class PointToPoint:
    """The pp group's sends and receives for one rank (pp indices in, global ranks on the wire)."""

    COPY_SYNC_TAG = 1 << 24
    """Tag of the once-per-step exchange of copies' gradients (above every tensor tag)."""

    def __init__(self, group, global_ranks: list[int], n_stages: int, microbatches: int):
        self.group, self.global_ranks = group, global_ranks
        self.n_stages, self.microbatches = n_stages, microbatches
        if self.tag(TensorKey("gradient", n_stages - 1, microbatches - 1, 1)) >= self.COPY_SYNC_TAG:
            raise ValueError(f"{microbatches} micro-batches x {n_stages} stages exceed the tag space")

    def tag(self, key: TensorKey) -> int:
        """A number unique to the tensor within a step."""
        kind = 0 if key.tensor == ACTIVATION else 1
        return ((key.mb * self.n_stages + key.stage) * 2 + key.direction) * 2 + kind

    def recv(self, key: TensorKey, peer: int, buffer: torch.Tensor) -> "PendingRecv":
        work = dist.irecv(buffer, src=self.global_ranks[peer], group=self.group, tag=self.tag(key))
        return PendingRecv(buffer, work)

    def send(self, key: TensorKey, peer: int, tensor: torch.Tensor):
        return dist.isend(tensor.contiguous(), dst=self.global_ranks[peer], group=self.group,
                          tag=self.tag(key))

    def exchange(self, peer: int, tensor: torch.Tensor) -> torch.Tensor:
        """Swap ``tensor`` with ``peer``'s (same shape); blocking."""
        other = torch.empty_like(tensor)
        rank = self.global_ranks[peer]
        sent = dist.isend(tensor, dst=rank, group=self.group, tag=self.COPY_SYNC_TAG)
        dist.irecv(other, src=rank, group=self.group, tag=self.COPY_SYNC_TAG).wait()
        sent.wait()
        return other


@dataclass
class PendingRecv:
    buffer: torch.Tensor
    work: object

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.buffer


@dataclass
class LinkStats:
    """What an emulated link carried: exchanges, their emulated duration, the part left exposed."""

    exchanges: int = 0
    emulated_s: float = 0.0
    """Sum of latency + bytes / bandwidth over the exchanges."""
    exposed_s: float = 0.0
    """Time callers spent blocked in ``wait`` (the real transfer included)."""
    peer_s: float = 0.0
    """The part of ``exposed_s`` after the emulated duration had passed: the real exchange was not
    done yet, i.e. waiting for a peer that launched its side late (or for gloo's thread)."""
    waits: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) of every blocked wait, in ``time.perf_counter`` seconds."""

    def reset(self) -> None:
        self.exchanges, self.emulated_s, self.exposed_s, self.peer_s, self.waits = 0, 0.0, 0.0, 0.0, []


class _TimedWork:
    def __init__(self, work, ready_at: float, stats: LinkStats):
        self.work, self.ready_at, self.stats = work, ready_at, stats

    def is_completed(self) -> bool:
        return time.perf_counter() >= self.ready_at and self.work.is_completed()

    def wait(self) -> bool:
        start = time.perf_counter()
        self.work.wait()
        done = time.perf_counter()
        if done < self.ready_at:
            time.sleep(self.ready_at - done)
        end = time.perf_counter()
        self.stats.exposed_s += end - start
        self.stats.peer_s += max(0.0, done - max(start, self.ready_at))
        self.stats.waits.append((start, end))
        return True


class EmulatedLink:
    """An all-to-all with a given latency and bandwidth (see the module docstring)."""

    def __init__(self, latency_s: float = 0.0, bandwidth_bytes_per_s: float = float("inf")):
        if latency_s < 0 or bandwidth_bytes_per_s <= 0:
            raise ValueError(f"latency ({latency_s}) must be >= 0 and bandwidth "
                             f"({bandwidth_bytes_per_s}) > 0")
        self.latency_s, self.bandwidth = latency_s, bandwidth_bytes_per_s
        self.stats = LinkStats()

    def duration(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth

    def exchange(self, out, inp, out_splits=None, in_splits=None, group=None, async_op=False):
        """``dist.all_to_all_single``'s signature; the work it returns waits for the link."""
        start = time.perf_counter()
        work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True)
        duration = self.duration(max(inp.numel(), out.numel()) * inp.element_size())
        self.stats.exchanges += 1
        self.stats.emulated_s += duration
        timed = _TimedWork(work, start + duration, self.stats)
        if async_op:
            return timed
        timed.wait()
        return None


class _StreamWork:
    def __init__(self, work, stream):
        self.work, self.stream = work, stream

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def wait(self) -> bool:
        self.work.wait()
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        return True


class CommStream:
    """Launch row exchanges from a dedicated CUDA stream (see the module docstring)."""

    def __init__(self, device: torch.device):
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"CommStream needs a CUDA device, got {device}: on CPU the "
                               f"dispatcher's async gloo collectives already run on gloo's thread")
        self.stream = torch.cuda.Stream(device)

    def exchange(self, out, inp, out_splits=None, in_splits=None, group=None, async_op=False):
        self.stream.wait_stream(torch.cuda.current_stream(inp.device))  # rows are computed
        with torch.cuda.stream(self.stream):
            work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True)
        inp.record_stream(self.stream)
        out.record_stream(self.stream)
        pending = _StreamWork(work, self.stream)
        if async_op:
            return pending
        pending.wait()
        return None


def install_exchange(model: nn.Module, exchange) -> int:
    """Route every expert-parallel dispatcher's row exchanges in ``model`` through ``exchange``
    (an ``EmulatedLink``/``CommStream`` method, or None for the default); returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, MoE) and hasattr(module.dispatcher, "exchange"):
            module.dispatcher.exchange = exchange
            count += 1
    return count


def default_exchange(device: torch.device) -> Optional[object]:
    """A CommStream's exchange on CUDA, None (plain async collectives) elsewhere."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return CommStream(device).exchange
    return None
