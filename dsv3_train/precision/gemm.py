"""The three GEMMs of a linear y = x W^T, per precision recipe, and the autograd function using them.

    forward  y  = x  W^T   contraction over K (in_features)
    dgrad    dx = dy W     contraction over N (out_features)
    wgrad    dW = dy^T x   contraction over M (tokens)

``PlainGemms`` runs them in one dtype (the ambient one, as nn.Linear does, or bf16).
``BlockwiseFp8Gemms`` emulates DeepSeek-V3's FP8 recipe (section 3.3): each GEMM operand is
rounded to E4M3 with one scale per group along that GEMM's contraction dim -- 1 x 128 tiles for
activations and output gradients (so 128 x 1 tiles, along tokens, in wgrad), 128 x 128 blocks
for weights (the same blocks serve W and W^T) -- then multiplied in fp32. Multiplying the
dequantised tiles equals the recipe's sum over K-groups of (q_x . q_w) * s_x * s_w, promoted to
fp32 every 128 elements of K, up to fp32 rounding (no emulation of the tensor cores' ~14-bit
internal accumulation, which V3's promotion exists to bound).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from dsv3_train.precision.config import PrecisionConfig
from dsv3_train.precision.deferral import accumulate_grad
from dsv3_train.precision.quantize import (dequantize_blocks, dequantize_tiles, fake_quantize_blocks,
                                           fake_quantize_tiles)


def ambient_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype around x's device, or None when autocast is off."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


class PlainGemms:
    """All three GEMMs in ``dtype``; None means the ambient dtype, as nn.Linear (fp32 or autocast)."""

    def __init__(self, dtype: Optional[torch.dtype] = None):
        self.dtype = dtype

    def forward(self, x2d: torch.Tensor, weight: torch.Tensor, ambient: Optional[torch.dtype]):
        """x2d (M, K), weight (N, K) -> (y (M, N), tensors backward needs)."""
        dtype = self.dtype or ambient or x2d.dtype
        x_c, w_c = x2d.to(dtype), weight.to(dtype)
        return torch.mm(x_c, w_c.t()), (x_c, w_c)

    def input_grad(self, grad2d: torch.Tensor, saved) -> torch.Tensor:
        _, w_c = saved
        return torch.mm(grad2d.to(w_c.dtype), w_c)  # (M, K)

    def weight_grad(self, grad2d: torch.Tensor, saved) -> torch.Tensor:
        x_c, _ = saved
        return torch.mm(grad2d.to(x_c.dtype).t(), x_c)  # (N, K), as autograd's mm backward does


class BlockwiseFp8Gemms:
    """E4M3 operands with fine-grained scales, fp32 products (see the module docstring)."""

    def __init__(self, tile: int = 128, block: int = 128, power_of_two: bool = False):
        self.tile, self.block, self.power_of_two = tile, block, power_of_two

    # -- operand rounding (quantise, then dequantise to fp32) -------------------------------------
    def rows(self, t: torch.Tensor, parts: int = 1) -> torch.Tensor:
        """1 x tile groups along the last dim (split first into ``parts`` separately tiled parts)."""
        if parts > 1:
            return self.rows(t.unflatten(-1, (parts, -1))).flatten(-2)
        if t.is_cuda and _triton_kernels() is not None:
            q, scales = _triton_kernels().quantize_tiles(t, self.tile, self.power_of_two)
            return dequantize_tiles(q, scales, self.tile)
        return fake_quantize_tiles(t, self.tile, self.power_of_two)

    def blocks(self, w: torch.Tensor, parts: int = 1) -> torch.Tensor:
        """block x block groups over the last two dims (dim -2 split first into ``parts``)."""
        if parts > 1:
            return self.blocks(w.unflatten(-2, (parts, -1))).flatten(-3, -2)
        if w.is_cuda and _triton_kernels() is not None:
            q, scales = _triton_kernels().quantize_blocks(w, self.block, self.power_of_two)
            return dequantize_blocks(q, scales, self.block)
        return fake_quantize_blocks(w, self.block, self.power_of_two)

    def wgrad(self, grad_rows: torch.Tensor, inputs: torch.Tensor, out: Optional[torch.Tensor] = None):
        """grad_rows^T inputs with both operands tiled along the token dim: (M, N), (M, K) -> (N, K)."""
        return torch.mm(self.rows(grad_rows.t()), self.rows(inputs.t()).t(), out=out)

    # -- the linear's three GEMMs -----------------------------------------------------------------
    def forward(self, x2d: torch.Tensor, weight: torch.Tensor, ambient: Optional[torch.dtype]):
        w_op = self.blocks(weight)
        y = torch.mm(self.rows(x2d), w_op.t())
        return y, (x2d, w_op)  # E4M3-valued weight kept for dgrad, original x for wgrad's 128x1 tiles

    def input_grad(self, grad2d: torch.Tensor, saved) -> torch.Tensor:
        return torch.mm(self.rows(grad2d), saved[1])

    def weight_grad(self, grad2d: torch.Tensor, saved) -> torch.Tensor:
        x2d = saved[0]
        return self.wgrad(grad2d, x2d)


def _triton_kernels():
    """The Triton quantisers (used for CUDA tensors) when Triton is installed, else None."""
    from dsv3_train.precision import triton_kernels

    return triton_kernels if triton_kernels.available() else None


def _autocast_off(t: torch.Tensor, active: bool):
    """Switch autocast off for t's device when it is on (entering a context costs microseconds)."""
    return torch.autocast(device_type=t.device.type, enabled=False) if active else contextlib.nullcontext()


def gemms_for(precision: PrecisionConfig):
    if precision.fp8:
        return BlockwiseFp8Gemms(precision.tile, precision.block, precision.power_of_two_scales)
    return PlainGemms(torch.bfloat16 if precision.linear == "bf16" else None)


class LinearFunction(torch.autograd.Function):
    """y = x W^T (+ b) through ``owner.gemms``; the weight gradient is queued in
    ``owner.weight_grad_sink`` instead of computed when that is set."""

    @staticmethod
    def forward(ctx, x, weight, bias, owner, ambient):
        x2d = x.reshape(-1, x.shape[-1])
        with _autocast_off(x, ambient is not None):
            y, saved = owner.gemms.forward(x2d, weight, ambient)
            out_dtype = ambient or x.dtype  # what nn.Linear would return
            y = y.to(out_dtype)
            if bias is not None:
                y = y + bias.to(out_dtype)
        ctx.owner, ctx.x_shape, ctx.x_dtype = owner, x.shape, x.dtype
        ctx.save_for_backward(*saved)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        saved, gemms, owner = ctx.saved_tensors, ctx.owner.gemms, ctx.owner
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        with _autocast_off(grad, torch.is_autocast_enabled(grad.device.type)):
            if need_x:
                grad_x = gemms.input_grad(grad2d, saved).to(ctx.x_dtype).view(ctx.x_shape)
            if need_b:
                grad_b = grad2d.sum(0).to(owner.bias.dtype)
            if need_w:
                sink = owner.weight_grad_sink
                if sink is None:
                    grad_w = gemms.weight_grad(grad2d, saved).to(owner.weight.dtype)
                else:
                    weight = owner.weight
                    sink.add(lambda: accumulate_grad(weight, gemms.weight_grad(grad2d, saved)))
        return grad_x, grad_w, grad_b, None, None
