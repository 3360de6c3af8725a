"""Triton kernels for block-wise E4M3 quantisation (1 x tile activation tiles, block x block weight
blocks): the CUDA twins of ``quantize.quantize_tiles`` / ``quantize_blocks``, equal to them bit for bit;
and ``fp8_gemm``, the FP8 GEMM with per-K-group scale promotion.

Used for CUDA tensors when Triton is installed; on CPU they run under ``TRITON_INTERPRET=1`` (set
before this module is imported), which is how the tests compare them with the torch reference.
Bit-exactness: scales and scaled values use IEEE round-to-nearest division (``div_rn``), and the
rounding to E4M3 is done on fp32 bits (round to nearest even, saturating at 448) so the final cast
is exact -- the interpreter's own fp32 -> fp8 conversion does not round to nearest even.
"""
from __future__ import annotations

import torch

from dsv3_train.precision.quantize import E4M3

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: pip install triton (CUDA wheels of torch bring it)
    triton = None


def available() -> bool:
    return triton is not None


def require_triton() -> None:
    if triton is None:
        raise ImportError("Triton is not installed: pip install triton (on CUDA it comes with torch)")


if triton is not None:

    @triton.jit
    def _e4m3_scale(amax, POW2: tl.constexpr):
        """amax / 448 (1 for an all-zero group), optionally rounded up to a power of two."""
        scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
        if POW2:
            bits = scale.to(tl.int32, bitcast=True)
            scale = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
        return scale

    @triton.jit
    def _round_to_e4m3(v):
        """v rounded to the nearest-even E4M3 value (saturating at +-448), still as fp32."""
        bits = v.to(tl.int32, bitcast=True)
        sign = bits & -0x80000000
        magnitude = tl.minimum(tl.abs(v), 448.0)
        mbits = magnitude.to(tl.int32, bitcast=True)
        # normal range (>= 2^-6): keep 3 mantissa bits, round half to even on the 20 dropped ones
        normal = (mbits + 0x7FFFF + ((mbits >> 20) & 1)) & 0x7FF00000
        # subnormal range: multiples of 2^-9, rounded by the fp32 adder (ulp of 2^14 is 2^-9)
        subnormal = ((magnitude + 16384.0) - 16384.0).to(tl.int32, bitcast=True)
        rounded = tl.where(magnitude >= 0.015625, normal, subnormal)
        return (rounded | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _quantize_tiles_kernel(x_ptr, q_ptr, s_ptr, n_rows, n_cols, stride_row, stride_col, n_tiles,
                               TILE: tl.constexpr, ROWS: tl.constexpr, POW2: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        tile = tl.program_id(1)
        cols = tile * TILE + tl.arange(0, TILE)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=inside,
                    other=0.0).to(tl.float32)  # (ROWS, TILE)
        scale = _e4m3_scale(tl.max(tl.abs(x), axis=1), POW2)  # (ROWS,)
        q = _round_to_e4m3(tl.math.div_rn(x, scale[:, None]))
        tl.store(q_ptr + rows[:, None] * n_cols + cols[None, :], q.to(tl.float8e4nv), mask=inside)
        tl.store(s_ptr + rows * n_tiles + tile, scale, mask=rows < n_rows)

    @triton.jit
    def _quantize_blocks_kernel(w_ptr, q_ptr, s_ptr, n_rows, n_cols, stride_batch, stride_row,
                                stride_col, n_row_blocks, n_col_blocks,
                                BLOCK: tl.constexpr, POW2: tl.constexpr):
        batch = tl.program_id(0)
        row_block, col_block = tl.program_id(1), tl.program_id(2)
        rows = row_block * BLOCK + tl.arange(0, BLOCK)
        cols = col_block * BLOCK + tl.arange(0, BLOCK)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        w = tl.load(w_ptr + batch * stride_batch + rows[:, None] * stride_row + cols[None, :] * stride_col,
                    mask=inside, other=0.0).to(tl.float32)  # (BLOCK, BLOCK)
        scale = _e4m3_scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2)
        q = _round_to_e4m3(tl.math.div_rn(w, tl.full(w.shape, 1.0, tl.float32) * scale))
        out = batch * n_rows * n_cols + rows[:, None] * n_cols + cols[None, :]
        tl.store(q_ptr + out, q.to(tl.float8e4nv), mask=inside)
        tl.store(s_ptr + (batch * n_row_blocks + row_block) * n_col_blocks + col_block, scale)


    @triton.jit
    def _fp8_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, M, N, K, n_groups,
                         stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_K: tl.constexpr,
                         WEIGHT_BLOCK: tl.constexpr, FP32_OPERANDS: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for group in range(0, n_groups):
            ks = group * GROUP_K + tl.arange(0, GROUP_K)
            a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)  # (BLOCK_M, GROUP_K)
            b = tl.load(b_ptr + cols[None, :] * stride_bn + ks[:, None] * stride_bk,
                        mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)  # (GROUP_K, BLOCK_N)
            if FP32_OPERANDS:  # the interpreter: fp8 values are exact in fp32
                a, b = a.to(tl.float32), b.to(tl.float32)
            partial = tl.dot(a, b)  # one K-group on the tensor cores
            a_scale = tl.load(a_scale_ptr + rows * n_groups + group, mask=rows < M, other=0.0)
            b_scale = tl.load(b_scale_ptr + (cols // WEIGHT_BLOCK) * n_groups + group, mask=cols < N, other=0.0)
            acc += partial * a_scale[:, None] * b_scale[None, :]  # promoted to fp32, scaled, added
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc,
                 mask=(rows[:, None] < M) & (cols[None, :] < N))


def fp8_gemm(q_a: torch.Tensor, a_scales: torch.Tensor, q_b: torch.Tensor, b_scales: torch.Tensor,
             tile: int = 128, block: int = 128) -> torch.Tensor:
    """y = A B^T from E4M3 operands, DeepSeek-V3's way: per K-group of ``tile`` a tensor-core product,
    promoted to fp32 and multiplied by the group's scales (A: 1 x tile, B: block x block).

    q_a (M, K) with a_scales (M, K/tile); q_b (N, K) with b_scales (N/block, K/block) -> (M, N) fp32.
    Under the interpreter the operands are widened to fp32 first (its fp8 dot is not exact).
    Not yet used by the training path (no CUDA machine to validate it on): see docs/precision.md.
    """
    require_triton()
    if tile != block:
        raise ValueError(f"fp8_gemm needs tile ({tile}) == block ({block}): K-groups must match weight blocks")
    m, k = q_a.shape
    n = q_b.shape[0]
    c = torch.empty(m, n, dtype=torch.float32, device=q_a.device)
    interpreted = not q_a.is_cuda
    block_m = block_n = 32 if interpreted else 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_gemm_kernel[grid](q_a, a_scales.contiguous(), q_b, b_scales.contiguous(), c, m, n, k,
                           triton.cdiv(k, tile), q_a.stride(0), q_a.stride(1), q_b.stride(0), q_b.stride(1),
                           c.stride(0), c.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, GROUP_K=tile,
                           WEIGHT_BLOCK=block, FP32_OPERANDS=interpreted)
    return c


def quantize_tiles(x: torch.Tensor, tile: int = 128, power_of_two: bool = False):
    """As quantize.quantize_tiles: x (..., K) -> (q (..., K) e4m3, scales (..., ceil(K/tile)) fp32)."""
    require_triton()
    *lead, k = x.shape
    x2d = x.reshape(-1, k)  # a view when it can be; strides go to the kernel (transposes are fine)
    n_rows, n_tiles = x2d.shape[0], triton.cdiv(k, tile)
    q = torch.empty(n_rows, k, dtype=E4M3, device=x.device)
    scales = torch.empty(n_rows, n_tiles, dtype=torch.float32, device=x.device)
    rows_per_program = 16
    grid = (triton.cdiv(n_rows, rows_per_program), n_tiles)
    if n_rows and k:
        _quantize_tiles_kernel[grid](x2d, q, scales, n_rows, k, x2d.stride(0), x2d.stride(1), n_tiles,
                                     TILE=tile, ROWS=rows_per_program, POW2=power_of_two)
    return q.view(*lead, k), scales.view(*lead, n_tiles)


def quantize_blocks(w: torch.Tensor, block: int = 128, power_of_two: bool = False):
    """As quantize.quantize_blocks: w (..., N, K) -> (q e4m3, scales (..., ceil(N/b), ceil(K/b)) fp32)."""
    require_triton()
    *lead, n, k = w.shape
    w3d = w.reshape(-1, n, k)
    n_row_blocks, n_col_blocks = triton.cdiv(n, block), triton.cdiv(k, block)
    q = torch.empty(w3d.shape, dtype=E4M3, device=w.device)
    scales = torch.empty(w3d.shape[0], n_row_blocks, n_col_blocks, dtype=torch.float32, device=w.device)
    if w3d.numel():
        grid = (w3d.shape[0], n_row_blocks, n_col_blocks)
        _quantize_blocks_kernel[grid](w3d, q, scales, n, k, w3d.stride(0), w3d.stride(1), w3d.stride(2),
                                      n_row_blocks, n_col_blocks, BLOCK=block, POW2=power_of_two)
    return q.view(*lead, n, k), scales.view(*lead, n_row_blocks, n_col_blocks)
