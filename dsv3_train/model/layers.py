"""Building blocks shared by attention, MoE and MTP: RMSNorm, the linear maker, SwiGLU.

``make_linear`` is the precision factory's (dsv3_train.precision): every projection is made there.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_train.precision import PrecisionConfig, make_linear

__all__ = ["RMSNorm", "SwiGLU", "make_linear"]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, computed in fp32 and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    """Gated FFN: w2(silu(w1 x) * w3 x); used by dense blocks and shared experts."""

    def __init__(self, dim: int, hidden: int, precision: Optional[PrecisionConfig] = None):
        super().__init__()
        self.w1 = make_linear(dim, hidden, precision=precision)  # gate
        self.w3 = make_linear(dim, hidden, precision=precision)  # up
        self.w2 = make_linear(hidden, dim, precision=precision)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
