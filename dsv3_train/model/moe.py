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

import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_train.config import ConfigError, ModelConfig
from dsv3_train.model.layers import SwiGLU
from dsv3_train.precision import DefersWeightGrad, PrecisionConfig, ambient_dtype, resolve_precision
from dsv3_train.precision.deferral import accumulate_grad
from dsv3_train.precision.gemm import gemms_for


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
        # Routing replay (dsv3_train.posttrain.routing): when set, (N, K) experts to use instead of
        # selecting them; the gates are still computed from this forward's affinities.
        self.forced_indices: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> Routing:
        """x (B, T, D) -> routing of the B*T tokens."""
        with torch.autocast(device_type=x.device.type, enabled=False):  # gating stays fp32
            scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # (B, T, E)
        flat_scores = scores.flatten(0, 1)  # (N, E)
        if self.forced_indices is not None:
            indices = self.forced_indices  # (N, K), replayed
        else:
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


def _chunk_rows(dim: int) -> int:
    """Rows per chunk so that a (rows, dim) fp32 temporary is ~4 MiB: cache-resident and reused by
    malloc, where one (N*K, dim) temporary is a fresh mmap whose page faults cost more than the math."""
    return max(1, (1 << 20) // max(dim, 1))


class _GroupedSwiGLU(torch.autograd.Function):
    """Routed-expert SwiGLU over rows sorted by expert, with a hand-written backward.

    Autograd through per-expert ``w13[e]`` views makes every expert's backward allocate and add a
    full-size (E, 2H, D) gradient; here each expert's matmuls write straight into preallocated
    slices of the output and of the two weight gradients. Each expert's whole chain (matmul,
    gate, matmul) runs back to back on its slice while it is still in cache, and only x, the
    [gate | up] pre-activations and the gated hidden are kept for backward.
    Same matmuls as the per-expert F.linear loop; results agree to fp32 rounding.

    ``fp8`` (a BlockwiseFp8Gemms, or None) rounds every GEMM operand to E4M3 as DeepSeek-V3 does:
    x, h and the output gradients in 1x128 tiles along each GEMM's K (along tokens in wgrad, per
    expert), weights in 128x128 blocks (gate and up as separate matrices, as V3's w1 / w3).
    When ``owner.weight_grad_sink`` is set, the weight-gradient GEMMs are queued there.
    """

    @staticmethod
    def forward(ctx, x, w13, w2, spans, fp8, owner):
        hidden = w2.shape[-1]
        if fp8 is not None:
            x_op, w13_op, w2_op = fp8.rows(x), fp8.blocks(w13, parts=2), fp8.blocks(w2)
        else:
            x_op, w13_op, w2_op = x, w13, w2
        out = x.new_empty(x.shape[0], w2.shape[1])
        gate_ups, hs = [], []  # per expert: small allocations malloc reuses, not one fresh mmap
        for expert, start, end in spans:
            gate_up = torch.mm(x_op[start:end], w13_op[expert].t())  # (m, 2H) = [gate | up]
            h = F.silu(gate_up[:, :hidden]).mul_(gate_up[:, hidden:])  # (m, H)
            torch.mm(h if fp8 is None else fp8.rows(h), w2_op[expert].t(), out=out[start:end])
            gate_ups.append(gate_up)
            hs.append(h)
        ctx.spans, ctx.fp8, ctx.owner = spans, fp8, owner
        ctx.save_for_backward(x, w13_op, w2_op, *gate_ups, *hs)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, w13_op, w2_op, *per_expert = ctx.saved_tensors
        spans, fp8, owner = ctx.spans, ctx.fp8, ctx.owner
        gate_ups, hs = per_expert[:len(spans)], per_expert[len(spans):]
        need_x, need_w13, need_w2 = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous()
        hidden = w2_op.shape[-1]
        sink = owner.weight_grad_sink if owner is not None else None
        deferred = [] if sink is not None and (need_w13 or need_w2) else None
        grad_out_op = grad_out if fp8 is None else fp8.rows(grad_out)  # dgrad operand, tiles along D

        grad_x = None
        if need_x:
            # A gradient that only this function reads (made by LocalDispatcher.combine) is
            # overwritten in place: expert e's rows are consumed before its grad_x rows are written
            # (not when weight gradients are deferred: they read grad_out later).
            private = (getattr(grad_out, "_moe_private", False) and grad_out.shape == x.shape
                       and grad_out.dtype == x.dtype and deferred is None)
            grad_x = grad_out if private else torch.empty_like(x)
        immediate = deferred is None
        grad_w13, grad_w2 = _expert_weight_grads(w13_op, w2_op, spans, need_w13 and immediate,
                                                 need_w2 and immediate)
        for (expert, start, end), gate_up, h in zip(spans, gate_ups, hs):
            grad_rows = grad_out[start:end]
            if need_w2 and immediate:
                _weight_grad(grad_rows, h, fp8, out=grad_w2[expert])
            grad_gate_up = None
            if need_x or need_w13:
                grad_h = torch.mm(grad_out_op[start:end], w2_op[expert])  # (m, H)
                gate, up = gate_up[:, :hidden], gate_up[:, hidden:]
                grad_gate_up = torch.empty_like(gate_up)
                torch.mul(grad_h, F.silu(gate), out=grad_gate_up[:, hidden:])
                torch.ops.aten.silu_backward.grad_input(grad_h.mul_(up), gate,
                                                        grad_input=grad_gate_up[:, :hidden])
                if need_w13 and immediate:
                    _weight_grad(grad_gate_up, x[start:end], fp8, out=grad_w13[expert])
                if need_x:
                    grad_op = grad_gate_up if fp8 is None else fp8.rows(grad_gate_up, parts=2)
                    torch.mm(grad_op, w13_op[expert], out=grad_x[start:end])
            if deferred is not None:
                deferred.append((expert, grad_rows, h, grad_gate_up, x[start:end]))
        if deferred is not None:
            sink.add(functools.partial(_deferred_expert_weight_grads, owner, w13_op, w2_op, spans,
                                       deferred, fp8, need_w13, need_w2))
        return grad_x, grad_w13, grad_w2, None, None, None


def _weight_grad(grad_rows: torch.Tensor, inputs: torch.Tensor, fp8, out: torch.Tensor) -> torch.Tensor:
    """out (N, K) = grad_rows^T inputs over one expert's rows; (m, N), (m, K)."""
    if fp8 is None:
        return torch.mm(grad_rows.t(), inputs, out=out)
    return fp8.wgrad(grad_rows, inputs, out=out)


def _expert_weight_grads(w13: torch.Tensor, w2: torch.Tensor, spans, need_w13: bool, need_w2: bool):
    """Gradient buffers shaped like w13 / w2 (None where not needed); idle experts get exact zeros."""
    some_idle = len(spans) < w13.shape[0]

    def buffer(w, needed):
        return (torch.zeros_like(w) if some_idle else torch.empty_like(w)) if needed else None

    return buffer(w13, need_w13), buffer(w2, need_w2)


def _deferred_expert_weight_grads(owner, w13_op, w2_op, spans, deferred, fp8, need_w13, need_w2):
    """The W step of GroupedExperts: the weight-gradient GEMMs that backward queued."""
    grad_w13, grad_w2 = _expert_weight_grads(w13_op, w2_op, spans, need_w13, need_w2)
    for expert, grad_rows, h, grad_gate_up, x_rows in deferred:
        if need_w2:
            _weight_grad(grad_rows, h, fp8, out=grad_w2[expert])
        if need_w13:
            _weight_grad(grad_gate_up, x_rows, fp8, out=grad_w13[expert])
    if need_w13:
        accumulate_grad(owner.w13, grad_w13)
    if need_w2:
        accumulate_grad(owner.w2, grad_w2)


class _WeightedScatterAdd(torch.autograd.Function):
    """out (n_tokens, D) with out[token_of_row[r]] += gates[r] * rows[r]; chunked, no (M, D) temporaries."""

    @staticmethod
    def forward(ctx, rows, gates, token_of_row, n_tokens):
        out = rows.new_zeros(n_tokens, rows.shape[1])
        step = _chunk_rows(rows.shape[1])
        for start in range(0, rows.shape[0], step):
            end = start + step
            out.index_add_(0, token_of_row[start:end], rows[start:end] * gates[start:end])
        ctx.save_for_backward(rows, gates, token_of_row)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        rows, gates, token_of_row = ctx.saved_tensors
        need_rows, need_gates = ctx.needs_input_grad[:2]
        grad_out = grad_out.contiguous()
        grad_rows = grad_out.new_empty(rows.shape)  # (M, D)
        grad_gates = gates.new_empty(gates.shape) if need_gates else None
        step = _chunk_rows(rows.shape[1])
        for start in range(0, rows.shape[0], step):  # gather, gate gradient, scale: one cached pass
            end = start + step
            chunk = torch.index_select(grad_out, 0, token_of_row[start:end], out=grad_rows[start:end])
            if need_gates:
                torch.sum(chunk * rows[start:end], dim=-1, keepdim=True, out=grad_gates[start:end])
            if need_rows:
                chunk.mul_(gates[start:end])
        if not need_rows:
            return None, grad_gates, None, None
        grad_rows._moe_private = True  # nobody else holds it: GroupedExperts may reuse it
        return grad_rows, grad_gates, None, None


class GroupedExperts(DefersWeightGrad, nn.Module):
    """E SwiGLU experts with stacked weights; input rows arrive sorted by expert.

    ``precision`` (default: the one the model is built with, else fp32) picks the GEMM recipe as
    for every factory linear: the ambient dtype, bf16 or emulated FP8 (fp8_backend=te: see
    make_grouped_experts).
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, precision: Optional[PrecisionConfig] = None):
        super().__init__()
        self.n_experts, self.hidden = n_experts, hidden
        self.precision = resolve_precision(precision)
        if self.precision.uses_te:
            raise ConfigError("GroupedExperts has no Transformer Engine path: build routed experts "
                              "with make_grouped_experts(..., precision) to get TE's GroupedLinear")
        self.fp8_gemms = gemms_for(self.precision) if self.precision.fp8 else None  # BlockwiseFp8Gemms
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))  # [gate; up] per expert
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))  # down per expert

    def forward(self, x: torch.Tensor, tokens_per_expert: list[int] | torch.Tensor) -> torch.Tensor:
        """x (M, D) grouped by expert, tokens_per_expert (E,) summing to M -> (M, D)."""
        if isinstance(tokens_per_expert, torch.Tensor):
            tokens_per_expert = tokens_per_expert.tolist()
        spans, start = [], 0
        for expert, count in enumerate(tokens_per_expert):
            if count:
                spans.append((expert, start, start + count))
            start += count
        w13, w2 = self.w13, self.w2
        ambient = ambient_dtype(x)
        out_dtype = ambient or x.dtype  # what F.linear would return
        if self.fp8_gemms is not None:  # fp32 master weights and activations, E4M3-rounded inside
            x = x.float()
        else:  # as F.linear would: matmuls in the autocast dtype (or bf16 when asked for)
            dtype = torch.bfloat16 if self.precision.linear == "bf16" else ambient
            if dtype is not None:
                x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = _GroupedSwiGLU.apply(x.contiguous(), w13, w2, spans, self.fp8_gemms, self)
        return out.to(out_dtype)


def make_grouped_experts(n_experts: int, dim: int, hidden: int,
                         precision: Optional[PrecisionConfig] = None) -> nn.Module:
    """The routed experts of a MoE layer in the given (or the model's) precision: GroupedExperts,
    or Transformer Engine's GroupedLinear pair for fp8_backend=te."""
    precision = resolve_precision(precision)
    if precision.uses_te:
        from dsv3_train.precision.te import te_grouped_experts

        return te_grouped_experts(n_experts, dim, hidden, precision)
    return GroupedExperts(n_experts, dim, hidden, precision)


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
        # index_select's backward is an index_add_ (advanced indexing's is a slow index_put_)
        return x.index_select(0, token_of_row), tokens_per_expert, (order, token_of_row, x.shape[0])

    def combine(self, expert_out: torch.Tensor, weights: torch.Tensor, handle) -> torch.Tensor:
        """expert_out (N*K, D) in dispatch order, weights (N, K) -> (N, D)."""
        order, token_of_row, n_tokens = handle
        gates = weights.flatten()[order].unsqueeze(-1).to(expert_out.dtype)  # (N*K, 1)
        return _WeightedScatterAdd.apply(expert_out, gates, token_of_row, n_tokens)


class MoE(nn.Module):
    """Shared experts on every token plus the routed experts chosen by the router."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = make_grouped_experts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
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
