"""Toy-model training, BF16 vs FP8 (emulated block-wise, DeepSeek-V3 recipe): same seed, same data.

Both runs use the trainer's bf16 autocast (``train.precision=bf16``), as V3 keeps embedding, head,
router, norms and attention in BF16/FP32. The BF16 run's linears are the default factory ones
(bf16 GEMMs under autocast); the FP8 run builds the model with ``PrecisionConfig(linear="fp8")``,
so every projection and expert GEMM -- forward, input gradient and weight gradient -- takes E4M3
operands with 1x128 tile / 128x128 block scales and accumulates in fp32. Master weights,
gradients and AdamW moments are fp32 in both (``--bf16-moments`` switches both to bf16 moments).

The model, data and schedule are the ``dsv3-train`` defaults (configs/: model=toy, data=stdlib,
train=default), composed like the launcher does; extra Hydra overrides can be appended.
Printed: final train loss (mean of the last 50 steps, which both runs see in the same order),
final validation loss, and the relative FP8-vs-BF16 difference of each. The curves go to
docs/img/fp8-vs-bf16.png.

Usage::

    python bench/fp8_training.py                    # 500 steps (the toy default), bf16 and fp8
    python bench/fp8_training.py --steps 300 --with-fp32 train.seed=1
    python bench/fp8_training.py --with-fp32 --replot  # table and figure again from metrics.jsonl
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv3_train.data import build_dataset  # noqa: E402
from dsv3_train.metrics import MetricsLogger  # noqa: E402
from dsv3_train.model import Transformer  # noqa: E402
from dsv3_train.plot import read_metrics  # noqa: E402
from dsv3_train.precision import PrecisionConfig, keep_moments_in_bf16  # noqa: E402
from dsv3_train.trainer import Trainer  # noqa: E402
from launch.compose import compose  # noqa: E402

TAIL = 50  # steps averaged for the final train loss
COLORS = {"bf16": "tab:blue", "fp8": "tab:red", "fp32": "tab:green"}
RUNS = {  # name -> (train.precision, linear precision)
    "bf16": ("bf16", PrecisionConfig()),
    "fp8": ("bf16", PrecisionConfig(linear="fp8")),
    "fp32": ("fp32", PrecisionConfig()),
}


def train(name: str, steps: int, overrides: list[str], bf16_moments: bool, out_dir: Path,
          threads: int = 1) -> list[dict]:
    autocast, precision = RUNS[name]
    cfg = compose([f"train.steps={steps}", f"train.precision={autocast}", f"train.threads={threads}",
                   "checkpoint.every=0",
                   "checkpoint.resume=never", "logger.progress=false", f"run_dir={out_dir / name}",
                   *overrides])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dataset = build_dataset(cfg.data, cfg.model.vocab_size, progress=False)
    torch.manual_seed(cfg.train.seed)  # the same initial weights for every precision
    model = Transformer(cfg.model, precision)
    run_dir = out_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    trainer = Trainer(cfg, model, dataset, run_dir)
    trainer.logger = MetricsLogger(cfg.logger, run_dir, {})  # metrics.jsonl + a line every log_every
    if bf16_moments:
        keep_moments_in_bf16(trainer.optimizer)
    start = time.perf_counter()
    history = trainer.fit()
    seconds = time.perf_counter() - start
    linears = precision.describe() if precision.linear != "fp32" else "default (the autocast dtype)"
    print(f"{name:5s} train.precision={autocast}, linears {linears}: {steps} steps in {seconds:.0f} s "
          f"({seconds / steps * 1000:.0f} ms/step incl. validation); loss {history[-1]['loss']:.4f}", flush=True)
    return history


def summary(history: list[dict]) -> tuple[float, float]:
    """(mean train loss over the last TAIL steps, last validation loss)."""
    tail = [m["loss"] for m in history[-TAIL:]]
    val = [m["val_loss"] for m in history if "val_loss" in m]
    return statistics.fmean(tail), val[-1]


def plot(histories: dict[str, list[dict]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_diff) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True,
                                          gridspec_kw={"height_ratios": [2, 1]})
    window = 20
    for name, history in histories.items():
        steps = [m["step"] for m in history]
        loss = [m["loss"] for m in history]
        smooth = [statistics.fmean(loss[max(0, i - window + 1):i + 1]) for i in range(len(loss))]
        ax_loss.plot(steps, smooth, color=COLORS[name], label=f"{name} train (mean of {window})", linewidth=1.2)
        val = [(m["step"], m["val_loss"]) for m in history if "val_loss" in m]
        ax_loss.plot(*zip(*val), "o--", color=COLORS[name], markersize=3, linewidth=0.8,
                     label=f"{name} validation")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.set_title("Toy model: BF16 vs block-wise FP8 (emulated); same seed and data", fontsize=10)
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    base = [m["loss"] for m in histories["bf16"]]
    for name, history in histories.items():
        if name == "bf16":
            continue
        rel = [100 * (m["loss"] - b) / b for m, b in zip(history, base)]
        smooth = [statistics.fmean(rel[max(0, i - window + 1):i + 1]) for i in range(len(rel))]
        ax_diff.plot([m["step"] for m in history], smooth, color=COLORS[name],
                     label=f"{name} vs bf16 (mean of {window})")
    ax_diff.axhline(0.25, color="grey", linestyle=":", linewidth=0.8)
    ax_diff.axhline(-0.25, color="grey", linestyle=":", linewidth=0.8, label="+-0.25 %")
    ax_diff.set_xlabel("step")
    ax_diff.set_ylabel("train loss difference (%)")
    ax_diff.legend(fontsize=8)
    ax_diff.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--with-fp32", action="store_true", help="also train an fp32 run (a reference scale)")
    parser.add_argument("--bf16-moments", action="store_true", help="AdamW moments in bf16, in every run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core host, 2 threads stall in OpenMP barriers)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "fp8-vs-bf16"), help="run directories")
    parser.add_argument("--png", default=str(ROOT / "docs" / "img" / "fp8-vs-bf16.png"))
    parser.add_argument("--replot", action="store_true",
                        help="no training: table and figure from the runs' metrics.jsonl under --out")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.seed=1")
    args = parser.parse_args()

    names = ["bf16", "fp8"] + (["fp32"] if args.with_fp32 else [])
    if args.replot:
        histories = {name: read_metrics(Path(args.out) / name) for name in names}
    else:
        histories = {name: train(name, args.steps, args.overrides, args.bf16_moments, Path(args.out),
                                 args.threads) for name in names}
    base_train, base_val = summary(histories["bf16"])
    print(f"\n| run | train loss (mean of last {TAIL}) | vs bf16 | final val loss | vs bf16 |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        train_loss, val_loss = summary(histories[name])
        print(f"| {name} | {train_loss:.4f} | {100 * (train_loss - base_train) / base_train:+.3f} % "
              f"| {val_loss:.4f} | {100 * (val_loss - base_val) / base_val:+.3f} % |")
    plot(histories, Path(args.png))
    print(f"\ncurves: {args.png}")


if __name__ == "__main__":
    main()
