"""The GRPO objective against hand computations: advantages, ratio clipping, the k3 KL estimator
and each loss aggregation (GRPO, DAPO token-mean, Dr. GRPO constant normaliser)."""
import math

import pytest
import torch

from dsv3_train.posttrain.grpo import advantages_with_missing
from dsv3_train.posttrain.objective import (aggregate, aggregation_weights, clipped_surrogate, group_advantages,
                                            k3_kl, policy_loss)


# ----------------------------------------------------------------------------- advantages
def test_advantages_are_reward_minus_group_mean_over_sample_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 6.0]])
    # group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3); group 1: mean 3, sample std sqrt((3 * 1 + 9) / 3) = 2
    s0 = math.sqrt(1 / 3)
    expected = torch.tensor([[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], [-0.5, -0.5, -0.5, 1.5]])
    torch.testing.assert_close(group_advantages(rewards, scale_std=True, eps=0.0), expected)


def test_advantages_without_std_scaling_are_centred_rewards():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 6.0]])
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [-1.0, -1.0, -1.0, 3.0]])
    torch.testing.assert_close(group_advantages(rewards, scale_std=False), expected)


def test_a_group_of_equal_rewards_has_zero_advantages():
    assert group_advantages(torch.tensor([[0.7, 0.7, 0.7]])).abs().max() == 0


def test_unscored_samples_are_left_out_of_their_group_and_degenerate_groups_flagged():
    totals = [1.0, None, 0.0, 1.0,   0.5, 0.5, 0.5, 0.5,   None, None, None, 2.0]
    advantages, scored, informative = advantages_with_missing(totals, 4, scale_std=False)
    mean = 2 / 3  # of the three scored rewards of group 0
    assert advantages[:4] == pytest.approx([1 - mean, 0.0, -mean, 1 - mean])
    assert advantages[4:] == [0.0] * 8
    assert scored == [True, False, True, True] + [True] * 4 + [False, False, False, True]
    assert informative == [True, False, False]  # all equal; only one scored


# ----------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("ratio, advantage, expected, clipped", [
    (1.5, 1.0, 1.2, True),     # positive advantage, ratio above 1 + eps_high: capped
    (0.5, 1.0, 0.5, False),    # positive advantage, ratio below: the unclipped term is smaller
    (0.5, -1.0, -0.8, True),   # negative advantage, ratio below 1 - eps_low: capped at (1 - eps) A
    (1.5, -1.0, -1.5, False),  # negative advantage, ratio above: unclipped (pessimistic) term
    (1.1, 2.0, 2.2, False),    # inside the trust region
])
def test_clipped_surrogate_is_the_pessimistic_bound(ratio, advantage, expected, clipped):
    logp, old = torch.tensor([math.log(ratio)]), torch.tensor([0.0])
    value, was_clipped = clipped_surrogate(logp, old, torch.tensor([advantage]), eps_low=0.2, eps_high=0.2)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert was_clipped.item() == clipped


def test_clip_higher_uses_separate_low_and_high_bounds():
    logp, old = torch.log(torch.tensor([1.25, 0.75])), torch.zeros(2)
    value, clipped = clipped_surrogate(logp, old, torch.tensor([1.0, -1.0]), eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(value, torch.tensor([1.25, -0.8]))  # 1.25 < 1.28 kept; 0.75 < 0.8 capped
    assert clipped.tolist() == [False, True]


def test_clipped_tokens_get_no_gradient():
    logp = torch.log(torch.tensor([1.5, 1.1])).requires_grad_()
    value, _ = clipped_surrogate(logp, torch.zeros(2), torch.tensor([1.0, 1.0]), 0.2, 0.2)
    value.sum().backward()
    assert logp.grad[0] == 0  # capped at 1.2
    assert logp.grad[1] == pytest.approx(1.1)  # d(rho A)/d logp = rho A


# ----------------------------------------------------------------------------- k3 KL
def test_k3_hand_value_and_zero_at_equality():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)])
    # d = log(0.25 / 0.5): exp(d) - d - 1 = 0.5 + log 2 - 1
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([0.5 + math.log(2) - 1, 0.0]))


def test_k3_is_never_negative():
    gen = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(1000, generator=gen) * 3, torch.randn(1000, generator=gen) * 3
    assert (k3_kl(logp, ref) >= 0).all()


def test_k3_averaged_under_the_policy_is_the_exact_kl():
    policy = torch.tensor([0.5, 0.3, 0.2])
    reference = torch.tensor([0.2, 0.2, 0.6])
    kl = (policy * (policy / reference).log()).sum()
    expectation = (policy * k3_kl(policy.log(), reference.log())).sum()
    torch.testing.assert_close(expectation, kl)


# ----------------------------------------------------------------------------- aggregation
VALUES = torch.tensor([[2.0, 9.0, 9.0], [1.0, 1.0, 1.0]])
MASK = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)  # lengths 1 and 3


@pytest.mark.parametrize("mode, expected", [
    ("seq-mean-token-mean", (2 / 1 + 3 / 3) / 2),  # mean over tokens, then over sequences
    ("token-mean", (2 + 3) / 4),                  # every token weighs the same
    ("seq-mean-token-sum-norm", (2 + 3) / (2 * 5)),  # token sums over G * L_max (L_max = 5)
])
def test_each_loss_aggregation_matches_its_formula(mode, expected):
    assert aggregate(VALUES, MASK, mode, max_length=5).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_shares_with_global_counts_sum_to_the_batch_loss(mode):
    values = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[:, 0] = True
    whole = aggregate(values, mask, mode, max_length=5)
    n_seq, n_tok = 6, float(mask.sum())
    parts = sum((values[i:i + 2] * aggregation_weights(mask[i:i + 2], mode, n_seq, n_tok, 5)).sum()
                for i in range(0, 6, 2))
    torch.testing.assert_close(parts, whole)


def test_unknown_aggregation_names_the_choices():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(VALUES, MASK, "sum")


# ----------------------------------------------------------------------------- the loss
def test_policy_loss_is_minus_surrogate_plus_beta_k3_aggregated():
    logp = torch.log(torch.tensor([[0.5, 0.4], [0.9, 0.1]]))
    old = torch.log(torch.tensor([[0.25, 0.4], [0.6, 0.2]]))
    ref = torch.log(torch.tensor([[0.5, 0.2], [0.9, 0.3]]))
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    beta, eps = 0.1, 0.2
    # hand: ratios 2.0, 1.0 | 1.5, (0.5 masked)
    surrogate = [[1.2 * 1.0, 1.0 * 1.0], [min(1.5 * -2.0, 1.2 * -2.0), 0.0]]
    k3 = [[0.0, 0.5 + math.log(2) - 1], [0.0, 0.0]]
    per_token = [[-surrogate[i][j] + beta * k3[i][j] for j in range(2)] for i in range(2)]
    expected = ((per_token[0][0] + per_token[0][1]) / 2 + per_token[1][0] / 1) / 2  # seq-mean-token-mean
    weights = aggregation_weights(mask, "seq-mean-token-mean", 2, 3)
    result = policy_loss(logp, old, advantages, weights, eps, eps, beta, ref)
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)
    assert result.clipped_tokens == 1  # only the ratio-2 token with positive advantage
    assert result.kl_sum == pytest.approx(0.5 + math.log(2) - 1, rel=1e-6)


def test_beta_without_a_reference_is_an_error():
    ones = torch.ones(1, 1)
    with pytest.raises(ValueError, match="reference"):
        policy_loss(ones, ones, torch.ones(1), ones, 0.2, 0.2, beta=0.1)
