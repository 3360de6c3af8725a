"""All-to-all expert parallelism equals one process holding every expert and every token."""
import copy

import pytest
import torch
import torch.distributed as dist

from dsv3_train.config import ModelConfig
from dsv3_train.model.moe import MoE
from parallel.expert import shard_experts
from parallel.mesh import ParallelDims
from parallel.testing import run_ranks

CFG = dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
           n_expert_groups=4, n_limited_groups=2, route_scale=2.5, balance_loss_alpha=0.0)


def _reference(token_counts, bias, seed):
    """The single-process reference: all tokens, all experts; returns module, inputs, grads."""
    torch.manual_seed(seed)
    moe = MoE(ModelConfig(**CFG))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    if bias is not None:
        moe.router.expert_bias.copy_(torch.tensor(bias))
    inputs = [torch.randn(1, n, CFG["dim"]) for n in token_counts]
    upstream = [torch.randn(1, n, CFG["dim"]) for n in token_counts]
    pristine = copy.deepcopy(moe)
    x = torch.cat(inputs, 1).requires_grad_()
    y, _ = moe(x)
    (y * torch.cat(upstream, 1)).sum().backward()
    return pristine, moe, inputs, upstream, y.detach(), x.grad


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _ep_worker(rank, world, dp, ep, token_counts, bias, seed):
    mesh = ParallelDims(dp=dp, ep=ep).build_mesh("cpu")
    pristine, ref, inputs, upstream, y_ref, x_grad_ref = _reference(token_counts, bias, seed)
    moe = copy.deepcopy(pristine)
    shard_experts(moe, mesh.group("ep"))
    start = sum(token_counts[:rank])
    rows = slice(start, start + token_counts[rank])
    x = inputs[rank].clone().requires_grad_()
    y, _ = moe(x)
    (y * upstream[rank]).sum().backward()
    errors = {"y": _rel_err(y[0], y_ref[0, rows]), "x_grad": _rel_err(x.grad[0], x_grad_ref[0, rows])}
    # Expert grads: every ep group sees all tokens of its dp ranks; sum the edp replicas.
    local = moe.experts.n_experts
    first = moe.experts.expert_offset
    for name in ("w13", "w2"):
        grad = getattr(moe.experts, name).grad
        grad = torch.zeros_like(getattr(moe.experts, name)) if grad is None else grad.clone()
        dist.all_reduce(grad, group=mesh.group("edp"))
        errors[f"experts.{name}"] = _rel_err(grad, getattr(ref.experts, name).grad[first:first + local])
    for name, param in moe.named_parameters():
        if name.startswith("experts."):
            continue
        grad = param.grad.clone()
        dist.all_reduce(grad, group=mesh.group("dp"))
        errors[name] = _rel_err(grad, dict(ref.named_parameters())[name].grad)
    received = int(sum(moe.router.expert_load[first:first + local]).item())
    return errors, received


@pytest.mark.timeout(180)
@pytest.mark.parametrize("dp, ep, token_counts, bias", [
    (2, 2, [6, 6], None),
    (2, 2, [3, 13], None),  # uneven token counts across ranks
    (2, 2, [7, 9], [3.0, 3.0, 0, 0, 0, 0, 0, 0]),  # rank 1's experts receive zero tokens
    (4, 4, [5, 1, 9, 4], None),
    (4, 2, [4, 8, 2, 6], None),  # edp = 2: expert grads summed over replicas
])
def test_expert_parallel_matches_single_process(dp, ep, token_counts, bias):
    results = run_ranks(_ep_worker, dp, dp, ep, token_counts, bias, 0, timeout=150)
    for rank, (errors, _) in enumerate(results):
        for name, err in errors.items():
            assert err < 1e-5, (rank, name, err)
    if bias is not None:
        assert results[1][0]["experts.w13"] < 1e-5  # zero-token experts still agree (zero grads)


def _async_worker(rank, world):
    mesh = ParallelDims(dp=world, ep=world).build_mesh("cpu")
    torch.manual_seed(0)
    moe = MoE(ModelConfig(**CFG))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    shard_experts(moe, mesh.group("ep"))
    torch.manual_seed(rank)
    x = torch.randn(1, 10, CFG["dim"])
    y_sync, _ = moe(x)
    routing = moe.router(x)
    pending = moe.dispatcher.dispatch_start(x[0], routing.indices)
    other = torch.randn(64, 64) @ torch.randn(64, 64)  # work done while rows travel
    rows, counts, handle = pending.wait()
    pending_back = moe.dispatcher.combine_start(moe.experts(rows, counts), routing.weights, handle)
    other = other @ other
    y_async = pending_back.wait() + moe.shared(x[0])
    return _rel_err(y_async, y_sync[0])


@pytest.mark.timeout(120)
def test_split_dispatch_and_combine_halves_give_the_same_result():
    assert all(err < 1e-6 for err in run_ranks(_async_worker, 2, timeout=100))


def _node_limited_worker(rank, world):
    # 4 groups = 4 EP ranks (2 experts each); keeping 2 groups means at most 2 ranks per token.
    mesh = ParallelDims(dp=world, ep=world).build_mesh("cpu")
    torch.manual_seed(rank)
    moe = MoE(ModelConfig(**{**CFG, "n_activated_experts": 3}))
    shard_experts(moe, mesh.group("ep"))
    routing = moe.router(torch.randn(1, 50, CFG["dim"]))
    experts_per_rank = CFG["n_routed_experts"] // world
    return max(len(set((row // experts_per_rank).tolist())) for row in routing.indices)


@pytest.mark.timeout(120)
def test_node_limited_routing_reaches_at_most_m_ranks():
    assert all(m <= 2 for m in run_ranks(_node_limited_worker, 4, timeout=100))
