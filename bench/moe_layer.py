"""MoE layer throughput: ours vs Hugging Face's DeepseekV3MoE vs a dense SwiGLU of equal active FLOPs.

Forward + backward tokens/s (median of timed iterations after warmup) for a few layer shapes:

* ``ours``   -- :class:`dsv3_train.model.moe.MoE`;
* ``HF``     -- ``transformers``' ``DeepseekV3MoE`` with the *same* weights copied in, run with the
  experts implementation a ``DeepseekV3`` model gets by default (``grouped_mm``); ``HF eager`` is its
  reference per-expert loop (``--hf-eager``). Before timing, HF's output and input gradient are
  asserted equal to ours on the same input (fp32, rtol = atol = 1e-4), so the race is honest;
* ``dense``  -- one SwiGLU MLP of hidden width (top_k + n_shared) * moe_inter_dim: the same matmul
  FLOPs per token as the MoE's active experts, without routing or dispatch -- the practical limit.

Usage::

    python bench/moe_layer.py                     # all shapes, 4096 tokens, fp32 and bf16 rows
    python bench/moe_layer.py --shapes small v3 --dtype fp32 --iters 3 --breakdown --hf-eager

Modules take turns inside every timed iteration, so load from elsewhere on the machine hits them
alike; ratios are steadier than absolute tokens/s. ``bf16`` casts weights and inputs of every
layer to bf16 (routers still score in fp32). The balance loss is off (alpha = 0) because HF's layer
has none; all modules run in training mode. ``--breakdown`` adds per-stage timings of ours.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3_train.config import ModelConfig  # noqa: E402
from dsv3_train.model.layers import SwiGLU  # noqa: E402
from dsv3_train.model.moe import MoE  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    n_experts: int
    top_k: int
    hidden: int
    n_groups: int
    n_kept_groups: int
    n_shared: int = 1
    route_scale: float = 2.5

    def label(self) -> str:
        groups = f", groups {self.n_kept_groups}/{self.n_groups}" if self.n_groups > 1 else ""
        return (f"{self.name}: d={self.dim}, E={self.n_experts} top-{self.top_k}, H={self.hidden}"
                f"{groups}, {self.n_shared} shared")


SHAPES = {
    # many small experts, like DeepSeekMoE's fine-grained segmentation
    "small": Shape("small", dim=256, n_experts=64, top_k=6, hidden=128, n_groups=8, n_kept_groups=3),
    # few wide experts (Mixtral-like granularity)
    "wide": Shape("wide", dim=1024, n_experts=8, top_k=2, hidden=1024, n_groups=1, n_kept_groups=1),
    # V3's ratios scaled down: expert width = d/4 (V3: 2048/7168), top-8, half of the groups kept
    "v3": Shape("v3", dim=512, n_experts=32, top_k=8, hidden=128, n_groups=4, n_kept_groups=2),
}


def model_config(shape: Shape) -> ModelConfig:
    return ModelConfig(dim=shape.dim, moe_inter_dim=shape.hidden, n_routed_experts=shape.n_experts,
                       n_shared_experts=shape.n_shared, n_activated_experts=shape.top_k,
                       n_expert_groups=shape.n_groups, n_limited_groups=shape.n_kept_groups,
                       route_scale=shape.route_scale, norm_topk_prob=True, balance_loss_alpha=0.0)


def build_ours(shape: Shape, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(model_config(shape))
    std = 0.02
    with torch.no_grad():
        nn.init.normal_(moe.router.weight, 0.0, 1.0 / shape.dim ** 0.5)  # spread-out affinities
        moe.router.expert_bias.normal_(0.0, 0.01)  # non-zero so the bias copy is exercised
        nn.init.normal_(moe.experts.w13, 0.0, std)
        nn.init.normal_(moe.experts.w2, 0.0, std)
        for lin in (moe.shared.w1, moe.shared.w3, moe.shared.w2):
            nn.init.normal_(lin.weight, 0.0, std)
    return moe


def build_hf(shape: Shape, ours: MoE, experts_implementation: str) -> nn.Module:
    """transformers' DeepseekV3MoE of the same shape holding a copy of ``ours``' weights."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(hidden_size=shape.dim, moe_intermediate_size=shape.hidden,
                              n_routed_experts=shape.n_experts, n_shared_experts=shape.n_shared,
                              num_experts_per_tok=shape.top_k, n_group=shape.n_groups,
                              topk_group=shape.n_kept_groups, routed_scaling_factor=shape.route_scale,
                              norm_topk_prob=True, hidden_act="silu")
    # A standalone module gets no implementation from a PreTrainedModel; set what one would pick.
    config._experts_implementation = experts_implementation
    hf = DeepseekV3MoE(config)
    own = {
        "gate.weight": ours.router.weight,
        "gate.e_score_correction_bias": ours.router.expert_bias,
        "experts.gate_up_proj": ours.experts.w13,  # (E, 2H, D), [gate; up] per expert in both
        "experts.down_proj": ours.experts.w2,  # (E, D, H)
        "shared_experts.gate_proj.weight": ours.shared.w1.weight,
        "shared_experts.up_proj.weight": ours.shared.w3.weight,
        "shared_experts.down_proj.weight": ours.shared.w2.weight,
    }
    state = hf.state_dict()
    assert set(state) == set(own), f"HF DeepseekV3MoE tensors changed: {sorted(state)}"
    for name, tensor in own.items():
        assert state[name].shape == tensor.shape, (name, state[name].shape, tensor.shape)
    hf.load_state_dict({name: tensor.detach().clone() for name, tensor in own.items()})
    return hf


def build_dense(shape: Shape, seed: int = 0) -> SwiGLU:
    torch.manual_seed(seed)
    dense = SwiGLU(shape.dim, (shape.top_k + shape.n_shared) * shape.hidden)
    for lin in (dense.w1, dense.w3, dense.w2):
        nn.init.normal_(lin.weight, 0.0, 0.02)
    return dense


def run_layer(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


def assert_hf_matches_ours(ours: MoE, hf: nn.Module, x: torch.Tensor) -> float:
    """Same output and input gradient on the same input (fp32); returns the max output difference."""
    results = []
    for module in (ours, hf):
        xi = x.clone().requires_grad_(True)
        y = run_layer(module, xi)
        y.backward(torch.ones_like(y) / y.numel() ** 0.5)
        results.append((y.detach(), xi.grad))
        module.zero_grad(set_to_none=True)
    (y_ours, g_ours), (y_hf, g_hf) = results
    torch.testing.assert_close(y_hf, y_ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_hf, g_ours, rtol=1e-4, atol=1e-4)
    return (y_hf - y_ours).abs().max().item()


def time_fwd_bwd(modules: dict[str, nn.Module], x: torch.Tensor, warmup: int, iters: int) -> dict[str, float]:
    """Median seconds of one forward + backward (input gradient included) per module.

    The modules take turns within each iteration, so a burst of load from elsewhere on the
    machine slows all of them alike instead of whichever happened to be running.
    """
    x = x.detach().clone().requires_grad_(True)
    grad = torch.randn_like(x)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for i in range(warmup + iters):
        for name, module in modules.items():
            module.zero_grad(set_to_none=True)
            x.grad = None
            start = time.perf_counter()
            run_layer(module, x).backward(grad)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _median_ms(fn, warmup: int, iters: int) -> float:
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def breakdown(ours: MoE, dense: nn.Module, x: torch.Tensor, warmup: int, iters: int) -> dict[str, float]:
    """Median ms of each stage of our layer (forward + backward), each timed on its own, plus
    the bare expert matmuls (same per-expert torch.mm calls, no activation, no autograd)."""
    flat = x.flatten(0, 1).detach()
    routing = ours.router(x)
    rows, counts, handle = ours.dispatcher.dispatch(flat, routing.indices)
    rows = rows.detach()
    expert_out = ours.experts(rows, counts).detach()
    weights = routing.weights.detach()

    ones = {}  # upstream gradients, made once so their allocation is not timed

    def grad_of(t):
        key = (tuple(t.shape), t.dtype)
        if key not in ones:
            ones[key] = torch.ones_like(t)
        return ones[key]

    def leaf(t):
        return t.detach().clone().requires_grad_(True)

    x_leaf, flat_leaf, rows_leaf = leaf(x), leaf(flat), leaf(rows)
    out_leaf, weights_leaf = leaf(expert_out), leaf(weights)

    def backward(out, *leaves):
        for t in leaves:
            t.grad = None
        out.backward(grad_of(out))

    def router():
        r = ours.router(x_leaf)
        x_leaf.grad = None
        (r.weights.sum() + r.balance_loss).backward()

    def dispatch():
        backward(ours.dispatcher.dispatch(flat_leaf, routing.indices)[0], flat_leaf)

    def experts():
        backward(ours.experts(rows_leaf, counts), rows_leaf)

    def combine():
        backward(ours.dispatcher.combine(out_leaf, weights_leaf, handle), out_leaf, weights_leaf)

    def shared():
        backward(ours.shared(flat_leaf), flat_leaf)

    w13, w2 = ours.experts.w13.detach(), ours.experts.w2.detach()
    hidden = w2.shape[-1]
    spans, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            spans.append((expert, start, start + count))
        start += count
    gate_up = rows.new_empty(rows.shape[0], 2 * hidden)
    h = rows.new_empty(rows.shape[0], hidden)
    out, grad_w13, grad_w2 = torch.empty_like(rows), torch.empty_like(w13), torch.empty_like(w2)

    def expert_matmuls():  # 2 forward + 4 backward matmuls per expert, as in _GroupedSwiGLU
        for e, a, b in spans:
            torch.mm(rows[a:b], w13[e].t(), out=gate_up[a:b])
            torch.mm(h[a:b], w2[e].t(), out=out[a:b])
        for e, a, b in spans:
            torch.mm(out[a:b].t(), h[a:b], out=grad_w2[e])
            torch.mm(out[a:b], w2[e], out=h[a:b])
            torch.mm(gate_up[a:b].t(), rows[a:b], out=grad_w13[e])
            torch.mm(gate_up[a:b], w13[e], out=out[a:b])

    def full(module):
        def run():
            module.zero_grad(set_to_none=True)
            backward(run_layer(module, x_leaf), x_leaf)
        return run

    parts = {"router": router, "dispatch": dispatch, "experts": experts,
             "expert matmuls": expert_matmuls, "combine": combine, "shared": shared,
             "ours": full(ours), "dense": full(dense)}
    return {name: _median_ms(fn, warmup, iters) for name, fn in parts.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch (B*T)")
    parser.add_argument("--seq-len", type=int, default=512, help="T; B = tokens / T")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="one table row per shape and dtype")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-eager", action="store_true",
                        help="also time HF's eager per-expert loop (experts_implementation='eager')")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each stage of our layer on its own (ms, fwd+bwd)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    seq_len = min(args.seq_len, args.tokens)
    assert args.tokens % seq_len == 0, "--tokens must be a multiple of --seq-len"
    batch = args.tokens // seq_len

    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, {args.tokens} tokens ({batch}x{seq_len}), "
          f"median of {args.iters} fwd+bwd after {args.warmup} warmup\n", flush=True)

    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        torch.manual_seed(1)
        x = torch.randn(batch, seq_len, shape.dim)
        ours = build_ours(shape).train()
        hf_impls = ["grouped_mm"] + (["eager"] if args.hf_eager else [])
        hfs = {f"HF {impl}": build_hf(shape, ours, impl).train() for impl in hf_impls}
        diff = max(assert_hf_matches_ours(ours, hf, x) for hf in hfs.values())
        print(f"{shape.label()}: HF output and input grad == ours (max |diff| {diff:.1e})", flush=True)
        fp32_modules = {"ours": ours, **hfs, "dense": build_dense(shape).train()}
        for dtype_name in args.dtype:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            modules = {label: copy.deepcopy(m).to(dtype) for label, m in fp32_modules.items()}
            router = modules["ours"].router
            router.expert_bias.data = router.expert_bias.data.float()  # selection bias stays fp32
            seconds = time_fwd_bwd(modules, x.to(dtype), args.warmup, args.iters)
            rate = {label: args.tokens / s for label, s in seconds.items()}
            print(f"  {dtype_name}: " + "  ".join(f"{k} {v:,.0f} tok/s" for k, v in rate.items()),
                  flush=True)
            if args.breakdown:
                ms = breakdown(modules["ours"], modules["dense"], x.to(dtype), args.warmup, args.iters)
                stages = ("router", "dispatch", "experts", "combine", "shared")
                print(f"  {dtype_name} breakdown (ms): " + ", ".join(f"{k} {ms[k]:.1f}" for k in stages)
                      + f" (sum {sum(ms[k] for k in stages):.1f}); expert matmuls alone "
                      f"{ms['expert matmuls']:.1f}; whole layer {ms['ours']:.1f}; dense {ms['dense']:.1f}",
                      flush=True)
            rows.append((shape, dtype_name, rate))

    hf_cols = [c for c in rows[0][2] if c.startswith("HF")]
    header = (["shape", "dtype", "ours tok/s"] + [f"{c} tok/s" for c in hf_cols] + ["dense tok/s"]
              + [f"ours/{c}" for c in hf_cols] + ["ours/dense"] + [f"{c}/dense" for c in hf_cols])
    print("\n| " + " | ".join(header) + " |")
    print("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|")
    for shape, dtype_name, rate in rows:
        cells = [shape.label(), dtype_name, f"{rate['ours']:,.0f}"]
        cells += [f"{rate[c]:,.0f}" for c in hf_cols] + [f"{rate['dense']:,.0f}"]
        cells += [f"{rate['ours'] / rate[c]:.2f}" for c in hf_cols]
        cells += [f"{rate['ours'] / rate['dense']:.2f}"]
        cells += [f"{rate[c] / rate['dense']:.2f}" for c in hf_cols]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
