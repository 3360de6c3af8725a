"""Where metrics go: metrics.jsonl in the run directory, stdout, and wandb when asked."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from dsv3_train.config import LoggerConfig


class MetricsLogger:
    """Appends one JSON object per step to metrics.jsonl; mirrors to stdout and wandb."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, run_config: dict, enabled: bool = True,
                 wandb_id: Optional[str] = None):
        self.cfg, self.enabled = cfg, enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        if enabled and cfg.kind == "wandb":
            self.wandb_run = _start_wandb(cfg, run_dir, run_config, wandb_id)

    @property
    def wandb_id(self) -> Optional[str]:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(_flatten(metrics), step=metrics["step"])

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps > step written after the checkpoint we resume from."""
        if not self.enabled or not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines()
                 if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in lines))

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def format_line(metrics: dict[str, Any]) -> str:
    """A compact one-line summary for stdout."""
    keys = ("step", "loss", "mtp_loss", "balance_loss", "val_loss", "lr", "grad_norm", "tokens_per_s",
            "load_max_mean")
    parts = []
    for key in keys:
        if key in metrics:
            value = metrics[key]
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif not isinstance(value, list):
            flat[f"{prefix}{key}"] = value
    return flat


def _start_wandb(cfg: LoggerConfig, run_dir: Path, run_config: dict, wandb_id: Optional[str]):
    try:
        import wandb
    except ImportError as error:
        raise RuntimeError("logger=wandb needs wandb: pip install wandb (or use logger=stdout)") from error
    mode = cfg.mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(project=cfg.project, group=cfg.group, config=run_config, dir=str(run_dir),
                      mode=mode, id=wandb_id, resume="allow" if wandb_id else None)
