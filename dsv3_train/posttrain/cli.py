"""``dsv3-posttrain``: the DeepSeek-R1 post-training stages on our model.

    dsv3-posttrain cold-start        --config C --out cold.jsonl       # teacher-written CoT data
    dsv3-posttrain sft               --config C --data cold.jsonl --out runs/sft [--init DIR]
    dsv3-posttrain grpo              --config C --policy runs/sft --out runs/grpo
    dsv3-posttrain rejection-sample  --config C --policy runs/grpo --out rs.jsonl
    dsv3-posttrain distill           --config C --teacher runs/grpo --out runs/student
    dsv3-posttrain eval              --config C --policy DIR
    dsv3-posttrain demo              --out runs/r1-demo --seeds 0 1 2  # the whole documented experiment

C is a YAML preset (configs/posttrain/*.yaml) merged onto PosttrainConfig; trailing ``key=value``
arguments override it (``grpo.beta=0.04 grpo.loss_aggregation=token-mean``). Under torchrun with
several processes, sft and grpo run data parallel over full replicas (gloo on CPU); rank 0 writes.
Equivalently ``python -m dsv3_train.posttrain ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from dsv3_train.config import ConfigError, LoggerConfig
from dsv3_train.metrics import MetricsLogger
from dsv3_train.posttrain.config import PosttrainConfig, load_config
from dsv3_train.posttrain.data import encode_examples, read_jsonl, write_jsonl
from dsv3_train.posttrain.replicas import Replicas, SingleProcess
from dsv3_train.posttrain.tasks import ACCURACY_REWARD, make_problems
from dsv3_train.posttrain.tokenizer import CharTokenizer


def task_rows(cfg: PosttrainConfig, split: str) -> list[dict]:
    n = cfg.task.n_train if split == "train" else cfg.task.n_test
    return make_problems(cfg.task.name, split, n, cfg.task.seed, **cfg.task.options())


def accuracy_reward_of(cfg: PosttrainConfig) -> str:
    return ACCURACY_REWARD[cfg.task.name]


def _start_runtime():
    """Replicas over the launched processes (torchrun), else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return SingleProcess()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Replicas()


def _stop_runtime(runtime) -> None:
    if isinstance(runtime, Replicas):
        import torch.distributed as dist
        dist.barrier()  # no rank leaves while another still has gloo work in flight
        dist.destroy_process_group()


def _logger(out: Path, runtime):
    """A function that prints a compact line and appends the metrics to out/metrics.jsonl (rank 0)."""
    if runtime.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    writer = MetricsLogger(LoggerConfig(), out, {}, enabled=runtime.rank == 0)

    def log(metrics: dict) -> None:
        writer.log(metrics)
        if runtime.rank == 0:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()),
                  flush=True)
    return log


def _policy(args, cfg: PosttrainConfig, key: str):
    from dsv3_train.model import Transformer
    from dsv3_train.posttrain.modeling import load_policy

    path = getattr(args, key, None)
    if path:
        return load_policy(path)
    tokenizer = CharTokenizer()
    if cfg.model.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) must equal the character tokenizer's "
                          f"{tokenizer.vocab_size}: set model.vocab_size={tokenizer.vocab_size}")
    torch.manual_seed(cfg.sft.seed)
    return Transformer(cfg.model), tokenizer


def cmd_cold_start(args, cfg: PosttrainConfig, runtime) -> None:
    from dsv3_train.posttrain.tasks import SystematicTeacher, countdown_teacher

    rows = task_rows(cfg, "train")
    if cfg.task.name == "arithmetic":
        teacher = SystematicTeacher(cfg.task.teacher_drop_column, cfg.task.teacher_rate, cfg.task.seed)
        rows = [dict(row, completion=teacher.complete(row)) for row in rows]
    else:
        rows = [dict(row, completion=countdown_teacher(row)) for row in rows]
    print(f"wrote {len(rows)} rows to {write_jsonl(args.out, rows)}")


def cmd_sft(args, cfg: PosttrainConfig, runtime) -> None:
    from dsv3_train.posttrain.modeling import save_policy
    from dsv3_train.posttrain.sft import train_sft

    model, tokenizer = _policy(args, cfg, "init")
    runtime.broadcast_parameters(model)
    examples = encode_examples(read_jsonl(args.data), tokenizer)
    train_sft(model, examples, cfg.sft, tokenizer.pad_id, runtime, _logger(Path(args.out), runtime))
    if runtime.rank == 0:
        save_policy(model, tokenizer, args.out)


def cmd_grpo(args, cfg: PosttrainConfig, runtime) -> None:
    from dsv3_train.posttrain.grpo import train_grpo
    from dsv3_train.posttrain.modeling import save_policy
    from dsv3_train.posttrain.rollout import evaluate

    policy, tokenizer = _policy(args, cfg, "policy")
    runtime.broadcast_parameters(policy)
    prompts = read_jsonl(args.prompts) if args.prompts else task_rows(cfg, "train")
    test = task_rows(cfg, "test")

    def held_out(model):
        return evaluate(model, test, tokenizer, accuracy_reward_of(cfg), cfg.grpo.max_new_tokens, runtime)

    train_grpo(policy, prompts, tokenizer, cfg.grpo, runtime, held_out, _logger(Path(args.out), runtime))
    if runtime.rank == 0:
        save_policy(policy, tokenizer, args.out)


def cmd_rejection_sample(args, cfg: PosttrainConfig, runtime) -> None:
    from dsv3_train.posttrain.modeling import load_policy
    from dsv3_train.posttrain.rejection import rejection_sample

    policy, tokenizer = load_policy(args.policy)
    kept, stats = rejection_sample(policy, task_rows(cfg, "train"), tokenizer, cfg.sample, accuracy_reward_of(cfg),
                                   cfg.grpo.reward_workers)
    write_jsonl(args.out, kept)
    print(json.dumps(stats))


def cmd_distill(args, cfg: PosttrainConfig, runtime) -> None:
    from dsv3_train.posttrain.distill import dense_student, distill
    from dsv3_train.posttrain.modeling import load_policy, save_policy
    from dsv3_train.posttrain.rollout import evaluate

    teacher, tokenizer = load_policy(args.teacher)
    student_cfg = dense_student(cfg.student)
    student, report = distill(teacher, student_cfg, task_rows(cfg, "train"), tokenizer, cfg.sample, cfg.student_sft,
                              accuracy_reward_of(cfg), args.verified_only, cfg.student_sft.seed, runtime,
                              _logger(Path(args.out), runtime))
    test = task_rows(cfg, "test")
    for name, model in (("teacher", teacher), ("student", student)):
        report[f"{name}_accuracy"] = evaluate(model, test, tokenizer, accuracy_reward_of(cfg),
                                              cfg.sample.max_new_tokens, runtime)["accuracy"]
    if runtime.rank == 0:
        save_policy(student, tokenizer, args.out)
        (Path(args.out) / "distill.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report))


def cmd_eval(args, cfg: PosttrainConfig, runtime) -> None:
    from dsv3_train.posttrain.modeling import load_policy
    from dsv3_train.posttrain.rollout import evaluate

    policy, tokenizer = load_policy(args.policy)
    print(json.dumps(evaluate(policy, task_rows(cfg, "test"), tokenizer, accuracy_reward_of(cfg),
                              cfg.sample.max_new_tokens, runtime)))


def cmd_demo(args, cfg: PosttrainConfig, runtime) -> None:
    from dsv3_train.posttrain.demo import run_demo

    run_demo(Path(args.out), args.seeds, cfg, docs=Path(args.docs) if args.docs else None)


COMMANDS = {"cold-start": cmd_cold_start, "sft": cmd_sft, "grpo": cmd_grpo, "rejection-sample": cmd_rejection_sample,
            "distill": cmd_distill, "eval": cmd_eval, "demo": cmd_demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3-posttrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        cmd = sub.add_parser(name)
        cmd.add_argument("--config", action="append", default=[],
                         help="YAML preset (configs/posttrain/*.yaml); repeat to merge several in order")
        cmd.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grpo.beta=0.04")
        cmd.add_argument("--out", required=name not in ("eval", "demo"),
                         default="runs/r1-demo" if name == "demo" else None,
                         help="output file (cold-start, rejection-sample) or directory")
        if name == "sft":
            cmd.add_argument("--data", required=True, help="JSONL of prompt/completion rows")
            cmd.add_argument("--init", help="policy directory to start from (default: a fresh model)")
        if name in ("grpo", "rejection-sample", "eval"):
            cmd.add_argument("--policy", required=True, help="policy directory (written by sft or grpo)")
        if name == "grpo":
            cmd.add_argument("--prompts", help="JSONL of prompts + reward columns (default: the task's train split)")
        if name == "distill":
            cmd.add_argument("--teacher", required=True, help="teacher policy directory")
            cmd.add_argument("--verified-only", action="store_true", help="keep only verified-correct teacher outputs")
        if name == "demo":
            cmd.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
            cmd.add_argument("--docs", help="also write the table and curves here (e.g. docs)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        base = None
        if args.command == "demo":  # the demonstration's own settings unless presets are given
            from dsv3_train.posttrain.demo import demo_config
            base = demo_config()
        cfg = load_config(args.config, args.overrides, base)
    except (ConfigError, ValueError) as error:
        sys.exit(f"error: {error}")
    torch.set_num_threads(cfg.threads)
    runtime = _start_runtime()
    try:
        COMMANDS[args.command](args, cfg, runtime)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    finally:
        _stop_runtime(runtime)
