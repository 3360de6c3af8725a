"""GRPO: sample a group per prompt, score it, and push up the better-than-average samples.

One step (``grpo_step``):
  1. take prompts_per_step prompts (this rank: its slice) and sample G completions of each with
     the KV-cache decoder, recording the behaviour log-probs (and the MoE routing for replay);
  2. score them with the reward pool; group-relative advantages per prompt (objective.py);
     with dynamic sampling, drop groups whose rewards are all equal and sample more prompts;
  3. mu inner updates: each is one optimizer step over the whole rollout batch (micro-batched),
     ratios against the rollout's log-probs, optional k3 KL to the frozen reference;
  4. metrics: reward, accuracy, format rate, KL, clip fraction, response length, expert load.

Losses are computed with batch-global normalisers (objective.aggregation_weights), so
micro-batches and data-parallel ranks sum to the full-batch loss exactly. As in SFT, the MoE
sequence-wise balance loss is not added (it would count padding); expert load is logged, and the
auxiliary-loss-free biases move when bias_update_speed > 0.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from dsv3_train.model import Transformer
from dsv3_train.model.transformer import IGNORE_INDEX
from dsv3_train.posttrain.config import GRPOConfig
from dsv3_train.posttrain.data import ShuffledEpochs
from dsv3_train.posttrain.modeling import expert_load_imbalance, forward_logits, token_logprobs
from dsv3_train.posttrain.objective import aggregation_weights, group_advantages, policy_loss
from dsv3_train.posttrain.replicas import SingleProcess
from dsv3_train.posttrain.rewards import RewardPool, RewardScores
from dsv3_train.posttrain.rollout import Rollout, reward_columns, sample_rollouts
from dsv3_train.posttrain.routing import batch_routing, replay_routing
from dsv3_train.posttrain.tokenizer import CharTokenizer
from dsv3_train import schedule
from dsv3_train.trainer import build_optimizer


# ----------------------------------------------------------------------------- advantages
def advantages_with_missing(totals: Sequence[Optional[float]], group_size: int, scale_std: bool
                            ) -> tuple[list[float], list[bool], list[bool]]:
    """Per-sample advantages from the total rewards of consecutive groups of group_size.

    Samples without a reward (None) are left out of their group's statistics and of the loss.
    Returns (advantages, scored per sample, informative per group); a group is informative when
    at least two of its samples are scored and their rewards are not all equal."""
    advantages, scored, informative = [], [], []
    for start in range(0, len(totals), group_size):
        group = totals[start:start + group_size]
        valid = [r for r in group if r is not None]
        useful = len(valid) >= 2 and max(valid) > min(valid)
        values = group_advantages(torch.tensor([valid], dtype=torch.float64), scale_std)[0].tolist() if useful else []
        it = iter(values)
        advantages += [next(it) if (useful and r is not None) else 0.0 for r in group]
        scored += [r is not None for r in group]
        informative.append(useful)
    return advantages, scored, informative


# ----------------------------------------------------------------------------- the update
@dataclass
class PolicyBatch:
    """A micro-batch of rollouts as tensors for the training forward."""

    inputs: torch.Tensor  # (B, L) prompt + completion[:-1], right-padded
    targets: torch.Tensor  # (B, L) next tokens, IGNORE_INDEX off the completion
    old_logprobs: torch.Tensor  # (B, L) behaviour log-probs on the completion, 0 elsewhere
    advantages: torch.Tensor  # (B,)
    mask: torch.Tensor  # (B, L) completion tokens of scored samples
    routing: Optional[dict]  # per router (B * L, K) for replay, or None


def policy_batch(rollouts: Sequence[Rollout], advantages: Sequence[float], scored: Sequence[bool],
                 pad_id: int, replay: bool) -> PolicyBatch:
    length = max(len(r.prompt) + len(r.completion) - 1 for r in rollouts)
    shape = (len(rollouts), length)
    inputs = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    old = torch.zeros(shape)
    for row, r in enumerate(rollouts):
        tokens, first = r.prompt + r.completion, len(r.prompt) - 1  # first = position predicting completion[0]
        inputs[row, :len(tokens) - 1] = torch.tensor(tokens[:-1])
        targets[row, first:len(tokens) - 1] = torch.tensor(r.completion)
        old[row, first:len(tokens) - 1] = torch.tensor(r.logprobs)
    mask = (targets != IGNORE_INDEX) & torch.tensor(list(scored))[:, None]
    routing = batch_routing([r.routing for r in rollouts], length) if replay and rollouts[0].routing else None
    return PolicyBatch(inputs, targets, old, torch.tensor(list(advantages), dtype=torch.float32), mask, routing)


def reference_logprobs(reference: Transformer, batch: PolicyBatch) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = forward_logits(reference, batch.inputs)
        return token_logprobs(logits, batch.targets)


def grpo_update(policy: Transformer, optimizer: torch.optim.Optimizer, rollouts: Sequence[Rollout],
                advantages: Sequence[float], scored: Sequence[bool], cfg: GRPOConfig, pad_id: int,
                runtime=SingleProcess(), reference: Optional[Transformer] = None) -> dict:
    """cfg.inner_updates optimizer steps on this rank's rollouts; returns global statistics."""
    size = cfg.micro_batch_size
    batches = [policy_batch(rollouts[i:i + size], advantages[i:i + size], scored[i:i + size], pad_id,
                            cfg.routing_replay) for i in range(0, len(rollouts), size)]
    n_sequences, n_tokens = runtime.sum([sum(scored), sum(float(b.mask.sum()) for b in batches)])
    if n_tokens == 0:  # nothing scored anywhere (e.g. every reward timed out): no step on any rank
        return {"sequences": 0}
    refs = [reference_logprobs(reference, b) for b in batches] if cfg.beta > 0 else [None] * len(batches)
    policy.train()
    sums = torch.zeros(4, dtype=torch.float64)  # clipped tokens, KL to the reference, ratio, KL to pi_old
    for _ in range(cfg.inner_updates):
        for batch, ref in zip(batches, refs):
            with replay_routing(policy, batch.routing):
                logits, _ = forward_logits(policy, batch.inputs)  # no balance loss: see the module docstring
            weights = aggregation_weights(batch.mask, cfg.loss_aggregation, n_sequences, n_tokens, cfg.max_new_tokens)
            terms = policy_loss(token_logprobs(logits, batch.targets), batch.old_logprobs, batch.advantages, weights,
                                cfg.eps_low, cfg.eps_high, cfg.beta, ref)
            terms.loss.backward()
            sums += torch.tensor([terms.clipped_tokens, terms.kl_sum, terms.ratio_sum, terms.behaviour_kl_sum],
                                 dtype=torch.float64)
        runtime.sum_gradients(policy)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    clipped, kl, ratio, behaviour_kl = (value / (n_tokens * cfg.inner_updates) for value in runtime.sum(sums.tolist()))
    stats = {"clip_frac": clipped, "ratio": ratio, "behaviour_kl": behaviour_kl, "sequences": int(n_sequences)}
    if cfg.beta > 0:
        stats["kl"] = kl
    return stats


# ----------------------------------------------------------------------------- one step
@dataclass
class StepRollouts:
    rollouts: list[Rollout]
    advantages: list[float]
    scored: list[bool]
    sampled: int  # groups sampled over all rounds
    scores: list[RewardScores]


def collect_rollouts(policy: Transformer, next_prompts: Callable[[], list[dict]], tokenizer: CharTokenizer,
                     pool: RewardPool, cfg: GRPOConfig, generator: torch.Generator,
                     rng: random.Random) -> StepRollouts:
    """Sample and score groups for this rank (refilling with new prompts under dynamic sampling)."""
    kept, sampled, all_scores = [], 0, []
    target = None
    for _ in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        rows = next_prompts()
        target = len(rows) if target is None else target
        rollouts = sample_rollouts(policy, rows, tokenizer, cfg.group_size, cfg.max_new_tokens, cfg.temperature,
                                   cfg.top_p, generator, record=cfg.routing_replay)
        scores = pool([r.row["prompt"] for r in rollouts], [r.text for r in rollouts],
                      reward_columns([r.row for r in rollouts]))
        advantages, scored, informative = advantages_with_missing(scores.total, cfg.group_size, cfg.scale_std)
        sampled, all_scores = sampled + len(rows), all_scores + [scores]
        for g, useful in enumerate(informative):
            if useful or not cfg.dynamic_sampling:
                span = range(g * cfg.group_size, (g + 1) * cfg.group_size)
                kept.append(([rollouts[i] for i in span], [advantages[i] for i in span], [scored[i] for i in span]))
        if len(kept) >= target:
            break
    kept = kept[:target]
    flat = StepRollouts([r for g in kept for r in g[0]], [a for g in kept for a in g[1]],
                        [s for g in kept for s in g[2]], sampled, all_scores)
    if cfg.shuffle_advantages:  # the control: same advantage values, assigned at random
        rng.shuffle(flat.advantages)
    return flat


def rollout_metrics(step: StepRollouts, group_size: int, runtime) -> dict:
    """Means over every sample drawn this step, all ranks: total reward, each reward ("reward/<name>"),
    response length of the kept samples, and the share of sampled groups kept."""
    sums: dict[str, list[float]] = {}
    for scores in step.scores:
        for name, values in [("reward", scores.total)] + [(f"reward/{k}", v) for k, v in scores.by_name.items()]:
            scored = [v for v in values if v is not None]
            total, count = sums.get(name, [0.0, 0.0])
            sums[name] = [total + sum(scored), count + len(scored)]
    names = sorted(sums)
    local = [x for name in names for x in sums[name]]
    local += [sum(len(r.completion) for r in step.rollouts), len(step.rollouts), len(step.rollouts) / group_size,
              step.sampled]
    values = runtime.sum(local)
    metrics = {name: values[2 * i] / max(values[2 * i + 1], 1) for i, name in enumerate(names)}
    length_sum, n_rollouts, kept_groups, sampled_groups = values[-4:]
    metrics["response_length"] = length_sum / max(n_rollouts, 1)
    metrics["groups_kept"] = kept_groups / max(sampled_groups, 1)
    return metrics


def make_reference(policy: Transformer, beta: float) -> Optional[Transformer]:
    """A frozen copy of the policy for the KL term; None when beta is 0 (no copy is made)."""
    if beta == 0:
        return None
    reference = copy.deepcopy(policy).eval()
    reference.requires_grad_(False)
    return reference


class PromptStream:
    """Shuffled epochs of the training prompts, identical on every rank; each call hands this rank
    its slice of the next ``per_step`` prompts."""

    def __init__(self, rows: Sequence[dict], per_step: int, seed: int, runtime):
        self.rows, self.per_step, self.runtime = list(rows), per_step, runtime
        self.epochs = ShuffledEpochs(len(self.rows), f"grpo-prompts-{seed}")

    def __call__(self) -> list[dict]:
        return self.runtime.shard([self.rows[i] for i in self.epochs.take(self.per_step)])


def train_grpo(policy: Transformer, train_rows: Sequence[dict], tokenizer: CharTokenizer, cfg: GRPOConfig,
               runtime=SingleProcess(), evaluate_fn: Optional[Callable[[Transformer], dict]] = None,
               log: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """cfg.steps GRPO steps on prompts drawn from train_rows; ``evaluate_fn(policy)`` (e.g. greedy
    held-out accuracy) runs at step 0, every eval_every steps and after the last. Returns the
    metrics of every step ("eval/..." keys where evaluated); ``log`` sees every log_every-th."""
    reference = make_reference(policy, cfg.beta)
    train_cfg = cfg.optim.train_config(cfg.steps)
    optimizer = build_optimizer(policy, train_cfg)
    prompts = PromptStream(train_rows, cfg.prompts_per_step, cfg.seed, runtime)
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + runtime.rank)
    shuffle_rng = random.Random(f"grpo-shuffle-{cfg.seed}-{runtime.rank}")
    history, start = [], time.process_time()
    with RewardPool(cfg.rewards, cfg.reward_workers, cfg.reward_timeout_s) as pool:
        for step in range(cfg.steps + 1):
            metrics = {"step": step}
            evaluate_now = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
            if evaluate_fn is not None and evaluate_now:
                metrics.update({f"eval/{k}": v for k, v in evaluate_fn(policy).items()})
            if step < cfg.steps:
                for group in optimizer.param_groups:
                    group["lr"] = schedule.learning_rate(train_cfg, step)
                collected = collect_rollouts(policy, prompts, tokenizer, pool, cfg, generator, shuffle_rng)
                metrics.update(rollout_metrics(collected, cfg.group_size, runtime))
                metrics.update(grpo_update(policy, optimizer, collected.rollouts, collected.advantages,
                                           collected.scored, cfg, tokenizer.pad_id, runtime, reference))
                imbalance = expert_load_imbalance(policy, cfg.bias_update_speed, runtime)
                if imbalance is not None:
                    metrics["load_max_mean"] = imbalance
            metrics["cpu_s"] = time.process_time() - start
            history.append(metrics)
            evaluated = any(key.startswith("eval/") for key in metrics)
            if log is not None and (step % cfg.log_every == 0 or step == cfg.steps or evaluated):
                log(metrics)
    return history
