"""Shared helpers for the ZeRO evaluation scripts (spawn N gloo ranks, tiny dense+expert model)."""
from __future__ import annotations

import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

D = 4  # hidden size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) on `world` gloo ranks; raises if any child fails."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


class TinyMoE(torch.nn.Module):
    """y = relu(x @ dense) @ expert; `dense` replicated, `expert` a local shard (seeded by ep index)."""

    def __init__(self, ep_index: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.dense = torch.nn.Parameter(torch.randn(D, D, generator=g))
        g = torch.Generator().manual_seed(100 + ep_index)
        self.expert = torch.nn.Parameter(torch.randn(D, D, generator=g))

    def forward(self, x):
        return torch.relu(x @ self.dense) @ self.expert


def micro_batches(rank: int, n_micro: int, step: int = 0):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank)
    return [torch.randn(3, D, generator=g) for _ in range(n_micro)]


def reference_grads(model: TinyMoE, batches, dp_group, edp_group, dp: int):
    """Local autograd grads, then dense summed over dp and expert over edp, both / dp (DeepSpeed's averaging)."""
    model.zero_grad()
    for x in batches:
        (model(x).square().mean() / len(batches)).backward()
    gd, ge = model.dense.grad.clone(), model.expert.grad.clone()
    dist.all_reduce(gd, group=dp_group)
    dist.all_reduce(ge, group=edp_group)
    model.zero_grad()
    return gd / dp, ge / dp
