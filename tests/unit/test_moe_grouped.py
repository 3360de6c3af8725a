"""The hand-written grouped-expert and combine kernels against plain-autograd references."""
import pytest
import torch
import torch.nn.functional as F

from dsv3_train.config import ModelConfig
from dsv3_train.model.moe import GroupedExperts, LocalDispatcher, MoE


def _loop_experts(experts: GroupedExperts, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The per-expert F.linear loop under autograd (what GroupedExperts did before)."""
    outputs = []
    for expert, rows in enumerate(x.split(counts)):
        if rows.shape[0] == 0:
            continue
        gate, up = F.linear(rows, experts.w13[expert]).chunk(2, dim=-1)
        outputs.append(F.linear(F.silu(gate) * up, experts.w2[expert]))
    return torch.cat(outputs) if outputs else x.new_zeros(0, x.shape[-1])


def _naive_combine(expert_out, weights, order, token_of_row, n_tokens):
    gates = weights.flatten()[order].unsqueeze(-1)
    return expert_out.new_zeros(n_tokens, expert_out.shape[-1]).index_add(0, token_of_row, expert_out * gates)


def _experts(n_experts=6, dim=12, hidden=5, seed=0):
    torch.manual_seed(seed)
    experts = GroupedExperts(n_experts, dim, hidden)
    torch.nn.init.normal_(experts.w13, 0, 0.5)
    torch.nn.init.normal_(experts.w2, 0, 0.5)
    return experts


def _grads(fn, experts, x, grad):
    experts.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    y = fn(xi)
    y.backward(grad)
    return y.detach(), xi.grad, experts.w13.grad.clone(), experts.w2.grad.clone()


@pytest.mark.parametrize("counts", [[3, 0, 7, 1, 0, 4], [2, 2, 2, 2, 2, 2], [0, 0, 0, 9, 0, 0]])
def test_grouped_experts_match_per_expert_loop_forward_and_backward(counts):
    experts = _experts()
    x = torch.randn(sum(counts), 12)
    grad = torch.randn(sum(counts), 12)
    got = _grads(lambda xi: experts(xi, counts), experts, x, grad)
    want = _grads(lambda xi: _loop_experts(experts, xi, counts), experts, x, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    idle = [e for e, c in enumerate(counts) if c == 0]
    assert experts.w13.grad[idle].abs().sum() == 0 and experts.w2.grad[idle].abs().sum() == 0


def test_grouped_experts_accept_tensor_counts_and_empty_input():
    experts = _experts()
    counts = [3, 0, 7, 1, 0, 4]
    x = torch.randn(sum(counts), 12)
    torch.testing.assert_close(experts(x, torch.tensor(counts)), experts(x, counts))
    empty = torch.zeros(0, 12, requires_grad=True)
    out = experts(empty, [0] * 6)
    assert out.shape == (0, 12)
    out.sum().backward()
    assert experts.w13.grad.abs().sum() == 0


def test_grouped_experts_without_input_gradient():
    experts = _experts()
    counts = [3, 0, 7, 1, 0, 4]
    x = torch.randn(sum(counts), 12)  # no requires_grad: only weight gradients are asked for
    experts(x, counts).square().sum().backward()
    w13_grad = experts.w13.grad.clone()
    experts.zero_grad(set_to_none=True)
    _loop_experts(experts, x, counts).square().sum().backward()
    torch.testing.assert_close(w13_grad, experts.w13.grad, rtol=1e-5, atol=1e-6)


def test_combine_matches_naive_scatter_including_gate_gradients():
    torch.manual_seed(0)
    n_tokens, top_k, n_experts, dim = 9, 3, 5, 7
    indices = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(n_tokens)])
    dispatcher = LocalDispatcher(n_experts)
    x = torch.randn(n_tokens, dim)
    rows, counts, handle = dispatcher.dispatch(x, indices)
    assert sum(counts) == n_tokens * top_k
    order, token_of_row, _ = handle
    torch.testing.assert_close(rows, x[token_of_row])
    expert_out = torch.randn(n_tokens * top_k, dim)
    weights = torch.rand(n_tokens, top_k)
    grad = torch.randn(n_tokens, dim)
    results = []
    for combine in (dispatcher.combine, lambda e, w, h: _naive_combine(e, w, order, token_of_row, n_tokens)):
        e, w = expert_out.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        y = combine(e, w, handle)
        y.backward(grad)
        results.append((y.detach(), e.grad, w.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _moe(**overrides):
    base = dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_shared_experts=1, n_activated_experts=3,
                n_expert_groups=4, n_limited_groups=2, route_scale=2.5, balance_loss_alpha=1e-2)
    base.update(overrides)
    torch.manual_seed(0)
    moe = MoE(ModelConfig(**base))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    return moe


def _moe_grads(moe, x, grad, retain_graph=False):
    moe.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    y, balance = moe(xi)
    (y * grad).sum().add(balance).backward(retain_graph=retain_graph)
    return [y.detach(), xi.grad] + [p.grad.clone() for p in moe.parameters()]


def test_moe_matches_loop_experts_and_naive_combine_end_to_end():
    moe = _moe()
    x, grad = torch.randn(2, 11, 16), torch.randn(2, 11, 16)
    got = _moe_grads(moe, x, grad)
    dispatcher = moe.dispatcher
    experts_forward, combine = moe.experts.forward, dispatcher.combine
    moe.experts.forward = lambda rows, counts: _loop_experts(moe.experts, rows, counts)
    dispatcher.combine = lambda e, w, h: _naive_combine(e, w, h[0], h[1], h[2])
    try:
        want = _moe_grads(moe, x, grad)
    finally:
        moe.experts.forward, dispatcher.combine = experts_forward, combine
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_gradient_buffer_reuse_is_safe_with_retain_graph_and_repeated_backward():
    # The combine's backward hands GroupedExperts a private buffer that it overwrites in place;
    # backpropagating the same graph twice must give the same gradients twice.
    moe = _moe()
    x, grad = torch.randn(2, 11, 16), torch.randn(2, 11, 16)
    moe.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    y, _ = moe(xi)
    (y * grad).sum().backward(retain_graph=True)
    first = [xi.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    (y * grad).sum().backward()
    second = [xi.grad] + [p.grad for p in moe.parameters()]
    for a, b in zip(first, second):
        torch.testing.assert_close(b, 2 * a, rtol=1e-5, atol=1e-6)


def test_expert_output_used_twice_gets_summed_gradient():
    experts = _experts()
    counts = [3, 0, 7, 1, 0, 4]
    x = torch.randn(sum(counts), 12)
    dispatcher_like = torch.arange(sum(counts)) % 5
    weights = torch.rand(sum(counts), 1)

    def twice(xi, expert_fn):
        out = expert_fn(xi)
        y1 = torch.zeros(5, 12).index_add(0, dispatcher_like, out * weights)
        return y1 + out[:5]

    grad = torch.randn(5, 12)
    got = _grads(lambda xi: twice(xi, lambda r: experts(r, counts)), experts, x, grad)
    want = _grads(lambda xi: twice(xi, lambda r: _loop_experts(experts, r, counts)), experts, x, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_autocast_bf16_runs_matmuls_in_bf16_and_keeps_fp32_weight_grads():
    moe = _moe(n_expert_groups=1, n_limited_groups=1)
    x = torch.randn(2, 11, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        rows = torch.randn(20, 16)
        counts = [5, 0, 3, 2, 4, 0, 6, 0]
        out = moe.experts(rows, counts)
        want = _loop_experts(moe.experts, rows, counts)
        assert out.dtype == torch.bfloat16 == want.dtype
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
        y, balance = moe(x)
    (y.float().square().sum() + balance).backward()
    assert moe.experts.w13.grad.dtype == torch.float32 and moe.experts.w13.grad.abs().sum() > 0
