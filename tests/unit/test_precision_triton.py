"""The Triton block-wise quantisers equal the torch ones bit for bit, run by Triton's CPU interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, and under pytest other modules
(transformers) import it earlier, so the checks below run in one child process started with the
variable set (``python tests/unit/test_precision_triton.py`` prints their results as JSON).
Skipped without Triton (pip install triton==3.9.0).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed: pip install triton==3.9.0")


def _hard_values(*shape, seed=0):
    """Wide dynamic range (E4M3 subnormals after scaling) and zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 10 ** (5 * torch.rand(*shape, generator=g) - 3)
    x.view(-1)[::7] = 0.0
    return x


def _same(triton_result, torch_result) -> bool:
    (q, scales), (want_q, want_scales) = triton_result, torch_result
    return torch.equal(scales, want_scales) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


def _midpoint_tiles() -> torch.Tensor:
    """Rows of 128 whose max is 448 (scale 1): every E4M3 value, every midpoint, and both neighbours."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()
    midpoints = (grid[1:] + grid[:-1]) / 2
    probes = torch.cat([midpoints, midpoints.nextafter(grid[1:]), midpoints.nextafter(grid[:-1]), grid])
    probes = torch.cat([probes, torch.zeros(-probes.numel() % 127)]).view(-1, 127)
    return torch.cat([torch.full((probes.shape[0], 1), 448.0), probes], dim=1)


def _per_group_scaled_products(q_x, s_x, q_w, s_w, group=128):
    """V3's GEMM in fp64: sum over K-groups of (q_x . q_w) * s_x * s_w."""
    q_x, q_w, s_x, s_w = q_x.double(), q_w.double(), s_x.double(), s_w.double()
    y = torch.zeros(q_x.shape[0], q_w.shape[0], dtype=torch.float64)
    for g, start in enumerate(range(0, q_x.shape[1], group)):
        part = q_x[:, start:start + group] @ q_w[:, start:start + group].T
        y += part * s_x[:, g:g + 1] * s_w[:, g].repeat_interleave(group)[:q_w.shape[0]]
    return y


def run_checks() -> dict:
    """Every comparison, Triton (interpreted) against torch; name -> equal bit for bit."""
    from dsv3_train.precision import quantize_blocks, quantize_tiles, triton_kernels

    results = {}
    for shape in [(5, 300), (33, 128), (2, 3, 200)]:
        for power_of_two in (False, True):
            x = _hard_values(*shape)
            x[0, ..., :128] = 0.0  # an all-zero tile
            results[f"tiles {shape} pow2={power_of_two}"] = _same(
                triton_kernels.quantize_tiles(x, 128, power_of_two), quantize_tiles(x, 128, power_of_two))
    x = _hard_values(300, 70, seed=1)
    results["tiles transposed"] = _same(triton_kernels.quantize_tiles(x.t()), quantize_tiles(x.t()))
    results["tiles bf16"] = _same(triton_kernels.quantize_tiles(x.bfloat16()), quantize_tiles(x.bfloat16()))
    for shape in [(200, 300), (3, 130, 64)]:
        for power_of_two in (False, True):
            w = _hard_values(*shape, seed=2)
            results[f"blocks {shape} pow2={power_of_two}"] = _same(
                triton_kernels.quantize_blocks(w, 128, power_of_two), quantize_blocks(w, 128, power_of_two))
    x, w = _hard_values(70, 300, seed=3), _hard_values(200, 300, seed=4)
    (q_x, s_x), (q_w, s_w) = quantize_tiles(x), quantize_blocks(w)
    got = triton_kernels.fp8_gemm(q_x, s_x, q_w, s_w).double()
    want = _per_group_scaled_products(q_x, s_x, q_w, s_w)
    results["fp8 gemm relative error"] = ((got - want).norm() / want.norm()).item()
    tiles = _midpoint_tiles()
    q, scales = triton_kernels.quantize_tiles(tiles)
    results["midpoints round to nearest even"] = bool((scales == 1).all()) and torch.equal(
        q.view(torch.uint8), tiles.to(torch.float8_e4m3fn).view(torch.uint8))
    return results


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", ["(5, 300)", "(33, 128)", "(2, 3, 200)"])
@pytest.mark.parametrize("power_of_two", [False, True])
def test_triton_tile_quantiser_equals_torch_bit_for_bit(interpreted, shape, power_of_two):
    assert interpreted[f"tiles {shape} pow2={power_of_two}"]


def test_triton_tile_quantiser_equals_torch_on_transposed_and_bf16_inputs(interpreted):
    assert interpreted["tiles transposed"]  # the 128x1 tiles of the weight-gradient GEMM
    assert interpreted["tiles bf16"]  # activations under autocast


@pytest.mark.parametrize("shape", ["(200, 300)", "(3, 130, 64)"])
@pytest.mark.parametrize("power_of_two", [False, True])
def test_triton_block_quantiser_equals_torch_bit_for_bit(interpreted, shape, power_of_two):
    assert interpreted[f"blocks {shape} pow2={power_of_two}"]


def test_triton_fp8_gemm_promotes_each_128_group_with_its_scales(interpreted):
    assert interpreted["fp8 gemm relative error"] < 1e-6  # fp32 accumulation vs the fp64 reference


def test_triton_rounds_to_nearest_even_at_every_e4m3_midpoint(interpreted):
    assert interpreted["midpoints round to nearest even"]


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (set before triton is imported)")
    print(json.dumps(run_checks()))
