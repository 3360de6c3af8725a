"""Auxiliary-loss-free balancing on the toy model: the same run with gamma = 0.001 and gamma = 0.

Trains the default toy configuration twice (only train.bias_update_speed differs) and prints final
validation loss and the max/mean expert load (averaged over the last 10 % of steps, per MoE layer
and overall). Usage: python bench/router_balance.py [--steps 300] [hydra overrides...]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from hydra import compose, initialize_config_dir

from dsv3_train.config import register_configs, to_config
from dsv3_train.train import CONFIG_DIR, run


def train(gamma: float, steps: int, overrides: list[str], out: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        composed = compose(config_name="config", overrides=[
            f"run_dir={out}/gamma{gamma}", f"train.steps={steps}", f"train.bias_update_speed={gamma}",
            "checkpoint.resume=never", "checkpoint.every=0", "logger.progress=false", *overrides])
    start = time.perf_counter()
    history = run(to_config(composed))
    tail = history[-max(1, steps // 10):]
    layers = list(tail[-1]["expert_load_max_mean"])
    per_layer = {name: statistics.mean(m["expert_load_max_mean"][name] for m in tail) for name in layers}
    return {"gamma": gamma, "val_loss": history[-1]["val_loss"], "per_layer": per_layer,
            "max_mean": statistics.mean(per_layer.values()), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    register_configs()
    with tempfile.TemporaryDirectory() as out:
        rows = [train(gamma, args.steps, args.overrides, out) for gamma in (0.001, 0.0)]
    layers = list(rows[0]["per_layer"])
    print(f"\n| gamma | final val loss | max/mean load (mean of layers) | "
          + " | ".join(layers) + " | seconds |")
    print("|---|---|---|" + "---|" * len(layers) + "---|")
    for r in rows:
        print(f"| {r['gamma']} | {r['val_loss']:.3f} | {r['max_mean']:.2f} | "
              + " | ".join(f"{r['per_layer'][n]:.2f}" for n in layers) + f" | {r['seconds']:.0f} |")
    on, off = rows
    print(f"\nmax/mean with gamma=0.001 is {on['max_mean'] / off['max_mean']:.2f}x that with gamma=0; "
          f"val loss differs by {100 * (on['val_loss'] - off['val_loss']) / off['val_loss']:+.1f} %")


if __name__ == "__main__":
    main()
