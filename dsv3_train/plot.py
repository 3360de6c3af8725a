"""``dsv3-plot RUN_DIR``: loss curves and a per-layer expert-load heatmap from metrics.jsonl."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass the run directory of a dsv3-train run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(rows: list[dict], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("mtp_loss", ":"), ("val_loss", "o-")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_expert_load(rows: list[dict], out: Path) -> Path | None:
    """Two panels: max/mean load per MoE layer over steps; each expert's share at the last step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if "expert_load_max_mean" in r]
    if not rows:
        return None
    layers = list(rows[-1]["expert_load_max_mean"])
    ratios = np.array([[r["expert_load_max_mean"][name] for r in rows] for name in layers])
    shares = np.array([rows[-1]["expert_load"][name] for name in layers])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.5 * len(layers)),
                                      gridspec_kw={"width_ratios": [3, 2]})
    steps = [r["step"] for r in rows]
    image = left.imshow(ratios, aspect="auto", cmap="magma_r", interpolation="nearest",
                        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
    left.set_yticks(range(len(layers)), layers, fontsize=7)
    left.set_xlabel("step")
    left.set_title("max / mean expert load")
    fig.colorbar(image, ax=left)
    image = right.imshow(shares * shares.shape[1], aspect="auto", cmap="coolwarm", vmin=0, vmax=2,
                         interpolation="nearest")
    right.set_yticks(range(len(layers)), [""] * len(layers))
    right.set_xlabel("expert")
    right.set_title(f"load / mean load at step {steps[-1]}")
    fig.colorbar(image, ax=right)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path, help="directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="where to write PNGs (default: RUN_DIR)")
    args = parser.parse_args(argv)
    try:
        rows = read_metrics(args.run_dir)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    out = args.out or args.run_dir
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_losses(rows, out / "loss.png"), plot_expert_load(rows, out / "expert_load.png")]
    for path in written:
        if path is not None:
            print(path)


if __name__ == "__main__":
    main()
