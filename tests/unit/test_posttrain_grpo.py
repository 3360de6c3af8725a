"""GRPO end to end on a tiny MoE: rollout log-probs equal the training forward's (ratio 1 on
policy), routing replay, the update's gradient against a hand-written objective, dynamic sampling,
the shuffled-advantage control, and a short run with every logged metric; rejection sampling and
distillation on top."""
import math
import random

import pytest
import torch

from dsv3_train.config import ModelConfig
from dsv3_train.model import Transformer
from dsv3_train.model.moe import routers
from dsv3_train.posttrain.config import GRPOConfig, OptimConfig, SampleConfig, SFTConfig
from dsv3_train.posttrain.distill import dense_student, distill
from dsv3_train.posttrain.grpo import collect_rollouts, grpo_update, make_reference, policy_batch, train_grpo
from dsv3_train.posttrain.modeling import count_parameters, forward_logits, token_logprobs
from dsv3_train.posttrain.rejection import keep_verified, rejection_sample
from dsv3_train.posttrain.rewards import RewardPool, RewardSpec
from dsv3_train.posttrain.rollout import evaluate, sample_rollouts
from dsv3_train.posttrain.routing import record_routing, replay_routing
from dsv3_train.posttrain.tasks import addition_problems
from dsv3_train.posttrain.tokenizer import CharTokenizer

TOK = CharTokenizer()
ROWS = [{"prompt": "12+34=", "answer": "46"}, {"prompt": "5+5=", "answer": "10"},
        {"prompt": "100+1=", "answer": "101"}]


def tiny_moe(seed: int = 0, **overrides) -> Transformer:
    fields = dict(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_dense_layers=1, n_heads=2, inter_dim=64,
                  moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2, n_expert_groups=2,
                  n_limited_groups=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                  max_seq_len=64, mtp_depth=0, init_std=0.1, balance_loss_alpha=0.0)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**fields, **overrides}))


def _rollouts(model, n=4, max_new_tokens=12, seed=0, record=True):
    return sample_rollouts(model, ROWS, TOK, n, max_new_tokens, temperature=1.0,
                           generator=torch.Generator().manual_seed(seed), record=record)


# ----------------------------------------------------------------------------- rollouts and replay
def test_rollout_logprobs_equal_the_training_forward_so_the_first_ratio_is_one():
    model = tiny_moe()
    rollouts = _rollouts(model)
    batch = policy_batch(rollouts, [0.0] * len(rollouts), [True] * len(rollouts), TOK.pad_id, replay=True)
    with torch.no_grad(), replay_routing(model, batch.routing):
        logprobs = token_logprobs(forward_logits(model, batch.inputs)[0], batch.targets)
    torch.testing.assert_close(logprobs[batch.mask], batch.old_logprobs[batch.mask], atol=1e-5, rtol=0)
    assert int(batch.mask.sum()) == sum(len(r.completion) for r in rollouts)


def _choices_of_full_forward(model, tokens):
    with torch.no_grad(), record_routing(model) as record:
        model(torch.tensor([tokens]))
    return {name: calls[0][0] for name, calls in record.calls.items()}  # (L, K)


def test_recorded_routing_is_each_tokens_routing_in_training_order():
    model = tiny_moe()
    for rollout in _rollouts(model, n=2):  # ragged prompts: left padding must be undone
        tokens = (rollout.prompt + rollout.completion)[:-1]
        full = _choices_of_full_forward(model, tokens)
        for name, choices in rollout.routing.items():
            assert choices.shape == (len(tokens), 2)
            assert torch.equal(choices.sort(-1).values, full[name].sort(-1).values)


def test_replay_forces_the_rollout_experts_after_the_router_changed():
    model = tiny_moe()
    rollouts = _rollouts(model)
    batch = policy_batch(rollouts, [0.0] * len(rollouts), [True] * len(rollouts), TOK.pad_id, replay=True)
    with torch.no_grad():
        for _, router in routers(model):
            router.weight.normal_(0, 1.0)  # the policy moved: its own choices differ now
    for replay, should_match in ((True, True), (False, False)):
        with torch.no_grad(), record_routing(model) as record, replay_routing(model, batch.routing if replay else None):
            forward_logits(model, batch.inputs)
        used = {name: calls[0].flatten(0, 1) for name, calls in record.calls.items()}
        assert all(torch.equal(used[n], batch.routing[n]) for n in used) == should_match
    assert all(router.forced_indices is None for _, router in routers(model))


# ----------------------------------------------------------------------------- the update
def _hand_loss(model, reference, rollouts, advantages, eps_low, eps_high, beta, mode, max_length):
    """The objective written out per sequence and token, from single-sequence forwards."""
    per_sequence, n_tokens = [], sum(len(r.completion) for r in rollouts)
    for rollout, advantage in zip(rollouts, advantages):
        tokens = torch.tensor([rollout.prompt + rollout.completion])
        start = len(rollout.prompt) - 1
        targets = tokens[0, start + 1:]
        logp = model(tokens[:, :-1])[0, start:].log_softmax(-1).gather(1, targets[:, None])[:, 0]
        with torch.no_grad():
            ref = reference(tokens[:, :-1])[0, start:].log_softmax(-1).gather(1, targets[:, None])[:, 0]
        terms = []
        for t in range(len(targets)):
            ratio = torch.exp(logp[t] - rollout.logprobs[t])
            surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - eps_low, 1 + eps_high) * advantage)
            kl = torch.exp(ref[t] - logp[t]) - (ref[t] - logp[t]) - 1
            terms.append(-(surrogate - beta * kl))
        per_sequence.append(torch.stack(terms))
    if mode == "seq-mean-token-mean":
        return sum(s.mean() for s in per_sequence) / len(rollouts)
    if mode == "token-mean":
        return sum(s.sum() for s in per_sequence) / n_tokens
    return sum(s.sum() for s in per_sequence) / (len(rollouts) * max_length)


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_update_gradient_equals_the_hand_written_objective(mode):
    model, reference = tiny_moe(), tiny_moe(seed=1)
    rollouts = _rollouts(model, n=3, max_new_tokens=10)
    with torch.no_grad():  # move the policy off the behaviour policy, so ratios are not all 1
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    advantages = [random.Random(i).uniform(-1.5, 1.5) for i in range(len(rollouts))]
    cfg = GRPOConfig(loss_aggregation=mode, beta=0.05, eps_low=0.1, eps_high=0.15, max_new_tokens=10,
                     micro_batch_size=4, routing_replay=False, optim=OptimConfig(grad_clip=0))
    expected = _hand_loss(model, reference, rollouts, advantages, 0.1, 0.15, 0.05, mode, 10)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)
    before = [p.detach().clone() for p in model.parameters()]
    grpo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), rollouts, advantages, [True] * len(rollouts),
                cfg, TOK.pad_id, reference=reference)
    for old, p, g in zip(before, model.parameters(), expected_grads):
        torch.testing.assert_close(old - p.detach(), g if g is not None else torch.zeros_like(p), atol=2e-6, rtol=1e-4)


def test_inner_updates_compare_against_the_rollout_logprobs():
    model = tiny_moe()
    rollouts = _rollouts(model)
    advantages = [1.0 if i % 2 else -1.0 for i in range(len(rollouts))]
    cfg = GRPOConfig(inner_updates=3, micro_batch_size=64, eps_low=0.01, eps_high=0.01)
    stats = grpo_update(model, torch.optim.SGD(model.parameters(), lr=3.0), rollouts, advantages,
                        [True] * len(rollouts), cfg, TOK.pad_id)
    assert stats["clip_frac"] > 0  # later inner updates moved away from pi_old and hit the clip
    assert stats["ratio"] != pytest.approx(1.0, abs=1e-6)


def test_beta_zero_loads_no_reference():
    model = tiny_moe()
    assert make_reference(model, 0.0) is None
    reference = make_reference(model, 0.1)
    assert reference is not model and not any(p.requires_grad for p in reference.parameters())


# ----------------------------------------------------------------------------- sampling rounds
def odd_length_reward(prompts, completions, **_):
    return [float(len(c) % 2) for c in completions]


def test_dynamic_sampling_keeps_only_groups_with_different_rewards():
    model = tiny_moe()
    cfg = GRPOConfig(group_size=2, max_new_tokens=6, dynamic_sampling=True, max_sampling_rounds=4,
                     routing_replay=False)
    rows = iter([ROWS * 2] * 4)
    with RewardPool([RewardSpec(f"{__name__}:odd_length_reward")], workers=0) as pool:
        step = collect_rollouts(model, lambda: next(rows), TOK, pool, cfg, torch.Generator().manual_seed(0),
                                random.Random(0))
    assert 0 < len(step.rollouts) <= 2 * 6 and step.sampled > 6  # it needed a second round
    for g in range(0, len(step.rollouts), 2):
        parities = {len(r.text) % 2 for r in step.rollouts[g:g + 2]}
        assert parities == {0, 1}


def test_shuffled_advantages_are_a_permutation():
    model = tiny_moe()
    with RewardPool([RewardSpec(f"{__name__}:odd_length_reward")], workers=0) as pool:
        def collect(shuffle):
            cfg = GRPOConfig(group_size=4, max_new_tokens=8, shuffle_advantages=shuffle, routing_replay=False)
            return collect_rollouts(model, lambda: ROWS, TOK, pool, cfg, torch.Generator().manual_seed(0),
                                    random.Random(1)).advantages
        plain, shuffled = collect(False), collect(True)
    assert sorted(plain) == pytest.approx(sorted(shuffled)) and plain != shuffled


# ----------------------------------------------------------------------------- whole runs
def test_train_grpo_logs_every_metric_and_evaluates():
    model = tiny_moe()
    rows = addition_problems("train", 16, seed=0, digits=2)
    cfg = GRPOConfig(steps=2, prompts_per_step=2, group_size=3, max_new_tokens=12, beta=0.01, eval_every=2,
                     reward_workers=0, routing_replay=True)
    history = train_grpo(model, rows, TOK, cfg, evaluate_fn=lambda m: evaluate(m, rows[:4], TOK, "accuracy", 12))
    assert [h["step"] for h in history] == [0, 1, 2]
    for key in ("reward", "reward/accuracy", "reward/format", "kl", "clip_frac", "response_length",
                "load_max_mean", "groups_kept"):
        assert key in history[0], key
    assert "eval/accuracy" in history[0] and "eval/accuracy" in history[2] and "eval/accuracy" not in history[1]


def test_keep_verified_filters_and_dedupes():
    samples = [{"prompt": "a", "completion": "x", "correct": True, "formatted": True, "answer": "1"},
               {"prompt": "a", "completion": "x", "correct": True, "formatted": True, "answer": "1"},
               {"prompt": "a", "completion": "y", "correct": True, "formatted": False, "answer": "1"},
               {"prompt": "a", "completion": "z", "correct": False, "formatted": True, "answer": "1"},
               {"prompt": "b", "completion": "x", "correct": True, "formatted": True, "answer": "2"}]
    assert keep_verified(samples) == [{"prompt": "a", "completion": "x", "answer": "1"},
                                      {"prompt": "b", "completion": "x", "answer": "2"}]


def test_rejection_sampling_and_distillation_run_on_a_tiny_teacher():
    teacher = tiny_moe()
    rows = addition_problems("train", 8, seed=0, digits=2)
    sample_cfg = SampleConfig(n_samples=2, max_new_tokens=8)
    kept, stats = rejection_sample(teacher, rows, TOK, sample_cfg, "accuracy", reward_workers=0)
    assert stats["sampled"] == 16 and stats["kept"] == len(kept) <= stats["correct"]
    student_cfg = dense_student(tiny_moe().cfg)
    assert student_cfg.n_dense_layers == student_cfg.n_layers
    student, report = distill(teacher, student_cfg, rows, TOK, sample_cfg, SFTConfig(steps=1, batch_size=4,
                              micro_batch_size=4), "accuracy")
    assert report["student_params"] == count_parameters(student)[0]
    assert report["size_ratio"] == pytest.approx(report["teacher_params"] / report["student_params"])
    assert math.isfinite(report["teacher_sample_accuracy"])
