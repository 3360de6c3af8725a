"""The DeepSeek-V3-style decoder: embedding, blocks (first k dense, rest MoE), norm, head, MTP."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_train.config import ModelConfig
from dsv3_train.model.attention import MultiHeadLatentAttention
from dsv3_train.model.layers import RMSNorm, SwiGLU
from dsv3_train.model.moe import MoE, GroupedExperts, Router
from dsv3_train.model.mtp import MTPModule
from dsv3_train.model.rope import rope_tables
from dsv3_train.precision import PrecisionConfig, TEModule, building_with

IGNORE_INDEX = -100


class Block(nn.Module):
    """Pre-norm block: x + MLA(norm(x)), then + FFN(norm(x)) with a dense or MoE FFN."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MultiHeadLatentAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if moe else SwiGLU(cfg.dim, cfg.inter_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, D) -> (x (B, T, D), balance loss of this block)."""
        return self.feed_forward(x + self.attn(self.attn_norm(x), cos, sin))

    def feed_forward(self, x: torch.Tensor):
        """The FFN half: x (B, T, D) -> (x + FFN(norm(x)), balance loss); decoding reuses it."""
        if isinstance(self.ffn, MoE):
            y, balance = self.ffn(self.ffn_norm(x))
        else:
            y, balance = self.ffn(self.ffn_norm(x)), x.new_zeros((), dtype=torch.float32)
        return x + y, balance


@dataclass
class LossTerms:
    total: torch.Tensor
    main: torch.Tensor
    mtp: list[torch.Tensor] = field(default_factory=list)
    balance: torch.Tensor | None = None


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, L) -> (B, L) index of the packed document each token belongs to (EOS ends its doc)."""
    is_eos = (tokens == eos_id).long()
    return is_eos.cumsum(1) - is_eos


def shifted_targets(tokens: torch.Tensor, offset: int, eos_id: int | None) -> torch.Tensor:
    """Targets t_{i+offset} for inputs i in [0, L-offset) of tokens (B, L) -> (B, L-offset).

    Positions whose target lies in another packed document than the input get IGNORE_INDEX.
    """
    targets = tokens[:, offset:].clone()
    if eos_id is not None:
        docs = document_ids(tokens, eos_id)
        targets[docs[:, :-offset] != docs[:, offset:]] = IGNORE_INDEX
    return targets


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, precision: Optional[PrecisionConfig] = None):
        """``precision`` picks the recipe of every projection and expert (default fp32, i.e. the
        ambient dtype); embedding, head, router and norms stay out of it, as in DeepSeek-V3."""
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        with building_with(precision):  # reaches the factory linears and experts only
            self.layers = nn.ModuleList(Block(cfg, moe=i >= cfg.n_dense_layers) for i in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
            self.mtp = nn.ModuleList(MTPModule(cfg, Block(cfg, moe=cfg.n_layers >= cfg.n_dense_layers))
                                     for _ in range(cfg.mtp_depth))
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix, ones for norm gains, zero router biases."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.w13, 0.0, std)
                nn.init.normal_(module.w2, 0.0, std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, 0.0, std)
                module.expert_bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, TEModule):
                module.reset_weights(std)

    def rope(self, seq_len: int, start: int = 0):
        return self.rope_cos[start:start + seq_len], self.rope_sin[start:start + seq_len]

    def forward_hidden(self, input_ids: torch.Tensor):
        """input_ids (B, T) -> (hidden before the final norm (B, T, D), summed balance loss)."""
        h = self.embed(input_ids)
        cos, sin = self.rope(input_ids.shape[1])
        balance = h.new_zeros((), dtype=torch.float32)
        for block in self.layers:
            h, block_balance = block(h, cos, sin)
            balance = balance + block_balance
        return h, balance

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> next-token logits (B, T, V)."""
        h, _ = self.forward_hidden(input_ids)
        return self.head(self.norm(h))

    def loss(self, tokens: torch.Tensor, mtp_weight: float, eos_id: int | None = None) -> LossTerms:
        """Training loss on a packed window tokens (B, T+1): L_main + (lambda/D) sum_k L_MTP^k + L_bal.

        Main: inputs t_0..t_{T-1} predict t_1..t_T. MTP depth k at position i < T-k combines
        h^{k-1}_i with Emb(t_{i+k}) and predicts t_{i+k+1} (V3 eqs. 21-25).
        """
        seq_len = tokens.shape[1] - 1
        inputs = tokens[:, :seq_len]
        h, balance = self.forward_hidden(inputs)
        main = _cross_entropy(self.head(self.norm(h)), shifted_targets(tokens, 1, eos_id))
        mtp_losses = []
        for k, module in enumerate(self.mtp, start=1):
            cos, sin = self.rope(seq_len - k)
            h, mtp_balance = module(h[:, : seq_len - k], self.embed(tokens[:, k:seq_len]), cos, sin)
            balance = balance + mtp_balance
            targets = shifted_targets(tokens, k + 1, eos_id)  # (B, T-k)
            mtp_losses.append(_cross_entropy(self.head(module.norm(h)), targets))
        total = main + balance
        if mtp_losses:
            total = total + mtp_weight / len(mtp_losses) * torch.stack(mtp_losses).sum()
        return LossTerms(total, main, mtp_losses, balance)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32 over non-ignored targets; logits (B, T, V)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
