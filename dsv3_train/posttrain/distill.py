"""Distillation (DeepSeek-R1 section 2.4): a teacher generates on a prompt set, a smaller dense
student is fine-tuned on its outputs with plain SFT (no RL for the student).

The student is our Transformer with every FFN dense (``dense_student`` sets n_dense_layers =
n_layers); its accuracy is reported beside the teacher's.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from dsv3_train.config import ModelConfig
from dsv3_train.model import Transformer
from dsv3_train.posttrain.config import SampleConfig, SFTConfig
from dsv3_train.posttrain.data import encode_examples
from dsv3_train.posttrain.modeling import count_parameters
from dsv3_train.posttrain.rejection import keep_verified, sample_completions, without_labels
from dsv3_train.posttrain.replicas import SingleProcess
from dsv3_train.posttrain.sft import train_sft
from dsv3_train.posttrain.tokenizer import CharTokenizer


def dense_student(cfg: ModelConfig) -> ModelConfig:
    """cfg with every block dense (no MoE) and no MTP."""
    return dataclasses.replace(cfg, n_dense_layers=cfg.n_layers, mtp_depth=0)


def teacher_dataset(teacher: Transformer, rows: Sequence[dict], tokenizer: CharTokenizer, cfg: SampleConfig,
                    accuracy_reward: str, verified_only: bool, reward_workers: int = 1) -> tuple[list[dict], dict]:
    """The teacher's completions of rows as SFT rows (only verified ones when verified_only)."""
    samples = sample_completions(teacher, rows, tokenizer, cfg, accuracy_reward, reward_workers)
    kept = keep_verified(samples) if verified_only else [without_labels(s) for s in samples]
    stats = {"teacher_samples": len(samples), "kept": len(kept),
             "teacher_sample_accuracy": sum(s["correct"] for s in samples) / len(samples)}
    return kept, stats


def distill(teacher: Transformer, student_cfg: ModelConfig, rows: Sequence[dict], tokenizer: CharTokenizer,
            sample_cfg: SampleConfig, sft_cfg: SFTConfig, accuracy_reward: str, verified_only: bool = False,
            seed: int = 0, runtime=SingleProcess(), log: Optional[Callable[[dict], None]] = None
            ) -> tuple[Transformer, dict]:
    """Generate with the teacher on rows, SFT a fresh student on it; returns (student, report)."""
    data, report = teacher_dataset(teacher, rows, tokenizer, sample_cfg, accuracy_reward, verified_only)
    torch.manual_seed(seed)
    student = Transformer(student_cfg)
    runtime.broadcast_parameters(student)
    train_sft(student, encode_examples(data, tokenizer), sft_cfg, tokenizer.pad_id, runtime, log)
    teacher_total, teacher_active = count_parameters(teacher)
    student_total, student_active = count_parameters(student)
    report.update(teacher_params=teacher_total, teacher_active_params=teacher_active, student_params=student_total,
                  student_active_params=student_active, size_ratio=teacher_total / student_total)
    return student, report
