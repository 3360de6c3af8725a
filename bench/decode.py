"""Decoding speed and KV-cache size, in one run, with ratios.

Part 1, on one random tiny DeepseekV3 (built with transformers, saved, loaded into ours with
dsv3_train.hf.load_hf_checkpoint, so the weights are identical) and one batch of ragged prompts:
  - ours, absorbed: latent cache (c_KV + shared rope key), W_UK/W_UV folded into the attention;
  - ours, naive: a cache of the expanded per-head K and V (nothing recomputed);
  - transformers' DeepseekV3ForCausalLM with its own DynamicCache (a hand-written greedy loop of
    forward calls with explicit position_ids and attention_mask, no generate() overhead).
All three must produce the same greedy tokens. Bytes per token are measured from the cache
tensors and printed beside the formulas.

Part 2, on a trained toy model (a run directory; trained with ``dsv3-train train.steps=500
name=toy-spec`` when missing): MTP speculative decoding vs plain greedy, batch 1 per prompt,
acceptance rate and speedup; the outputs must be identical.

Usage: python bench/decode.py [--new-tokens 128] [--repeats 3] [--threads 1] [--checkpoint runs/toy-spec]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsv3_train.generate import (Decoder, MTPDrafter, generate, load_for_generation,
                                 speculative_generate)
from dsv3_train.hf import load_hf_checkpoint

STDLIB_PROMPTS = ["import os\nimport sys\n\n", "def __init__(self",
                  "class Test(unittest.TestCase):\n    def test_", "for i in range(",
                  "if __name__ == '__main__':\n", "    return self.", "from collections import",
                  "        raise ValueError("]


# ----------------------------------------------------------------------------- part 1
def tiny_hf_model(seed: int = 0):
    """A random DeepseekV3ForCausalLM: 4 layers (1 dense), 8 heads, MLA with kv_lora_rank 64,
    group-limited top-2 of 8 experts; weights scaled so that greedy tokens are not near-ties."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=48,
        max_position_embeddings=512, num_nextn_predict_layers=0, rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0, param.shape[-1] ** -0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.3)
    model.generation_config.eos_token_id = None
    return model


@torch.inference_mode()
def hf_greedy(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy with transformers' own cache; left padding, positions counted per row.
    Returns the new tokens and the measured cache bytes per token per sequence."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True)
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(tokens[-1][:, None], attention_mask=mask, position_ids=positions, cache=out.cache,
                    use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1))
    cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.cache.layers)
    return torch.stack(tokens, 1).tolist(), cache_bytes / (len(prompts) * out.cache.get_seq_length())


def measured_cache_bytes(model, prompts, new_tokens: int, absorb: bool) -> float:
    """Bytes per token per sequence of the tensors our decoder allocates for this batch."""
    capacity = max(len(p) for p in prompts) + new_tokens
    cache = Decoder(model, len(prompts), capacity, absorb).stack.cache
    return sum(t.nbytes for t in cache.tensors()) / (len(prompts) * capacity)


def fastest(calls: dict, repeats: int) -> tuple[dict, dict]:
    """Run every call once per round for `repeats` rounds, taking turns so that bursts of load on
    the shared machine hit all alike (the first round also warms up); returns each call's result
    and its fastest wall time in seconds."""
    results, times = {}, {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            results[name] = call()
            times[name] = min(times[name], time.perf_counter() - start)
    return results, times


def compare_decoders(args) -> None:
    """Time the three decoders on one batch, check they agree, print the table."""
    import transformers
    from transformers.utils import logging

    logging.disable_progress_bar()
    hf_model = tiny_hf_model()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        ours = load_hf_checkpoint(tmp, mtp_depth=0)
    n, gen = args.new_tokens, torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, ours.cfg.vocab_size, (length,), generator=gen).tolist()
               for length in (48, 64, 33, 57)]
    out, times = fastest({"absorbed": lambda: generate(ours, prompts, n),
                          "naive": lambda: generate(ours, prompts, n, absorb=False),
                          "hf": lambda: hf_greedy(hf_model, prompts, n)}, args.repeats)
    (theirs, hf_bytes), t_abs = out["hf"], times["absorbed"]
    if not out["absorbed"] == out["naive"] == theirs:
        sys.exit("greedy outputs differ between the decoders: the comparison is void")
    latent, mha, formulas = cache_formulas(ours.cfg)
    rows = [("ours, absorbed (cache: c_KV + k_rope per layer)", t_abs,
             measured_cache_bytes(ours, prompts, n, True), latent),
            ("ours, naive (cache: expanded per-head K and V)", times["naive"],
             measured_cache_bytes(ours, prompts, n, False), mha),
            (f"transformers {transformers.__version__} DeepseekV3 (its DynamicCache)", times["hf"],
             hf_bytes, latent)]
    print(f"\nPrompts: {len(prompts)} of lengths {[len(p) for p in prompts]} (left-padded), {n} new tokens "
          f"each, greedy; fp32, {torch.get_num_threads()} thread(s), best of {args.repeats}. "
          f"Greedy tokens identical across all three: yes.\n")
    print("| decoder | decode tokens/s | speed vs absorbed | KV bytes/token (measured) | formula | "
          "bytes vs absorbed |")
    print("|---|---|---|---|---|---|")
    for name, seconds, measured, formula in rows:
        print(f"| {name} | {len(prompts) * n / seconds:.0f} | {t_abs / seconds:.2f}x | {measured:.0f} | "
              f"{formula} | {measured / rows[0][2]:.2f}x |")
    print(f"\n{formulas}")


def cache_formulas(cfg, dtype_bytes: int = 4) -> tuple[int, int, str]:
    """Expected bytes per token of the latent cache and of a plain MHA cache of the same heads,
    and a line that spells both out."""
    latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * dtype_bytes
    mha = cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.n_layers * dtype_bytes
    line = (f"formulas: latent (kv_lora_rank {cfg.kv_lora_rank} + qk_rope_head_dim "
            f"{cfg.qk_rope_head_dim}) x {cfg.n_layers} layers x {dtype_bytes} B = {latent} B;  plain MHA "
            f"{cfg.n_heads} heads x (k {cfg.qk_head_dim} + v {cfg.v_head_dim}) x {cfg.n_layers} layers x "
            f"{dtype_bytes} B = {mha} B ({mha / latent:.1f}x)")
    return latent, mha, line


# ----------------------------------------------------------------------------- part 2
def toy_checkpoint(path: Path, steps: int) -> Path:
    """The run directory, trained first (dsv3-train ... name=toy-spec) when it has no checkpoint."""
    if not any(path.glob("checkpoints/step_*")):
        print(f"training {path} ({steps} steps) ...", flush=True)
        subprocess.run([sys.executable, "-m", "dsv3_train.train", f"train.steps={steps}",
                        f"name={path.name}", f"hydra.run.dir={path}", "logger.progress=false"], check=True)
    return path


def compare_speculative(args) -> None:
    """Plain greedy vs MTP speculative on each stdlib-like prompt; outputs must be identical."""
    setup = load_for_generation(toy_checkpoint(Path(args.checkpoint), args.train_steps))
    model, n = setup.model, args.spec_tokens
    rows = []
    for text in STDLIB_PROMPTS:
        prompt = setup.prompt_prefix + setup.tokenizer.encode(text).ids
        out, times = fastest({"plain": lambda: generate(model, [prompt], n),
                              "spec": lambda: speculative_generate(model, [prompt], n)}, args.repeats)
        spec, stats = out["spec"]
        if spec != out["plain"]:
            sys.exit(f"speculative output differs from greedy for {text!r}")
        rows.append((text, stats, times["plain"], times["spec"]))
    print(f"\nMTP speculative vs plain greedy: {args.checkpoint}, {n} new tokens per prompt, batch 1, "
          f"no stop token, best of {args.repeats}; outputs identical: yes.\n")
    rate = print_speculative_table(rows, n)
    first_prompt = setup.prompt_prefix + setup.tokenizer.encode(STDLIB_PROMPTS[0]).ids
    main_1, main_2, draft = forward_costs(model, first_prompt)
    print(f"\nper call: main model on 1 new token {main_1:.2f} ms, on 2 new tokens {main_2:.2f} ms "
          f"({main_2 / main_1:.2f}x), MTP draft {draft:.2f} ms ({draft / main_1:.2f}x). A verification "
          f"emits 1 + acceptance tokens for one 2-token forward and one draft: predicted speedup "
          f"(1 + {rate:.2f}) x {main_1:.2f} / ({main_2:.2f} + {draft:.2f}) = "
          f"{(1 + rate) * main_1 / (main_2 + draft):.2f}x")


def print_speculative_table(rows, n: int) -> float:
    """One markdown row per prompt and a total; returns the overall acceptance rate."""
    print(f"| prompt | acceptance | main-model forwards (plain: {n}) | plain tokens/s | speculative tokens/s "
          f"| speedup |")
    print("|---|---|---|---|---|---|")
    for text, stats, t_plain, t_spec in rows:
        print(f"| `{text!r}` | {stats.acceptance_rate:.0%} | {stats.drafted + 1} | {n / t_plain:.0f} | "
              f"{n / t_spec:.0f} | {t_plain / t_spec:.2f}x |")
    drafted, accepted = sum(r[1].drafted for r in rows), sum(r[1].accepted for r in rows)
    plain_s, spec_s, total = sum(r[2] for r in rows), sum(r[3] for r in rows), n * len(rows)
    print(f"| **all** | {accepted / drafted:.0%} | {drafted + len(rows)} | {total / plain_s:.0f} | "
          f"{total / spec_s:.0f} | {plain_s / spec_s:.2f}x |")
    print(f"\nmedian speedup over the prompts {statistics.median(r[2] / r[3] for r in rows):.2f}x")
    return accepted / drafted


@torch.inference_mode()
def forward_costs(model, prompt: list[int], calls: int = 50) -> tuple[float, float, float]:
    """Milliseconds per call, after the prompt: main model on 1 and on 2 new tokens (the cache
    truncated back after each), and one MTP draft."""
    main, drafter = Decoder(model, 1, len(prompt) + 2), MTPDrafter(model, len(prompt) + 3 * calls)
    hidden = main.prefill([prompt])
    drafter(hidden[:, :-1], prompt[1:])

    def main_forward(width):
        for _ in range(calls):
            main.extend(torch.ones(1, width, dtype=torch.long))
            main.truncate(len(prompt))

    _, times = fastest({"main_1": lambda: main_forward(1), "main_2": lambda: main_forward(2),
                        "draft": lambda: [drafter(hidden[:, -1:], [1]) for _ in range(calls)]}, 3)
    return tuple(times[name] * 1e3 / calls for name in ("main_1", "main_2", "draft"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128, help="part 1: new tokens per prompt")
    parser.add_argument("--spec-tokens", type=int, default=64, help="part 2: new tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--checkpoint", default="runs/toy-spec", help="part 2: run dir with an MTP model")
    parser.add_argument("--train-steps", type=int, default=500, help="part 2: steps if it must be trained")
    parser.add_argument("--skip-speculative", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compare_decoders(args)
    if not args.skip_speculative:
        compare_speculative(args)


if __name__ == "__main__":
    main()
