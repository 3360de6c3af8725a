"""DeepSeekMoE routing, grouped experts, balance loss and bias balancing, against hand computations."""
import torch
import torch.nn.functional as F

from dsv3_train.config import ModelConfig
from dsv3_train.model.moe import MoE, Router, select_experts, sequence_balance_loss, update_expert_biases


def _moe_cfg(**overrides):
    base = dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                n_expert_groups=4, n_limited_groups=2, route_scale=2.5, balance_loss_alpha=1e-2)
    base.update(overrides)
    return ModelConfig(**base)


def test_group_limited_routing_on_hand_built_affinities():
    # 8 experts in 4 groups of 2. Group scores (sum of top-2): g0=1.0, g1=1.5, g2=0.95, g3=1.1.
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.0, 0.95, 0.55, 0.55]])
    chosen = select_experts(scores, torch.zeros(8), n_groups=4, n_kept_groups=2, top_k=2)
    # Kept groups: g1 (experts 2, 3) and g3 (6, 7). Expert 5 (0.95) and 0 (0.9) are in dropped
    # groups, so the choice is 2 (0.8) and 3 (0.7), not the global top-2 {5, 0}.
    assert sorted(chosen[0].tolist()) == [2, 3]
    ungrouped = select_experts(scores, torch.zeros(8), n_groups=1, n_kept_groups=1, top_k=2)
    assert sorted(ungrouped[0].tolist()) == [0, 5]


def test_group_score_sums_top_two_not_max():
    # g0 has the single best expert (0.99) but a weak second; g1 has two good ones.
    scores = torch.tensor([[0.99, 0.0, 0.6, 0.6]])
    chosen = select_experts(scores, torch.zeros(4), n_groups=2, n_kept_groups=1, top_k=1)
    assert chosen.tolist() == [[2]] or chosen.tolist() == [[3]]


def test_gate_weights_come_from_unbiased_scores():
    cfg = _moe_cfg(n_expert_groups=1, n_limited_groups=1)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, 0, 1.0)
    x = torch.randn(1, 5, cfg.dim)
    scores = torch.sigmoid(x.flatten(0, 1) @ router.weight.T)  # (5, 8)
    router.expert_bias[:] = torch.tensor([0, 0, 0, 0, 0, 0, 10.0, 10.0])  # force experts 6, 7
    routing = router(x)
    assert all(sorted(row) == [6, 7] for row in routing.indices.tolist())
    chosen = scores[:, [6, 7]]
    expected = chosen / chosen.sum(-1, keepdim=True) * 2.5
    got = torch.stack([routing.weights[i][routing.indices[i].argsort()] for i in range(5)])
    torch.testing.assert_close(got, expected)


def test_routed_experts_equal_per_token_loop():
    cfg = _moe_cfg()
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    x = torch.randn(3, 7, cfg.dim)
    y, _ = moe(x)
    routing = moe.router(x)
    expected = torch.zeros(21, cfg.dim)
    flat = x.flatten(0, 1)
    for t in range(21):
        sh = moe.shared
        expected[t] = sh.w2.weight @ (F.silu(sh.w1.weight @ flat[t]) * (sh.w3.weight @ flat[t]))
        for e, w in zip(routing.indices[t].tolist(), routing.weights[t].tolist()):
            gate_up = moe.experts.w13[e] @ flat[t]
            h = F.silu(gate_up[: cfg.moe_inter_dim]) * gate_up[cfg.moe_inter_dim:]
            expected[t] += w * (moe.experts.w2[e] @ h)
    torch.testing.assert_close(y.flatten(0, 1), expected, rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_experts_router_and_input_and_idle_experts_get_zero():
    cfg = _moe_cfg(n_expert_groups=1, n_limited_groups=1)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    moe.router.expert_bias[:] = torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0])  # only experts 0, 1 used
    x = torch.randn(2, 4, cfg.dim, requires_grad=True)
    y, balance = moe(x)
    (y.square().sum() + balance).backward()
    assert x.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0
    assert moe.experts.w13.grad[:2].abs().sum() > 0
    assert moe.experts.w13.grad[2:].abs().sum() == 0


def test_sequence_balance_loss_matches_formula():
    batch, seq, n_experts, top_k, alpha = 2, 5, 4, 2, 0.1
    scores = torch.rand(batch, seq, n_experts)
    indices = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(batch * seq)]).view(batch, seq, top_k)
    expected = 0.0
    for b in range(batch):
        for i in range(n_experts):
            f_i = n_experts / (top_k * seq) * sum(int(i in indices[b, t].tolist()) for t in range(seq))
            p_i = sum((scores[b, t, i] / scores[b, t].sum()).item() for t in range(seq)) / seq
            expected += f_i * p_i
    expected = alpha * expected / batch
    assert abs(sequence_balance_loss(scores, indices, alpha).item() - expected) < 1e-6


def test_expert_load_counted_in_training_only():
    cfg = _moe_cfg()
    moe = MoE(cfg)
    x = torch.randn(2, 6, cfg.dim)
    moe.eval()
    moe(x)
    assert moe.router.expert_load.sum() == 0
    moe.train()
    moe(x)
    assert moe.router.expert_load.sum() == 2 * 6 * cfg.n_activated_experts


def test_bias_update_drives_skewed_router_toward_balance():
    cfg = _moe_cfg(n_expert_groups=1, n_limited_groups=1, n_routed_experts=8, n_activated_experts=2)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.router.weight, 0, 0.2)
    moe.router.weight.data[0] += 1.0  # experts 0 and 1 favoured for inputs with positive mean
    moe.router.weight.data[1] += 1.0
    x = torch.randn(4, 64, cfg.dim) + 0.5

    def max_over_mean():
        moe.router.expert_load.zero_()
        moe(x)
        load = moe.router.expert_load.clone()
        return (load.max() / load.mean()).item()

    before = max_over_mean()
    for _ in range(200):
        moe(x)
        update_expert_biases(moe, speed=0.01)
    after = max_over_mean()
    assert before > 2.5  # deliberately skewed
    assert after < before / 2, (before, after)
    # Gradients never touch the bias: it is a buffer, not a parameter.
    assert "router.expert_bias" not in dict(moe.named_parameters())
    assert "router.expert_bias" in moe.state_dict()


def test_bias_update_uses_sign_of_mean_minus_load():
    cfg = _moe_cfg(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1)
    moe = MoE(cfg)
    moe.router.expert_load[:] = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5
    summed = []
    update_expert_biases(moe, 0.001, reduce_load=lambda load: (summed.append(1), load.mul_(2)))
    torch.testing.assert_close(moe.router.expert_bias, torch.tensor([-0.001, 0.001, 0.001, 0.001]))
    assert summed == [1] and moe.router.expert_load.sum() == 0
