"""Rotary embedding on the decoupled rope dims, with YaRN context extension.

DeepSeek rotates *interleaved* pairs (dims 2i, 2i+1) as complex numbers; we keep that layout.
YaRN (Peng et al. 2023, as used by DeepSeek-V2/V3):
  - frequencies whose wavelength completes more than ``beta_fast`` rotations within the original
    context are kept, those with fewer than ``beta_slow`` are divided by the factor s, with a
    linear ramp in between;
  - the rotary cos/sin are multiplied by mscale(s, mscale) / mscale(s, mscale_all_dim) and the
    softmax scale by mscale(s, mscale_all_dim)^2, where mscale(s, c) = 0.1 c ln s + 1.
"""
from __future__ import annotations

import math

import torch

from dsv3_train.config import ModelConfig


def yarn_mscale(scale: float, coeff: float = 1.0) -> float:
    """mscale = 0.1 * coeff * ln(s) + 1 (1 when s <= 1)."""
    return 1.0 if scale <= 1.0 else 0.1 * coeff * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    # The dim index at which a frequency makes num_rotations full turns over max_pos positions.
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(cfg: ModelConfig) -> tuple[int, int]:
    """(low, high) pair-indices between which YaRN ramps from extrapolation to interpolation."""
    dim, base, orig = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.original_seq_len
    low = math.floor(_correction_dim(cfg.beta_fast, dim, base, orig))
    high = math.ceil(_correction_dim(cfg.beta_slow, dim, base, orig))
    return max(low, 0), min(high, dim - 1)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Angular frequency of each rotated pair, (rope_dim/2,), YaRN-corrected when rope_factor > 1."""
    dim = cfg.qk_rope_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if cfg.rope_factor > 1.0:
        low, high = yarn_correction_range(cfg)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        # ramp = 0 for fast (high-frequency) pairs: keep; ramp = 1 for slow pairs: divide by s.
        freqs = freqs / cfg.rope_factor * ramp + freqs * (1 - ramp)
    return freqs.float()


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_seq_len, rope_dim/2), including the YaRN cos/sin mscale."""
    freqs = rope_frequencies(cfg).double()
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), freqs)
    attn_factor = yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    return (angles.cos() * attn_factor).float(), (angles.sin() * attn_factor).float()


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times mscale(s, mscale_all_dim)^2 under YaRN."""
    return cfg.qk_head_dim ** -0.5 * yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, H, R) by position tables cos/sin (T, R/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, R/2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, R/2)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
