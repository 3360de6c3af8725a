"""Per-step schedules: learning rate, bias-update speed gamma, MTP weight lambda."""
from __future__ import annotations

import math

from dsv3_train.config import TrainConfig


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to lr, constant until decay_start_frac, cosine down to lr * min_lr_ratio."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    decay_start = max(warmup, int(cfg.decay_start_frac * cfg.steps))
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / max(1, cfg.steps - 1 - decay_start))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def bias_update_speed(cfg: TrainConfig, step: int) -> float:
    """gamma: bias_update_speed until bias_update_stop_frac of the steps, 0 after (V3)."""
    return cfg.bias_update_speed if step < cfg.bias_update_stop_frac * cfg.steps else 0.0


def mtp_weight(cfg: TrainConfig, step: int) -> float:
    """lambda: mtp_weight early, mtp_weight_late after mtp_weight_switch_frac of the steps (V3)."""
    return cfg.mtp_weight if step < cfg.mtp_weight_switch_frac * cfg.steps else cfg.mtp_weight_late
