"""One linear's forward + backward on DeepSeek-V3-shaped GEMMs: time and error per precision.

Precisions (all through ``dsv3_train.precision.make_linear``):

* ``fp32``          -- the default linear, no autocast;
* ``bf16``          -- bf16 GEMMs on fp32 master weights;
* ``fp8-emulated``  -- DeepSeek-V3's block-wise FP8 (1x128 tiles, 128x128 blocks, fp32 products),
  emulated in torch: for numerics, not speed;
* ``fp8-te``        -- Transformer Engine's block-scaling FP8, only on CUDA with TE installed.

Error: relative Frobenius error of y = x W^T, dx and dW against an fp64 computation from the same
inputs. Activations carry a few outlier channels (x30), as real ones do; the error-only row
``fp8 per-tensor`` (one scale per tensor, emulated here) shows what the fine-grained scales buy.
Time: median of --iters forward + backward passes after a warmup, the precisions taking turns
inside every iteration; ratios are against fp32 on the same device.

Usage::

    python bench/fp8_linear.py                     # CPU: 256 tokens, three V3 shapes
    python bench/fp8_linear.py --tokens 4096 --iters 20 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3_train.config import ConfigError  # noqa: E402
from dsv3_train.precision import PrecisionConfig, make_linear  # noqa: E402
from dsv3_train.precision.quantize import E4M3_MAX, round_to_e4m3  # noqa: E402

SHAPES = {  # name -> (in_features K, out_features N), from DeepSeek-V3 (dim 7168)
    "expert w1/w3 7168->2048": (7168, 2048),
    "expert w2 2048->7168": (2048, 7168),
    "q_a 7168->1536": (7168, 1536),
}
PRECISIONS = {
    "fp32": PrecisionConfig(),
    "bf16": PrecisionConfig(linear="bf16"),
    "fp8-emulated": PrecisionConfig(linear="fp8"),
    "fp8-te": PrecisionConfig(linear="fp8", fp8_backend="te"),
}


def inputs(tokens: int, k: int, n: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:8]] *= 30.0  # outlier channels
    weight = torch.randn(n, k, generator=g) * 0.006  # V3's init std
    grad = torch.randn(tokens, n, generator=g) * 1e-3
    return x.to(device), weight.to(device), grad.to(device)


def build(name: str, k: int, n: int, weight: torch.Tensor):
    try:
        linear = make_linear(k, n, precision=PRECISIONS[name])
    except ConfigError as error:
        return None, str(error)
    linear = linear.to(weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear, None


def forward_backward(linear, x: torch.Tensor, grad: torch.Tensor):
    xi = x.clone().requires_grad_(True)
    linear.weight.grad = None
    y = linear(xi)
    y.backward(grad.to(y.dtype))
    return y.detach(), xi.grad, linear.weight.grad


def relative_errors(results, reference) -> list[float]:
    return [((got.double() - want).norm() / want.norm()).item() for got, want in zip(results, reference)]


def per_tensor_fp8_errors(x, weight, grad, reference) -> list[float]:
    """Errors with ONE scale per tensor (amax / 448), the coarse alternative to V3's tiles."""
    def fake(t):
        scale = t.abs().amax().float() / E4M3_MAX
        return (round_to_e4m3(t.float() / scale) * scale).double()
    y = fake(x) @ fake(weight).T
    dx = fake(grad) @ fake(weight)
    dw = fake(grad).T @ fake(x)
    return relative_errors([y, dx, dw], reference)


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_shape(label: str, k: int, n: int, args) -> list[str]:
    x, weight, grad = inputs(args.tokens, k, n, args.device)
    x64, w64, g64 = x.double(), weight.double(), grad.double()
    reference = [x64 @ w64.T, g64 @ w64, g64.T @ x64]
    modules, notes = {}, {}
    for name in PRECISIONS:
        modules[name], notes[name] = build(name, k, n, weight)
    live = {name: m for name, m in modules.items() if m is not None}
    errors = {name: relative_errors(forward_backward(m, x, grad), reference) for name, m in live.items()}
    times = {name: [] for name in live}
    for _ in range(args.warmup):
        for m in live.values():
            forward_backward(m, x, grad)
    for _ in range(args.iters):
        for name, m in live.items():
            times[name].append(timed(lambda: forward_backward(m, x, grad), args.device))
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    rows = []
    for name in PRECISIONS:
        if name not in live:
            rows.append(f"| {label} | {name} | n/a | | | | | {notes[name][:60]}... |")
            continue
        e = errors[name]
        rows.append(f"| {label} | {name} | {ms[name]:.1f} | {ms[name] / ms['fp32']:.2f} | "
                    f"{e[0]:.2e} | {e[1]:.2e} | {e[2]:.2e} | |")
    e = per_tensor_fp8_errors(x, weight, grad, reference)
    rows.append(f"| {label} | fp8 per-tensor (error only) | | | {e[0]:.2e} | {e[1]:.2e} | {e[2]:.2e} | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="rows M of x (V3 trains with far more)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device {args.device}, {args.tokens} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; forward + backward of one linear, median of {args.iters}\n")
    print("| GEMM (K->N) | precision | ms | / fp32 | rel. err y | rel. err dx | rel. err dW | note |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for label in args.shapes:
        for row in bench_shape(label, *SHAPES[label], args):
            print(row, flush=True)


if __name__ == "__main__":
    main()
