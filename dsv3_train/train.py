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
    returns the metrics of the steps run. ``stop_at`` ends early after that step.

    Launched by torchrun with WORLD_SIZE > 1, it joins the process group, builds the mesh, shards
    the model (experts over ep, ZeRO over dp) and trains with rank 0 logging."""
    from dsv3_train.data import check_source
    from parallel import distributed

    from dsv3_train.trainer import resolve_device

    check_source(cfg.data)
    dims = distributed.check_launch(cfg)  # refuses a bad layout before any process group exists
    device = resolve_device(cfg.train.device)
    if cfg.precision.uses_te:
        from dsv3_train.precision.te import require_transformer_engine

        require_transformer_engine()  # one-line error with the install hint; never a silent fallback
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    owns_group = not torch.distributed.is_initialized()  # a test harness may have joined already
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = distributed.init_mesh(dims, device.type) if dims.world_size > 1 else None
    try:
        return _train(cfg, mesh, device, stop_at)
    finally:
        if mesh is not None and owns_group:
            distributed.destroy()


def _train(cfg: Config, mesh, device: torch.device, stop_at: int | None) -> list[dict]:
    from dsv3_train.data import build_dataset
    from dsv3_train.metrics import MetricsLogger
    from dsv3_train.model import Transformer
    from dsv3_train.trainer import Trainer
    from parallel import distributed

    is_main = mesh is None or torch.distributed.get_rank() == 0
    run_dir = Path(cfg.run_dir)
    if is_main:  # rank 0 builds the token cache; the others then read it
        run_dir.mkdir(parents=True, exist_ok=True)
        dataset = build_dataset(cfg.data, cfg.model.vocab_size, progress=cfg.logger.progress)
    if mesh is not None:
        torch.distributed.barrier()
    if not is_main:
        dataset = build_dataset(cfg.data, cfg.model.vocab_size, progress=False)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = Transformer(cfg.model, cfg.precision).to(device)  # initialised on the CPU RNG, then moved
    n_params = sum(p.numel() for p in model.parameters())
    runtime = None
    if mesh is not None and cfg.parallel.pp > 1:  # this rank's stages become the trainer's model
        from dsv3_train.trainer import autocast_context
        from parallel.pipeline.runtime import build_pipeline

        model, runtime = build_pipeline(model, mesh, cfg.parallel.schedule, cfg.train.grad_accum,
                                        zero_stage=cfg.parallel.zero_stage, overlap=cfg.parallel.overlap,
                                        autocast=lambda: autocast_context(cfg.train.precision, device.type))
    elif mesh is not None:
        distributed.parallelize(model, mesh, cfg.parallel.zero_stage)
        runtime = distributed.DistributedRuntime(mesh, model, cfg.train)
    trainer = Trainer(cfg, model, dataset, run_dir, runtime=runtime)
    resumed = trainer.resume()
    wandb_id = None
    if resumed is not None and is_main:
        print(f"resumed from {resumed} at step {trainer.step}")
        wandb_id = _read_wandb_id(resumed)
    if is_main:
        logger = MetricsLogger(cfg.logger, run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)),
                               wandb_id=wandb_id)
        if resumed is not None:
            logger.truncate_after(trainer.step)
        trainer.logger = logger
        layout = _describe_layout(mesh.dims, cfg.parallel.schedule) if mesh else ""
        print(f"model {cfg.model.name}: {n_params / 1e6:.2f}M parameters{layout}; run dir {run_dir}")
    try:
        return trainer.fit(stop_at)
    finally:
        if trainer.logger is not None:
            trainer.logger.close()


def _describe_layout(dims, schedule: str) -> str:
    parts = ([f"pp {dims.pp} ({schedule})"] if dims.pp > 1 else []) + [f"dp {dims.dp}", f"ep {dims.ep}"]
    return f" on {dims.world_size} ranks ({', '.join(parts)})"


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
