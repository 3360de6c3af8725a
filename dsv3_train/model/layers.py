"""Building blocks shared by attention, MoE and MTP: RMSNorm, the linear maker, SwiGLU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_linear(in_features: int, out_features: int) -> nn.Linear:
    """Every projection of the model is made here (bias-free, as in DeepSeek-V3).

    The precision layer (fp32 / bf16 / fp8) plugs in at this single point.
    """
    return nn.Linear(in_features, out_features, bias=False)


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

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = make_linear(dim, hidden)  # gate
        self.w3 = make_linear(dim, hidden)  # up
        self.w2 = make_linear(hidden, dim)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
