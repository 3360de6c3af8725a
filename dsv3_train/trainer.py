"""The training loop: micro-batches, optimizer step, bias update, validation, metrics, checkpoints.

Everything that differs between one process and many goes through a *runtime*: ``LocalRuntime``
below, or ``parallel.distributed.DistributedRuntime``, which slices the global batch by data-parallel
rank, synchronises gradients once per step, clips by the global norm over all shards, sums expert
loads over ranks before the bias update, averages metrics, and shards checkpoints.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from dsv3_train import schedule
from dsv3_train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dsv3_train.config import Config, ConfigError, TrainConfig
from dsv3_train.data import PackedSampler, TokenDataset, validation_batches
from dsv3_train.metrics import MetricsLogger, format_line
from dsv3_train.model import Transformer, update_expert_biases
from dsv3_train.precision import keep_moments_in_bf16


class LocalRuntime:
    """One process: no slicing, no communication. Runs a step's micro-batches one after another;
    ``parallel.distributed.DistributedRuntime`` reuses the loop and adds the collectives, and the
    pipeline runtime replaces it with its schedule."""

    dp_rank, dp_size, is_main = 0, 1, True
    reduce_load = None
    checkpoint_layout = None

    def __init__(self, train: TrainConfig):
        self.train = train

    def forward_backward(self, model: torch.nn.Module, batch: torch.Tensor, mtp_weight: float,
                         eos_id: Optional[int]) -> dict:
        """Forward and backward of every micro-batch of this rank's batch, gradients reduced once,
        after the last. loss: next-token cross-entropy (comparable to val_loss); total_loss: what
        is optimised."""
        tc = self.train
        sums = {"loss": 0.0, "total_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        for index, micro_batch in enumerate(batch.chunk(tc.grad_accum)):
            self.grad_sync(model, index == tc.grad_accum - 1)
            with autocast_context(tc.precision, micro_batch.device.type):
                terms = model.loss(micro_batch, mtp_weight, eos_id)
            (terms.total / tc.grad_accum).backward()
            sums["loss"] += terms.main.item() / tc.grad_accum
            sums["total_loss"] += terms.total.item() / tc.grad_accum
            sums["mtp_loss"] += sum(m.item() for m in terms.mtp) / max(1, len(terms.mtp)) / tc.grad_accum
            sums["balance_loss"] += terms.balance.item() / tc.grad_accum
        return sums

    def evaluate_loss(self, model: torch.nn.Module, batch: torch.Tensor, eos_id: Optional[int]) -> float:
        with autocast_context(self.train.precision, batch.device.type):
            return model.loss(batch, 0.0, eos_id).main.item()

    def grad_sync(self, model: torch.nn.Module, enabled: bool) -> None:
        pass

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def mean(self, values: list[float]) -> list[float]:
        return values

    def all_loads(self, loads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every MoE layer's expert loads by its name in the Transformer (a pipeline rank holds
        only its own stages')."""
        return loads

    def reshard(self, model: torch.nn.Module) -> None:
        pass


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (ndim >= 2) and none on norm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def autocast_context(precision: str, device_type: str = "cpu"):
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    """train.device -> this process's device: auto picks its CUDA GPU (LOCAL_RANK) when one is
    visible; cuda without a GPU is refused (before any process group exists)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device ({name!r}) needs a CUDA GPU but torch {torch.__version__} sees "
                          f"none: install a CUDA build of torch (see the README) or set train.device=cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


class Trainer:
    """Trains ``model`` (already parallelised when ``runtime`` is distributed); the global batch is
    micro_batch_size x grad_accum x dp sequences."""

    def __init__(self, cfg: Config, model: Transformer, dataset: TokenDataset, run_dir: Path,
                 logger: Optional[MetricsLogger] = None, runtime=None):
        self.cfg, self.model, self.dataset = cfg, model, dataset
        self.run_dir = Path(run_dir)
        self.logger = logger
        self.runtime = runtime if runtime is not None else LocalRuntime(cfg.train)
        self.device = next(model.parameters()).device  # batches follow the model
        tc, rt = cfg.train, self.runtime
        self.optimizer = build_optimizer(model, tc)
        if cfg.precision.bf16_optimizer_moments:
            keep_moments_in_bf16(self.optimizer)
        global_batch = tc.micro_batch_size * tc.grad_accum * rt.dp_size
        self.sampler = PackedSampler(dataset.train, tc.seq_len, global_batch, tc.seed, rt.dp_rank, rt.dp_size)
        self.val_batches = validation_batches(dataset.val, tc.seq_len, tc.micro_batch_size, tc.eval_batches)
        self.tokens_per_step = global_batch * tc.seq_len
        self.step = 0
        self.history: list[dict] = []

    # ----------------------------------------------------------------- state
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self) -> Path:
        self.runtime.reshard(self.model)  # ZeRO shards, not gathered parameters, go to disk
        state = {"step": self.step, "sampler": self.sampler.state_dict(),
                 "wandb_id": self.logger.wandb_id if self.logger else None}
        return save_checkpoint(self.checkpoint_root, self.step, self.model, self.optimizer, state,
                               keep_last=self.cfg.checkpoint.keep_last,
                               layout=self.runtime.checkpoint_layout)

    def resume(self) -> Optional[Path]:
        """Restore from checkpoint.resume ('auto': the run's latest); returns the path used."""
        choice = self.cfg.checkpoint.resume
        if choice == "never":
            return None
        path = latest_checkpoint(self.checkpoint_root) if choice == "auto" else Path(choice)
        if path is None:
            return None
        self.runtime.reshard(self.model)
        state = load_checkpoint(path, self.model, self.optimizer, layout=self.runtime.checkpoint_layout)
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        return path

    # ------------------------------------------------------------------ loop
    def fit(self, stop_at: Optional[int] = None) -> list[dict]:
        """Train until train.steps (or stop early after step stop_at, as a crash would); returns
        the metrics of every step run here."""
        tc = self.cfg.train
        last = tc.steps if stop_at is None else min(stop_at, tc.steps)
        progress = tqdm(total=tc.steps, initial=self.step, desc="train", dynamic_ncols=True,
                        disable=not (self.runtime.is_main and self.logger and self.logger.enabled
                                     and self.cfg.logger.progress))
        while self.step < last:
            metrics = self.train_step()
            if self._due(tc.eval_every) or self.step == 1:
                metrics["val_loss"] = self.evaluate()
            self._report(metrics, progress)
            every = self.cfg.checkpoint.every
            if (every and self.step % every == 0) or self.step == tc.steps:
                self.save()
        progress.close()
        return self.history

    def _due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.cfg.train.steps

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns its metrics."""
        tc, step = self.cfg.train, self.step
        start = time.perf_counter()
        lr = schedule.learning_rate(tc, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        lam = schedule.mtp_weight(tc, step)
        self.model.train()
        rt = self.runtime
        batch = self.sampler.next_batch().to(self.device, non_blocking=True)
        sums = rt.forward_backward(self.model, batch, lam, self._eos_id())
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        grad_norm = rt.clip_grad_norm(self.model, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loads = rt.all_loads(update_expert_biases(self.model, schedule.bias_update_speed(tc, step),
                                                  rt.reduce_load))
        sums = dict(zip(sums, rt.mean(list(sums.values()))))
        self.step += 1
        elapsed = time.perf_counter() - start
        return {"step": self.step, **sums, "lr": lr, "mtp_weight": lam, "grad_norm": grad_norm.item(),
                "tokens_per_s": self.tokens_per_step / elapsed, **_load_metrics(loads)}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy on the fixed held-out batches (every rank runs all of
        them: expert parallelism needs every rank of an ep group in each forward)."""
        self.model.eval()
        losses = [self.runtime.evaluate_loss(self.model, batch.to(self.device), self._eos_id())
                  for batch in self.val_batches]
        self.model.train()
        return sum(losses) / len(losses)

    def _eos_id(self) -> Optional[int]:
        return self.dataset.eos_id if self.cfg.train.mask_cross_document else None

    def _report(self, metrics: dict, progress: tqdm) -> None:
        self.history.append(metrics)
        if not self.runtime.is_main or self.logger is None or not self.logger.enabled:
            return
        self.logger.log(metrics)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
        if "val_loss" in metrics or self._due(self.cfg.train.log_every):
            progress.write(format_line(metrics))


def _load_metrics(loads: dict[str, torch.Tensor]) -> dict:
    """Per MoE layer: max/mean expert load, and the load fraction of every expert."""
    if not loads:
        return {}
    ratios = {name: (load.max() / load.mean().clamp_min(1e-9)).item() for name, load in loads.items()}
    fractions = {name: (load / load.sum().clamp_min(1e-9)).tolist() for name, load in loads.items()}
    return {"load_max_mean": max(ratios.values()), "expert_load_max_mean": ratios,
            "expert_load": fractions}
