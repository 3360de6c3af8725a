"""BF16 AdamW moments (DeepSeek-V3 section 3.3.3: "we adopt the BF16 data format instead of FP32
to track the first and second moments in the AdamW optimizer").

``keep_moments_in_bf16(optimizer)`` stores ``exp_avg`` / ``exp_avg_sq`` in bf16 between steps: a
step pre-hook widens them to fp32, AdamW updates them in fp32, a post-hook rounds them back to
bf16 (round to nearest even). Master weights and gradients stay fp32. Moment memory is halved
while activations are alive; during ``step()`` itself the fp32 copies exist briefly.
"""
from __future__ import annotations

import torch

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _cast_moments(optimizer: torch.optim.Optimizer, dtype: torch.dtype) -> None:
    for state in optimizer.state.values():
        for key in MOMENTS:
            moment = state.get(key)
            if moment is not None and moment.dtype != dtype:
                state[key] = moment.to(dtype)


def keep_moments_in_bf16(optimizer: torch.optim.Optimizer):
    """Make ``optimizer`` (Adam / AdamW) keep its moments in bf16; returns the two hook handles
    (``.remove()`` them to go back to fp32 moments)."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"keep_moments_in_bf16 expects Adam or AdamW, got {type(optimizer).__name__}")
    _cast_moments(optimizer, torch.bfloat16)
    widen = optimizer.register_step_pre_hook(lambda opt, args, kwargs: _cast_moments(opt, torch.float32))
    narrow = optimizer.register_step_post_hook(lambda opt, args, kwargs: _cast_moments(opt, torch.bfloat16))
    return widen, narrow
