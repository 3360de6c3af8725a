"""Entry point: ``dsv3-train [hydra overrides]`` or ``python -m dsv3_train.train model=toy ...``.

Composes the config, validates it (one-line errors, before any work), builds data and model,
and hands over to the Trainer.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from dsv3_train.config import Config, ConfigError, register_configs, to_config

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def run(cfg: Config, stop_at: int | None = None) -> list[dict]:
    """Train one run described by cfg (resuming its latest checkpoint when there is one);
    returns the metrics of the steps run. ``stop_at`` ends early after that step."""
    from dsv3_train.data import build_dataset, check_source
    from dsv3_train.metrics import MetricsLogger
    from dsv3_train.model import Transformer
    from dsv3_train.trainer import Trainer

    check_source(cfg.data)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(cfg.data, cfg.model.vocab_size, progress=cfg.logger.progress)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    trainer = Trainer(cfg, model, dataset, run_dir)
    resumed = trainer.resume()
    wandb_id = None
    if resumed is not None:
        print(f"resumed from {resumed} at step {trainer.step}")
        wandb_id = _read_wandb_id(resumed)
    logger = MetricsLogger(cfg.logger, run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)),
                           wandb_id=wandb_id)
    if resumed is not None:
        logger.truncate_after(trainer.step)
    trainer.logger = logger
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {cfg.model.name}: {n_params / 1e6:.2f}M parameters; run dir {run_dir}")
    try:
        return trainer.fit(stop_at)
    finally:
        logger.close()


def _read_wandb_id(checkpoint: Path):
    import json

    return json.loads((checkpoint / "trainer_state.json").read_text()).get("wandb_id")


register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
def main(composed: DictConfig) -> None:
    try:
        cfg = to_config(composed)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    try:
        run(cfg)
    except ConfigError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
