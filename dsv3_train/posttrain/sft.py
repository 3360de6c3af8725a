"""Supervised fine-tuning: cross-entropy on completion tokens only, optionally packed.

One optimizer step takes ``batch_size`` examples (over all data-parallel ranks); each rank takes
its slice and splits it into micro-batches. The loss is the mean over *all* completion tokens of
the step: each micro-batch contributes sum(CE) / N_tokens(global), so micro-batching and data
parallelism change nothing but rounding. The MoE sequence-wise balance loss is not added: it
would count padding tokens (and so depend on how examples are batched); balance is left to the
bias updates of auxiliary-loss-free balancing.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from dsv3_train import schedule
from dsv3_train.model import Transformer
from dsv3_train.model.transformer import IGNORE_INDEX
from dsv3_train.posttrain.config import SFTConfig
from dsv3_train.posttrain.data import Example, ShuffledEpochs, TokenBatch, packed_batch, padded_batch
from dsv3_train.posttrain.modeling import expert_load_imbalance, forward_logits, packed_forward
from dsv3_train.posttrain.replicas import SingleProcess
from dsv3_train.trainer import build_optimizer


def micro_batches(examples: Sequence[Example], cfg: SFTConfig, pad_id: int) -> list[TokenBatch]:
    chunks = [examples[i:i + cfg.micro_batch_size] for i in range(0, len(examples), cfg.micro_batch_size)]
    if cfg.packing:
        return [packed_batch(chunk, cfg.seq_len, pad_id) for chunk in chunks]
    return [padded_batch(chunk, pad_id) for chunk in chunks]


def completion_loss_sum(model: Transformer, batch: TokenBatch) -> torch.Tensor:
    """Sum of the token cross-entropies over the completion targets of one micro-batch."""
    if batch.positions is not None:
        logits, _ = packed_forward(model, batch.inputs, batch.positions, batch.doc_ids)
    else:
        logits, _ = forward_logits(model, batch.inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def sft_step(model: Transformer, optimizer: torch.optim.Optimizer, examples: Sequence[Example], cfg: SFTConfig,
             pad_id: int, runtime=SingleProcess()) -> dict:
    """One optimizer step on ``examples`` (the global batch; this rank takes its slice)."""
    batches = micro_batches(runtime.shard(examples), cfg, pad_id)
    (n_tokens,) = runtime.sum([sum(b.n_targets for b in batches)])
    model.train()
    loss_sum = 0.0
    for batch in batches:
        ce = completion_loss_sum(model, batch)
        (ce / n_tokens).backward()
        loss_sum += float(ce.detach())
    runtime.sum_gradients(model)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    (loss_total,) = runtime.sum([loss_sum])
    metrics = {"loss": loss_total / n_tokens, "grad_norm": float(grad_norm), "tokens": int(n_tokens)}
    imbalance = expert_load_imbalance(model, cfg.bias_update_speed, runtime)
    if imbalance is not None:
        metrics["load_max_mean"] = imbalance
    return metrics


def train_sft(model: Transformer, examples: Sequence[Example], cfg: SFTConfig, pad_id: int, runtime=SingleProcess(),
              log: Optional[Callable[[dict], None]] = None,
              evaluate_fn: Optional[Callable[[Transformer], dict]] = None, eval_every: int = 0) -> list[dict]:
    """cfg.steps optimizer steps over shuffled epochs of ``examples``. Returns the metrics of every
    log_every-th step, and of every eval_every-th step with ``evaluate_fn(model)`` as "eval/..."
    (evaluations after steps 0, eval_every, ... and after the last)."""
    train_cfg = cfg.optim.train_config(cfg.steps)
    optimizer = build_optimizer(model, train_cfg)
    epochs = ShuffledEpochs(len(examples), f"sft-{cfg.seed}")
    history, start = [], time.process_time()
    for step in range(cfg.steps):
        batch = [examples[i] for i in epochs.take(cfg.batch_size)]
        for group in optimizer.param_groups:
            group["lr"] = schedule.learning_rate(train_cfg, step)
        metrics = sft_step(model, optimizer, batch, cfg, pad_id, runtime)
        metrics.update(step=step, lr=optimizer.param_groups[0]["lr"])
        evaluate_now = evaluate_fn is not None and eval_every and (step % eval_every == 0 or step == cfg.steps - 1)
        if evaluate_now:
            metrics.update({f"eval/{k}": v for k, v in evaluate_fn(model).items()})
        if evaluate_now or step % cfg.log_every == 0 or step == cfg.steps - 1:
            metrics["cpu_s"] = time.process_time() - start
            history.append(metrics)
            if log is not None:
                log(metrics)
    return history
