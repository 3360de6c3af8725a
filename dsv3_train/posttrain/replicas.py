"""Data parallelism for post-training: full model replicas, gradients summed over ranks.

Post-training models are small next to their rollouts, and decoding reads the weights directly
(absorbed MLA), so every rank keeps the whole model: rank r takes its slice of the step's prompts
or examples, computes its part of the loss with *global* normalisers (token and sequence counts
summed over ranks first), and the gradients are summed, not averaged. The sum over ranks of each
rank's share is then exactly the full batch's loss, so a dp run steps like one process.
"""
from __future__ import annotations

from typing import Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


class SingleProcess:
    rank, size = 0, 1

    def shard(self, items: Sequence[T]) -> list[T]:
        return list(items)

    def sum(self, values: Sequence[float]) -> list[float]:
        return [float(v) for v in values]

    def sum_tensor_(self, tensor: torch.Tensor) -> None:
        pass

    def sum_gradients(self, model: nn.Module) -> None:
        pass

    def broadcast_parameters(self, model: nn.Module) -> None:
        pass


class Replicas(SingleProcess):
    """The ranks of ``group`` (default: the world) each holding a full replica."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous slice; len(items) must divide evenly."""
        if len(items) % self.size:
            raise ValueError(f"{len(items)} items cannot be split evenly over dp={self.size} ranks: "
                             f"use a multiple of {self.size}")
        per_rank = len(items) // self.size
        return list(items[self.rank * per_rank:(self.rank + 1) * per_rank])

    def sum(self, values: Sequence[float]) -> list[float]:
        tensor = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(tensor, group=self.group)
        return tensor.tolist()

    def sum_tensor_(self, tensor: torch.Tensor) -> None:
        """Sum a tensor over the ranks, in place."""
        dist.all_reduce(tensor, group=self.group)

    def sum_gradients(self, model: nn.Module) -> None:
        """One all-reduce of every gradient, flattened (absent gradients count as zeros)."""
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def broadcast_parameters(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers everywhere (replicas start identical)."""
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                           group=self.group)
