"""Usage: python bench/zero_eval/fsdp2_deferred_dw.py [world=2]

FSDP2 over `dp` with a zero-bubble style split backward: per micro-batch stage_backward_input now and
stage_backward_weight later (torch.distributed.pipelining._backward), then the gradient reduction that
torch's schedules issue once per step (PipelineStage.perform_reduce_grad, pipelining/stage.py: the same calls
are made here). Compares the reduced-gradient shards with a hand-reduced reference.
"""
import sys

import torch
import torch.distributed as dist

from common import D, micro_batches, spawn

N_MICRO = 3


def make():
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.ReLU(), torch.nn.Linear(D, D))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    batches = micro_batches(rank, N_MICRO)
    ref = make()
    for x in batches:
        (ref(x).square().mean() / N_MICRO).backward()
    ref_grads = []
    for p in ref.parameters():
        dist.all_reduce(p.grad)
        ref_grads.append(p.grad / world)

    model = make()
    fully_shard(model, mesh=mesh)
    # stage.py backward_maybe_with_nosync for an FSDPModule: no sync during the micro-batches
    model.set_is_last_backward(False)
    model.set_reshard_after_backward(False)
    model.set_requires_gradient_sync(False)
    pending = []
    for x in batches:  # all dI first, all dW afterwards (the extreme of a ZB schedule)
        x = x.requires_grad_(True)
        loss = model(x).square().mean() / N_MICRO
        _, pgroups = stage_backward_input([loss], None, [x], model.parameters())
        pending.append(pgroups)
    for pgroups in pending:
        stage_backward_weight(model.parameters(), pgroups)
    # stage.py perform_reduce_grad: one reduce-scatter per step
    model.set_is_last_backward(True)
    model.set_reshard_after_backward(True)
    model.set_requires_gradient_sync(True)
    state = fully_shard.state(model)
    for st in state._state_ctx.all_states:
        for pg in st._fsdp_param_groups:
            pg.post_backward()
    state._root_post_backward_final_callback()

    err = max(float((p.grad.full_tensor() - r).abs().max() / r.abs().max()) for p, r in zip(model.parameters(), ref_grads))
    t = torch.tensor(err)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"RESULT FSDP2 dp={world}, {N_MICRO} micro-batches, dW deferred: grad is DTensor "
              f"{type(next(model.parameters()).grad).__name__}, max rel err {float(t):.2e} -> "
              f"{'CORRECT' if t < 1e-5 else 'WRONG'}")


if __name__ == "__main__":
    spawn(worker, int(sys.argv[1]) if len(sys.argv) > 1 else 2)
