"""Usage: python bench/zero_eval/fsdp2_dcp_reshard.py [save_dp=2 save_ep=2] [load layouts, e.g. 1:1 4:4 2:1]

FSDP2 (fully_shard) with dense params sharded over `dp` and expert params (an (E, D, D) tensor,
Shard(0) over `ep` = local expert shards) FSDP-sharded over `edp`, both from parallel/mesh.py. Trains 2 Adam steps at
the save layout, saves with torch.distributed.checkpoint (get_state_dict -> dcp.save), then for each load layout
restores (dcp.load -> set_state_dict) and compares the full optimizer state and the next-step loss with an
uninterrupted run. Global batch fixed (8 samples), split evenly over dp.
"""
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from common import D, spawn

E, GLOBAL_B = 4, 8


class _GatherTokens(torch.autograd.Function):
    """all_gather over a group; backward sums the grads and keeps this rank's chunk (gloo-safe reduce-scatter).
    (torch.distributed.nn.functional.all_gather's gloo backward scatters from global rank 0: fails in subgroups.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g.chunk(dist.get_world_size(ctx.group))[dist.get_rank(ctx.group)], None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.k, None


class Experts(torch.nn.Module):
    """E experts (D x D); under EP a DTensor Shard(0) over ep. Its own forward, so FSDP unshards it first."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, h):
        w = self.w
        if not hasattr(w, "to_local"):  # plain single-process use
            return torch.einsum("bd,edf->bf", h, w) / E
        # EP stand-in for the all-to-all: every token visits every expert; tokens gathered over ep, local
        # experts applied, contributions summed over ep (differentiable collectives), own tokens kept.
        import torch.distributed.nn.functional as dfn
        m = w.device_mesh  # 1-D (ep) if edp == 1, else (edp, ep) while FSDP has it unsharded
        ep_group = m.get_group("ep") if m.ndim > 1 else m.get_group()
        n = dist.get_world_size(ep_group)
        h_all = _GatherTokens.apply(h, ep_group) if n > 1 else h
        out = torch.einsum("bd,edf->bf", h_all, _ScaleGrad.apply(w.to_local(), 1.0 / n)) / E
        if n > 1:
            out = dfn.all_reduce(out, group=ep_group).chunk(n)[dist.get_rank(ep_group)]
        return out


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.dense = torch.nn.Linear(D, D)
        with torch.no_grad():
            self.dense.weight.copy_(torch.randn(D, D, generator=g))
            self.dense.bias.copy_(torch.randn(D, generator=g))
        self.experts = Experts(torch.randn(E, D, D, generator=g))

    def forward(self, x):
        return self.experts(torch.relu(self.dense(x)))


def build(dp, ep):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from parallel.mesh import ParallelDims

    pm = ParallelDims(dp=dp, ep=ep).build_mesh("cpu")
    model = Model()
    # expert weights: local expert shards (Shard(0) over ep), then FSDP over edp (2-D, like TP + FSDP)
    model.experts.w = torch.nn.Parameter(distribute_tensor(model.experts.w.data, pm.expert_mesh["ep"], [Shard(0)]))
    fully_shard(model.experts, mesh=pm.expert_mesh["edp"])
    # FSDP averages expert grads over edp; they must be averaged over all dp ranks' tokens, i.e. scaled by 1/ep.
    # (set_gradient_divide_factor(dp) says this directly but uses ReduceOp.PREMUL_SUM, which gloo rejects.)
    fully_shard(model.dense, mesh=pm.mesh["dp"])
    fully_shard(model, mesh=pm.mesh["dp"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return pm, model, opt


def step(model, opt, s, dp_rank, dp):
    g = torch.Generator().manual_seed(s)
    xb = torch.randn(GLOBAL_B, D, generator=g)
    x = xb.chunk(dp)[dp_rank]
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    t = loss.detach().clone()
    dist.all_reduce(t)
    return float(t) / dp


def full_optim_state(model, opt):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    _, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    return {f"{k}.{n}": v.clone() for k, st in osd["state"].items() for n, v in st.items() if torch.is_tensor(v)}


def save_worker(rank, world, dp, ep, ckpt, ref_path):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    pm, model, opt = build(dp, ep)
    dp_rank = dist.get_rank(pm.group("dp"))
    losses = [step(model, opt, s, dp_rank, dp) for s in range(2)]
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    state = full_optim_state(model, opt)
    next_loss = step(model, opt, 2, dp_rank, dp)
    if rank == 0:
        torch.save({"state": state, "next_loss": next_loss}, ref_path)
        print(f"SAVE dp={dp} ep={ep}: losses {losses}, next-step loss {next_loss:.8f}; "
              f"shards written: {sorted(os.listdir(ckpt))}")


def load_worker(rank, world, dp, ep, ckpt, ref_path):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    pm, model, opt = build(dp, ep)
    msd, osd = get_state_dict(model, opt)  # initialises (empty) Adam state so it can be loaded into
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    state = full_optim_state(model, opt)
    next_loss = step(model, opt, 2, dist.get_rank(pm.group("dp")), dp)
    if rank == 0:
        ref = torch.load(ref_path)
        assert ref["state"].keys() == state.keys(), (ref["state"].keys(), state.keys())
        err = max(float((ref["state"][k] - state[k]).abs().max()) for k in state)
        rel = abs(next_loss - ref["next_loss"]) / abs(ref["next_loss"])
        ok = err == 0.0 and rel < 1e-5
        print(f"RESULT load dp={dp} ep={ep}: {len(state)} optimizer-state tensors, max |diff| {err:.1e}; "
              f"next-step loss {next_loss:.8f} vs {ref['next_loss']:.8f} (rel {rel:.1e}) -> "
              f"{'SAME' if ok else 'DIFFERENT'}")


if __name__ == "__main__":
    save_dp, save_ep = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (2, 2)
    loads = [tuple(map(int, a.split(":"))) for a in sys.argv[3:]] or [(1, 1), (4, 4)]
    tmp = tempfile.mkdtemp(prefix="zero_eval_dcp_")
    try:
        ckpt, ref = os.path.join(tmp, "ckpt"), os.path.join(tmp, "ref.pt")
        spawn(save_worker, save_dp, save_dp, save_ep, ckpt, ref)
        for dp, ep in loads:
            spawn(load_worker, dp, dp, ep, ckpt, ref)
    finally:
        shutil.rmtree(tmp)
