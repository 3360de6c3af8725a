"""Multi-Token Prediction module (DeepSeek-V3 section 2.2, eqs. 21-23).

h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], then one transformer block; the shared
output head (after this module's own final norm) predicts t_{i+k+1}. The concatenation puts the
embedding first, as Hugging Face's and vLLM's DeepSeek-V3 checkpoints store ``eh_proj``; the
paper writes [h; Emb], which is the same map with M_k's columns permuted.
"""
from __future__ import annotations

import torch
from torch import nn

from dsv3_train.config import ModelConfig
from dsv3_train.model.layers import RMSNorm, make_linear


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)  # on Emb(t_{i+k})
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)  # on h^{k-1}_i
        self.eh_proj = make_linear(2 * cfg.dim, cfg.dim)  # M_k
        self.block = block
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # before the shared head

    def forward(self, h_prev: torch.Tensor, next_embeddings: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor):
        """h_prev, next_embeddings (B, T', D) -> (h^k (B, T', D) before its norm, balance loss)."""
        return self.block(self.merge(h_prev, next_embeddings), cos, sin)

    def merge(self, h_prev: torch.Tensor, next_embeddings: torch.Tensor) -> torch.Tensor:
        """M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)] (eq. 21): (B, T', D) each -> (B, T', D)."""
        return self.eh_proj(torch.cat([self.enorm(next_embeddings), self.hnorm(h_prev)], dim=-1))
