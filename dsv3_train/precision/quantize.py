"""Block-wise E4M3 quantisation in plain torch (DeepSeek-V3 section 3.3.2), the reference for the
Triton kernels and the quantiser of the emulated FP8 GEMMs.

For a group G of elements (a 1 x tile slice of a row, or a block x block square of a weight):
    scale_G = max_{g in G} |x_g| / 448          (online max-abs scaling; 1 for an all-zero group)
    q_g     = E4M3(clamp(x_g / scale_G, -448, 448))      round to nearest even, saturating
    x_g    ~= q_g * scale_G                              (dequantisation)
A trailing partial tile or block is its own group, as if zero-padded (zeros never raise a max).
With ``power_of_two`` the scale is rounded up to a power of two, so dequantisation is exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn value (1.75 * 2^8)."""


def e4m3_scales(amax: torch.Tensor, power_of_two: bool = False) -> torch.Tensor:
    """Dequantisation scales amax / 448 (fp32), 1 where amax is 0; optionally rounded up to 2^k."""
    amax = amax.float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    if power_of_two:
        # Round a positive fp32 up to a power of two on its bits: carry any mantissa into the exponent.
        bits = scale.view(torch.int32)
        scale = ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return scale


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast to float8_e4m3fn: |x| > 448 becomes +-448, never NaN."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def round_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """fp32 v -> the fp32 value of to_e4m3(v) (nearest even, saturating), without fp8 tensors.

    Normal range (|v| >= 2^-6): Veltkamp's split c = v (2^20 + 1), c - (c - v) rounds v to
    24 - 20 = 4 significant bits, E4M3's 1 + 3. Subnormal range: multiples of 2^-9, rounded by the
    fp32 adder ((v + 1.5 * 2^14) - 1.5 * 2^14; the ulp there is 2^-9). Equal to the cast on every
    E4M3 midpoint (tested); about 2x faster on CPU, whose fp8 -> fp32 conversion is slow.
    """
    v = v.clamp(-E4M3_MAX, E4M3_MAX)
    split = v * 1048577.0
    normal = split.sub_(split - v)
    subnormal = (v + 24576.0).sub_(24576.0)
    return torch.where(v.abs() < 0.015625, subnormal, normal)


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    pad = (-x.shape[dim]) % multiple
    if pad == 0:
        return x
    widths = [0, 0] * (x.dim() - dim % x.dim() - 1) + [0, pad]
    return F.pad(x, widths)


def quantize_tiles(x: torch.Tensor, tile: int = 128, power_of_two: bool = False):
    """1 x tile groups along the last dim: x (..., K) -> (q (..., K) e4m3, scales (..., ceil(K/tile)) fp32)."""
    k = x.shape[-1]
    tiles = _pad_to(x.float(), -1, tile).unflatten(-1, (-1, tile))  # (..., K/tile, tile)
    scales = e4m3_scales(tiles.abs().amax(-1), power_of_two)  # (..., K/tile)
    q = to_e4m3(tiles / scales.unsqueeze(-1)).flatten(-2)[..., :k]
    return q, scales


def dequantize_tiles(q: torch.Tensor, scales: torch.Tensor, tile: int = 128) -> torch.Tensor:
    """Inverse of quantize_tiles, in fp32: q (..., K), scales (..., ceil(K/tile)) -> (..., K)."""
    k = q.shape[-1]
    per_element = scales.repeat_interleave(tile, dim=-1)[..., :k]
    return q.float() * per_element


def quantize_blocks(w: torch.Tensor, block: int = 128, power_of_two: bool = False):
    """block x block groups over the last two dims: w (..., N, K) -> (q e4m3, scales (..., ceil(N/b), ceil(K/b)))."""
    n, k = w.shape[-2:]
    padded = _pad_to(_pad_to(w.float(), -1, block), -2, block)
    blocks = padded.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))  # (..., N/b, b, K/b, b)
    scales = e4m3_scales(blocks.abs().amax(dim=(-3, -1)), power_of_two)  # (..., N/b, K/b)
    q = to_e4m3(blocks / scales[..., :, None, :, None]).flatten(-4, -3).flatten(-2)
    return q[..., :n, :k], scales


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Inverse of quantize_blocks, in fp32: q (..., N, K), scales (..., N/b, K/b) -> (..., N, K)."""
    n, k = q.shape[-2:]
    per_element = scales.repeat_interleave(block, dim=-2)[..., :n, :]
    per_element = per_element.repeat_interleave(block, dim=-1)[..., :k]
    return q.float() * per_element


def fake_quantize_tiles(x: torch.Tensor, tile: int = 128, power_of_two: bool = False) -> torch.Tensor:
    """dequantize_tiles(*quantize_tiles(x)) in one pass over the tiles (what the emulated GEMMs use)."""
    k = x.shape[-1]
    tiles = _pad_to(x.float(), -1, tile).unflatten(-1, (-1, tile))  # (..., K/tile, tile)
    scales = e4m3_scales(tiles.abs().amax(-1, keepdim=True), power_of_two)
    return (round_to_e4m3(tiles / scales) * scales).flatten(-2)[..., :k]


def fake_quantize_blocks(w: torch.Tensor, block: int = 128, power_of_two: bool = False) -> torch.Tensor:
    """dequantize_blocks(*quantize_blocks(w)) in one pass over the blocks."""
    n, k = w.shape[-2:]
    padded = _pad_to(_pad_to(w.float(), -1, block), -2, block)
    blocks = padded.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))  # (..., N/b, b, K/b, b)
    scales = e4m3_scales(blocks.abs().amax(dim=(-3, -1), keepdim=True), power_of_two)
    return (round_to_e4m3(blocks / scales) * scales).flatten(-4, -3).flatten(-2)[..., :n, :k]
