"""The R1 recipe, end to end on a CPU, in minutes per seed (``dsv3-posttrain demo``).

Task: 3-digit addition with a column-by-column chain of thought (tasks/arithmetic.py).
Per seed:
  1. cold start: a rule-based teacher writes well-formatted, locally correct chains of thought but
     drops the carry into the hundreds column 7 times in 10 when there is one (~35 % of its answers
     are wrong, all in that one situation);
  2. SFT a small MoE policy on it: it learns the blind spot, greedy held-out accuracy ~50 %;
  3. GRPO from the SFT policy with accuracy + format rewards: the samples that do carry are
     rewarded, and greedy accuracy rises above 90 %;
  4. controls from the same SFT policy: GRPO with the advantages shuffled over the batch (same
     samples, same updates, no signal), and more SFT on the teacher's data;
  5. rejection sampling from the GRPO policy (4 samples per prompt, verified, deduplicated) and SFT
     of a fresh MoE on it;
  6. distillation: the GRPO policy labels the training prompts greedily and a dense student, over
     4x smaller, is fine-tuned on that.
Writes, under ``out``: per seed the cold-start and rejection-sampled JSONL, every stage's metrics
and results.json; then results.json, table.md and the curves (PNG) over all seeds. CPU time is
process + reaped children (reward workers), ``resource.getrusage``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from dsv3_train.config import ModelConfig
from dsv3_train.model import Transformer
from dsv3_train.posttrain.config import (GRPOConfig, OptimConfig, PosttrainConfig, SampleConfig, SFTConfig,
                                         TaskConfig)
from dsv3_train.posttrain.data import encode_examples, write_jsonl
from dsv3_train.posttrain.distill import dense_student, distill
from dsv3_train.posttrain.grpo import train_grpo
from dsv3_train.posttrain.modeling import count_parameters, save_policy
from dsv3_train.posttrain.rejection import rejection_sample
from dsv3_train.posttrain.rewards import accuracy_reward
from dsv3_train.posttrain.rollout import evaluate
from dsv3_train.posttrain.sft import train_sft
from dsv3_train.posttrain.tasks import SystematicTeacher, make_problems
from dsv3_train.posttrain.tokenizer import CharTokenizer

VOCAB = CharTokenizer().vocab_size
CONTINUED_SFT_STEPS = 120
"""Continued-SFT control: 120 steps x 64 examples = the 60 GRPO steps x 128 samples."""
EVAL_EVERY = 5
REJECTION_PROMPTS = 2000


def demo_config() -> PosttrainConfig:
    """The demonstration's settings (configs/posttrain/arithmetic.yaml holds the same)."""
    moe = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_dense_layers=1, n_heads=4, inter_dim=192,
                      moe_inter_dim=64, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                      n_expert_groups=1, n_limited_groups=1, kv_lora_rank=32, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=16, max_seq_len=96, mtp_depth=0, init_std=0.02)
    student = dataclasses.replace(moe, name="student", dim=32, n_dense_layers=2, inter_dim=64, kv_lora_rank=16)
    return PosttrainConfig(
        model=moe, student=student,
        task=TaskConfig(name="arithmetic", digits=3, n_train=8000, n_test=500, teacher_rate=0.7,
                        teacher_drop_column=2),
        sft=SFTConfig(steps=1000, batch_size=64, micro_batch_size=64, log_every=100,
                      optim=OptimConfig(lr=3e-3, warmup_steps=50, decay_start_frac=0.5, min_lr_ratio=0.1)),
        student_sft=SFTConfig(steps=2000, batch_size=64, micro_batch_size=64, log_every=250,
                              optim=OptimConfig(lr=3e-3, warmup_steps=50, decay_start_frac=0.5, min_lr_ratio=0.1)),
        grpo=GRPOConfig(steps=60, prompts_per_step=16, group_size=8, max_new_tokens=60, micro_batch_size=128,
                        eval_every=EVAL_EVERY, log_every=10, optim=OptimConfig(lr=3e-4, warmup_steps=0)),
        sample=SampleConfig(n_samples=4, temperature=1.0, max_new_tokens=60, batch_size=512),
        threads=1)


def cpu_seconds() -> float:
    """User + system CPU of this process and of its reaped children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _seeded(cfg: PosttrainConfig, seed: int) -> PosttrainConfig:
    cfg = copy.deepcopy(cfg)
    cfg.task.seed = cfg.sft.seed = cfg.student_sft.seed = cfg.grpo.seed = cfg.sample.seed = seed
    return cfg


def _fresh(model_cfg: ModelConfig, seed: int, state: Optional[dict] = None) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(model_cfg)
    if state is not None:
        model.load_state_dict(state)
    return model


def _printer(stage: str, seed: int):
    def log(metrics: dict) -> None:
        shown = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in metrics.items()}
        print(f"[seed {seed} {stage}] {json.dumps(shown)}", flush=True)
    return log


def run_seed(seed: int, base: PosttrainConfig, out: Path) -> dict:
    """Stages 1-6 for one seed; returns the accuracies, curves and CPU seconds."""
    cfg, tok, out = _seeded(base, seed), CharTokenizer(), Path(out)
    train_rows = make_problems("arithmetic", "train", cfg.task.n_train, seed, **cfg.task.options())
    test_rows = make_problems("arithmetic", "test", cfg.task.n_test, seed, **cfg.task.options())
    max_new = cfg.grpo.max_new_tokens

    def held_out(model: Transformer) -> dict:
        return evaluate(model, test_rows, tok, "accuracy", max_new)

    cpu, results, start = {}, {"seed": seed}, cpu_seconds()

    def mark(stage: str) -> None:
        cpu[stage] = cpu_seconds() - start - sum(cpu.values())

    # 1. cold start from the erring teacher
    teacher = SystematicTeacher(cfg.task.teacher_drop_column, cfg.task.teacher_rate, seed)
    cold = [dict(row, completion=teacher.complete(row)) for row in train_rows]
    write_jsonl(out / "cold_start.jsonl", cold)
    teacher_scores = accuracy_reward([], [teacher.complete(row) for row in test_rows], [r["answer"] for r in test_rows])
    results["teacher_rule"] = sum(teacher_scores) / len(test_rows)
    examples = encode_examples(cold, tok)
    # 2. SFT
    policy = _fresh(cfg.model, seed)
    results["sft_curve"] = train_sft(policy, examples, cfg.sft, tok.pad_id, log=_printer("sft", seed))
    results["sft"] = held_out(policy)["accuracy"]
    sft_state = copy.deepcopy(policy.state_dict())
    mark("sft")
    # 3. GRPO
    results["grpo_curve"] = train_grpo(policy, train_rows, tok, cfg.grpo, evaluate_fn=held_out,
                                       log=_printer("grpo", seed))
    results["grpo"] = results["grpo_curve"][-1]["eval/accuracy"]
    save_policy(policy, tok, out / "grpo")
    mark("grpo")
    # 4a. control: shuffled advantages
    control = _fresh(cfg.model, seed, sft_state)
    shuffled = dataclasses.replace(cfg.grpo, shuffle_advantages=True)
    results["shuffled_curve"] = train_grpo(control, train_rows, tok, shuffled, evaluate_fn=held_out,
                                           log=_printer("shuffled", seed))
    results["shuffled"] = results["shuffled_curve"][-1]["eval/accuracy"]
    mark("control_shuffled")
    # 4b. control: continued SFT on the teacher's data, GRPO's learning rate
    control = _fresh(cfg.model, seed, sft_state)
    more_sft = dataclasses.replace(cfg.sft, steps=CONTINUED_SFT_STEPS, optim=cfg.grpo.optim, log_every=20)
    results["continued_sft_curve"] = train_sft(control, examples, more_sft, tok.pad_id, log=_printer("more-sft", seed),
                                               evaluate_fn=held_out, eval_every=2 * EVAL_EVERY)
    results["continued_sft"] = results["continued_sft_curve"][-1]["eval/accuracy"]
    mark("control_sft")
    # 5. rejection sampling from the GRPO policy, SFT of a fresh MoE on it
    kept, results["rejection_stats"] = rejection_sample(policy, train_rows[:REJECTION_PROMPTS], tok, cfg.sample,
                                                        "accuracy")
    write_jsonl(out / "rejection_sampled.jsonl", kept)
    rs_model = _fresh(cfg.model, seed + 1000)
    train_sft(rs_model, encode_examples(kept, tok), cfg.sft, tok.pad_id, log=_printer("rs-sft", seed))
    results["rejection_sft"] = held_out(rs_model)["accuracy"]
    mark("rejection_sampling")
    # 6. distillation into a dense student
    greedy = dataclasses.replace(cfg.sample, n_samples=1, temperature=0.0)
    torch.manual_seed(seed)
    student, report = distill(policy, dense_student(cfg.student), train_rows, tok, greedy, cfg.student_sft, "accuracy",
                              seed=seed, log=_printer("distill", seed))
    results["student"] = held_out(student)["accuracy"]
    results["distill"] = report
    save_policy(student, tok, out / "student")
    mark("distillation")
    results["cpu_s"], results["cpu_total_s"] = cpu, sum(cpu.values())
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


TABLE_COLUMNS = [("teacher_rule", "rule teacher (cold-start data)"), ("sft", "SFT (cold start)"),
                 ("grpo", "GRPO"), ("shuffled", "control: shuffled advantages"),
                 ("continued_sft", "control: continued SFT"), ("rejection_sft", "rejection sampling + SFT"),
                 ("student", "distilled dense student")]


def results_table(runs: Sequence[dict]) -> str:
    """Markdown: one row per seed plus the mean; greedy held-out accuracy in %, CPU minutes."""
    head = "| seed | " + " | ".join(title for _, title in TABLE_COLUMNS) + " | CPU min |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    for run in runs:
        cells = [f"{100 * run[key]:.1f}" for key, _ in TABLE_COLUMNS]
        lines.append(f"| {run['seed']} | " + " | ".join(cells) + f" | {run['cpu_total_s'] / 60:.1f} |")
    means = [f"**{100 * sum(r[key] for r in runs) / len(runs):.1f}**" for key, _ in TABLE_COLUMNS]
    cpu = sum(r["cpu_total_s"] for r in runs) / len(runs) / 60
    lines.append("| mean | " + " | ".join(means) + f" | {cpu:.1f} |")
    return "\n".join(lines)


def plot_curves(runs: Sequence[dict], path: Path, grpo_samples_per_step: int, sft_batch: int) -> Path:
    """Held-out greedy accuracy against sequences trained on, and the rollouts' accuracy reward per
    GRPO step, for GRPO and both controls; one line per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"grpo_curve": ("GRPO", "tab:green"), "shuffled_curve": ("control: shuffled advantages", "tab:red"),
              "continued_sft_curve": ("control: continued SFT", "tab:blue")}
    for key, (label, color) in styles.items():
        per_step = sft_batch if key == "continued_sft_curve" else grpo_samples_per_step
        for i, run in enumerate(runs):
            points = [(h["step"] * per_step / 1000, 100 * h["eval/accuracy"]) for h in run[key] if "eval/accuracy" in h]
            left.plot(*zip(*points), "o-", color=color, alpha=0.75, markersize=3, label=label if i == 0 else None)
            if key != "continued_sft_curve":
                rewards = [(h["step"], 100 * h["reward/accuracy"]) for h in run[key] if "reward/accuracy" in h]
                right.plot(*zip(*rewards), "-", color=color, alpha=0.6, label=label if i == 0 else None)
    left.axhline(90, color="grey", linestyle=":", linewidth=1)
    left.axhline(80, color="grey", linestyle="--", linewidth=1)
    left.set(xlabel="sequences trained on after the cold-start SFT (thousands)", ylabel="held-out greedy accuracy (%)",
             ylim=(-2, 102), title="held-out accuracy (3 seeds)")
    right.set(xlabel="GRPO step (16 prompts x 8 samples)", ylabel="sampled accuracy reward (%)", ylim=(-2, 102),
              title="rollout reward")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(out: Path, seeds: Sequence[int], cfg: Optional[PosttrainConfig] = None,
             docs: Optional[Path] = None) -> list[dict]:
    """Every seed, then the table and curves (also copied to docs/ when given)."""
    cfg = cfg if cfg is not None else demo_config()
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    wall = time.time()
    runs = [run_seed(seed, cfg, out / f"seed_{seed}") for seed in seeds]
    (out / "results.json").write_text(json.dumps(runs, indent=1))
    table = results_table(runs)
    (out / "table.md").write_text(table + "\n")
    teacher_params, _ = count_parameters(_fresh(cfg.model, 0))
    student_params, _ = count_parameters(_fresh(dense_student(cfg.student), 0))
    print(table)
    print(f"teacher (MoE) {teacher_params} parameters, student (dense) {student_params} "
          f"({teacher_params / student_params:.1f}x smaller); wall {time.time() - wall:.0f} s")
    for target in [out] + ([Path(docs) / "img"] if docs else []):
        plot_curves(runs, target / "posttrain-curves.png", cfg.grpo.prompts_per_step * cfg.grpo.group_size,
                    cfg.sft.batch_size)
    return runs
