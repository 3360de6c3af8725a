"""DeepSeekMoE (V3 section 2.1.2): shared experts + fine-grained routed experts.

Router (eqs. 15-17 and 'auxiliary-loss-free load balancing'):
  s_i   = sigmoid(u . e_i)                      affinities, fp32
  pick  = top-k of (s_i + b_i) within the kept groups (group score = sum of its top-2 s_i + b_i)
  g_i   = s_i / sum_{j in pick} s_j * route_scale   gates from the *unbiased* affinities
  b_i  += gamma * sign(mean load - load_i)      after each optimizer step (update_expert_biases)
Sequence-wise balance loss (eqs. 17-20): L_bal = alpha * sum_i f_i P_i per sequence.

Routed experts run grouped: token copies are sorted by expert by a *token dispatcher* (local by
default; the expert-parallel all-to-all one lives in ``parallel/``), each expert multiplies one
contiguous slice, and the dispatcher scatters the weighted results back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_train.config import ModelConfig
from dsv3_train.model.layers import SwiGLU


@dataclass
class Routing:
    indices: torch.Tensor  # (N, K) chosen experts
    weights: torch.Tensor  # (N, K) fp32 gates
    balance_loss: torch.Tensor  # scalar


def select_experts(scores: torch.Tensor, bias: torch.Tensor, n_groups: int, n_kept_groups: int,
                   top_k: int) -> torch.Tensor:
    """Group-limited top-k on biased affinities: scores (N, E), bias (E,) -> indices (N, K)."""
    biased = scores + bias  # (N, E)
    if n_groups > 1:
        n_tokens, n_experts = biased.shape
        grouped = biased.view(n_tokens, n_groups, n_experts // n_groups)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
        kept = group_scores.topk(n_kept_groups, dim=-1).indices  # (N, G_kept)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        expert_mask = group_mask.repeat_interleave(n_experts // n_groups, dim=1)  # (N, E)
        biased = biased.masked_fill(~expert_mask, float("-inf"))
    return biased.topk(top_k, dim=-1).indices


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * mean over sequences of sum_i f_i P_i; scores (B, T, E), indices (B, T, K)."""
    batch, seq_len, n_experts = scores.shape
    top_k = indices.shape[-1]
    counts = torch.zeros(batch, n_experts, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, indices.view(batch, -1), torch.ones_like(indices.view(batch, -1), dtype=scores.dtype))
    f = counts * n_experts / (top_k * seq_len)  # (B, E), no gradient
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E)
    return alpha * (f * p).sum(-1).mean()


class Router(nn.Module):
    """Sigmoid gate with a balancing bias used for selection only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.route_scale = cfg.n_activated_experts, cfg.route_scale
        self.n_groups, self.n_kept_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.norm_topk_prob, self.alpha = cfg.norm_topk_prob, cfg.balance_loss_alpha
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # Not a gradient parameter: moved by update_expert_biases, saved with the model.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        # Token copies routed to each expert since the last bias update.
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> Routing:
        """x (B, T, D) -> routing of the B*T tokens."""
        with torch.autocast(device_type=x.device.type, enabled=False):  # gating stays fp32
            scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # (B, T, E)
        flat_scores = scores.flatten(0, 1)  # (N, E)
        indices = select_experts(flat_scores.detach(), self.expert_bias, self.n_groups,
                                 self.n_kept_groups, self.top_k)  # (N, K)
        weights = flat_scores.gather(1, indices)  # (N, K), unbiased
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale
        if self.training:
            with torch.no_grad():
                self.expert_load += torch.bincount(indices.flatten(), minlength=self.expert_load.numel())
        if self.alpha > 0:
            balance = sequence_balance_loss(scores, indices.view(*scores.shape[:2], -1), self.alpha)
        else:
            balance = scores.new_zeros(())
        return Routing(indices, weights, balance)


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights; input rows arrive sorted by expert."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.n_experts, self.hidden = n_experts, hidden
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))  # [gate; up] per expert
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))  # down per expert

    def forward(self, x: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """x (M, D) grouped by expert, tokens_per_expert (E,) summing to M -> (M, D)."""
        outputs = []
        for expert, rows in enumerate(x.split(tokens_per_expert)):
            if rows.shape[0] == 0:
                continue
            gate, up = F.linear(rows, self.w13[expert]).chunk(2, dim=-1)  # (m, H) each
            outputs.append(F.linear(F.silu(gate) * up, self.w2[expert]))  # (m, D)
        return torch.cat(outputs) if outputs else x.new_zeros(0, x.shape[-1])


class LocalDispatcher:
    """Single-process token dispatcher.

    dispatch: 1. flatten the (N, K) choices; 2. stable-sort token copies by expert;
              3. gather the rows in that order and count rows per expert.
    combine:  4. weight each expert output by its gate; 5. scatter-add back to its token.
    """

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor):
        """x (N, D), indices (N, K) -> rows sorted by expert (N*K, D), rows per expert, handle."""
        flat = indices.flatten()  # (N*K,)
        order = flat.argsort(stable=True)
        token_of_row = order // indices.shape[1]
        tokens_per_expert = torch.bincount(flat, minlength=self.n_experts).tolist()
        return x[token_of_row], tokens_per_expert, (order, token_of_row, x.shape[0])

    def combine(self, expert_out: torch.Tensor, weights: torch.Tensor, handle) -> torch.Tensor:
        """expert_out (N*K, D) in dispatch order, weights (N, K) -> (N, D)."""
        order, token_of_row, n_tokens = handle
        gates = weights.flatten()[order].unsqueeze(-1).to(expert_out.dtype)  # (N*K, 1)
        out = expert_out.new_zeros(n_tokens, expert_out.shape[-1])
        return out.index_add_(0, token_of_row, expert_out * gates)


class MoE(nn.Module):
    """Shared experts on every token plus the routed experts chosen by the router."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.shared = SwiGLU(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        self.dispatcher = LocalDispatcher(cfg.n_routed_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (y (B, T, D), sequence-wise balance loss)."""
        routing = self.router(x)
        flat = x.flatten(0, 1)  # (N, D)
        expert_in, tokens_per_expert, handle = self.dispatcher.dispatch(flat, routing.indices)
        expert_out = self.experts(expert_in, tokens_per_expert)
        y = self.dispatcher.combine(expert_out, routing.weights, handle)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view_as(x), routing.balance_loss


def routers(model: nn.Module) -> Iterator[tuple[str, Router]]:
    """Every router in the model, with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, Router):
            yield name, module


@torch.no_grad()
def update_expert_biases(model: nn.Module, speed: float,
                         reduce_load: Optional[Callable[[torch.Tensor], None]] = None) -> dict[str, torch.Tensor]:
    """After an optimizer step: b_i += speed * sign(mean load - load_i), then reset the counts.

    ``reduce_load`` sums a load vector in place over all data-parallel ranks, so every rank sees
    the global batch's load and the biases stay identical. Returns the loads used, by router name.
    """
    loads = {}
    for name, router in routers(model):
        load = router.expert_load
        if reduce_load is not None:
            reduce_load(load)
        if speed > 0:
            router.expert_bias += speed * torch.sign(load.mean() - load)
        loads[name] = load.clone()
        load.zero_()
    return loads
