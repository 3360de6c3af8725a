"""Rejection sampling (DeepSeek-R1 stage 3): N samples per prompt from a policy, keep those that
are verified correct *and* well formatted, drop duplicates, write an SFT JSONL.

``sample_completions`` is shared with distillation: it labels every sample with its accuracy and
format scores, and ``keep_verified`` filters and deduplicates.
"""
from __future__ import annotations

from typing import Sequence

import torch

from dsv3_train.model import Transformer
from dsv3_train.posttrain.config import SampleConfig
from dsv3_train.posttrain.rewards import RewardPool, RewardSpec
from dsv3_train.posttrain.rollout import reward_columns, sample_rollouts
from dsv3_train.posttrain.tokenizer import CharTokenizer


def sample_completions(model: Transformer, rows: Sequence[dict], tokenizer: CharTokenizer, cfg: SampleConfig,
                       accuracy_reward: str, reward_workers: int = 1, reward_timeout_s: float = 30.0) -> list[dict]:
    """cfg.n_samples completions per row: rows {prompt, completion, correct, formatted, <columns>}."""
    generator = torch.Generator().manual_seed(cfg.seed)
    rollouts = sample_rollouts(model, rows, tokenizer, cfg.n_samples, cfg.max_new_tokens, cfg.temperature,
                               generator=generator, batch_size=cfg.batch_size)
    specs = [RewardSpec(accuracy_reward), RewardSpec("format")]
    with RewardPool(specs, reward_workers, reward_timeout_s) as pool:
        scores = pool([r.row["prompt"] for r in rollouts], [r.text for r in rollouts],
                      reward_columns([r.row for r in rollouts]))
    labelled = []
    for i, rollout in enumerate(rollouts):
        correct, formatted = scores.by_name[accuracy_reward][i], scores.by_name["format"][i]
        labelled.append({**rollout.row, "completion": rollout.text, "correct": bool(correct == 1.0),
                         "formatted": bool(formatted == 1.0)})
    return labelled


def without_labels(sample: dict) -> dict:
    """A labelled sample as an SFT row: its columns less "correct" and "formatted"."""
    return {k: v for k, v in sample.items() if k not in ("correct", "formatted")}


def keep_verified(samples: Sequence[dict]) -> list[dict]:
    """Correct and well-formatted samples, first occurrence of each (prompt, completion) pair."""
    seen, kept = set(), []
    for sample in samples:
        key = (sample["prompt"], sample["completion"])
        if sample["correct"] and sample["formatted"] and key not in seen:
            seen.add(key)
            kept.append(without_labels(sample))
    return kept


def rejection_sample(model: Transformer, rows: Sequence[dict], tokenizer: CharTokenizer, cfg: SampleConfig,
                     accuracy_reward: str, reward_workers: int = 1) -> tuple[list[dict], dict]:
    """(SFT rows, statistics) from cfg.n_samples samples of each prompt."""
    samples = sample_completions(model, rows, tokenizer, cfg, accuracy_reward, reward_workers)
    kept = keep_verified(samples)
    stats = {"sampled": len(samples), "correct": sum(s["correct"] for s in samples),
             "formatted": sum(s["formatted"] for s in samples), "kept": len(kept),
             "prompts_covered": len({row["prompt"] for row in kept}), "prompts": len(rows)}
    return kept, stats
