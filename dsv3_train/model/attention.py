"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, V3 eqs. 1-11).

Queries:  c_Q = RMSNorm(W_DQ x) (when q_lora_rank is set), q = W_UQ c_Q -> [q_nope; q_rope] per head.
Keys/values: W_DKV x -> [c_KV; k_rope]; c_KV is normed and up-projected by W_UKV to per-head
[k_nope; v]; k_rope is one rotary key shared by all heads. Only c_KV and k_rope need caching.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_train.config import ModelConfig
from dsv3_train.model.layers import RMSNorm, make_linear
from dsv3_train.model.rope import apply_rope, softmax_scale


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.wq = make_linear(cfg.dim, cfg.n_heads * qk_dim)
        else:
            self.wq_a = make_linear(cfg.dim, cfg.q_lora_rank)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = make_linear(cfg.q_lora_rank, cfg.n_heads * qk_dim)
        self.wkv_a = make_linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = make_linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.wo = make_linear(cfg.n_heads * cfg.v_head_dim, cfg.dim)
        self.softmax_scale = softmax_scale(cfg)

    def project_query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, D) -> q_nope (B, T, H, nope), roped q_rope (B, T, H, rope)."""
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.unflatten(-1, (self.n_heads, -1))  # (B, T, H, nope + rope)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def compress_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, D) -> normed latent c_KV (B, T, kv_lora_rank), roped shared key (B, T, rope)."""
        kv_latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2)
        return self.kv_norm(kv_latent), k_rope

    def expand_kv(self, c_kv: torch.Tensor):
        """c_KV (B, S, kv_lora_rank) -> k_nope (B, S, H, nope), v (B, S, H, v_dim)."""
        kv = self.wkv_b(c_kv).unflatten(-1, (self.n_heads, -1))
        return kv.split([self.nope_dim, self.v_dim], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over x (B, T, D); cos/sin are the tables for positions 0..T-1."""
        q_nope, q_rope = self.project_query(x, cos, sin)
        c_kv, k_rope = self.compress_kv(x, cos, sin)
        k_nope, v = self.expand_kv(c_kv)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, nope + rope)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, scale=self.softmax_scale,
        )  # (B, H, T, v_dim)
        return self.wo(out.transpose(1, 2).flatten(2))
