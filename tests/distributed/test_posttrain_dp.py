"""Post-training with dp=2 replicas on gloo equals one process on the same batch.

SFT: one optimizer step on 8 examples, with and without packing;
GRPO: mu = 2 inner updates on 12 fixed rollouts with routing replay and a k3 KL term, for each loss
aggregation. The reference is the same function run in this process on the whole batch; SGD keeps
the comparison free of Adam's amplification of rounding. A short train_grpo run checks that the
replicas stay bit-identical, and the command line runs under torchrun.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3_train.config import ModelConfig
from dsv3_train.model import Transformer
from dsv3_train.posttrain.config import GRPOConfig, OptimConfig, SFTConfig
from dsv3_train.posttrain.data import encode_examples
from dsv3_train.posttrain.grpo import grpo_update, train_grpo
from dsv3_train.posttrain.replicas import Replicas, SingleProcess
from dsv3_train.posttrain.rollout import evaluate, sample_rollouts
from dsv3_train.posttrain.sft import sft_step
from dsv3_train.posttrain.tasks import SystematicTeacher, addition_problems
from dsv3_train.posttrain.tokenizer import CharTokenizer
from parallel.testing import run_ranks

TOK = CharTokenizer()
ATOL, RTOL = 1e-6, 1e-5


def tiny_moe(seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_dense_layers=1, n_heads=2, inter_dim=64,
                      moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2, n_expert_groups=1,
                      n_limited_groups=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                      max_seq_len=64, mtp_depth=0, init_std=0.1)
    torch.manual_seed(seed)
    return Transformer(cfg)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _sft_examples():
    rows = addition_problems("train", 8, seed=0, digits=2)
    teacher = SystematicTeacher(rate=0.5)
    return encode_examples([dict(r, completion=teacher.complete(r)) for r in rows], TOK)


def _sft(runtime, packing: bool) -> torch.Tensor:
    model = tiny_moe()
    cfg = SFTConfig(batch_size=8, micro_batch_size=3, packing=packing, seq_len=64, optim=OptimConfig(grad_clip=0))
    sft_step(model, torch.optim.SGD(model.parameters(), lr=0.5), _sft_examples(), cfg, TOK.pad_id, runtime)
    return _flat(model)


def _rollouts():
    model = tiny_moe()
    rows = addition_problems("train", 4, seed=0, digits=2)
    rollouts = sample_rollouts(model, rows, TOK, 3, 10, temperature=1.0,
                               generator=torch.Generator().manual_seed(0), record=True)
    advantages = [((i * 7) % 5 - 2) / 2 for i in range(len(rollouts))]
    scored = [i != 4 for i in range(len(rollouts))]  # one sample unscored
    return rollouts, advantages, scored


def _grpo(runtime, mode: str, share: slice) -> torch.Tensor:
    model, reference = tiny_moe(), tiny_moe(seed=1)
    rollouts, advantages, scored = _rollouts()
    cfg = GRPOConfig(loss_aggregation=mode, inner_updates=2, beta=0.05, eps_low=0.05, eps_high=0.08,
                     max_new_tokens=10, micro_batch_size=4, routing_replay=True, optim=OptimConfig(grad_clip=0))
    grpo_update(model, torch.optim.SGD(model.parameters(), lr=0.5), rollouts[share], advantages[share],
                scored[share], cfg, TOK.pad_id, runtime, reference)
    return _flat(model)


def _train_rank(rank, world_size):
    runtime = Replicas()
    model = tiny_moe(seed=rank)  # different on purpose: the broadcast makes them equal
    runtime.broadcast_parameters(model)
    rows = addition_problems("train", 16, seed=0, digits=2)
    cfg = GRPOConfig(steps=2, prompts_per_step=4, group_size=2, max_new_tokens=8, beta=0.01, eval_every=2,
                     reward_workers=0, routing_replay=True, bias_update_speed=0.01)
    history = train_grpo(model, rows, TOK, cfg, runtime,
                         evaluate_fn=lambda m: evaluate(m, rows[:4], TOK, "accuracy", 8, runtime))
    buffers = torch.cat([b.flatten() for b in model.buffers() if b.dtype == torch.float32])
    return _flat(model), buffers, history[-1]["eval/accuracy"]


MODES = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


def _rank(rank, world_size):
    """Everything on one pair of ranks (spawning is the slow part)."""
    runtime = Replicas()
    share = slice(rank * 6, (rank + 1) * 6)
    return {"sft": {packing: _sft(runtime, packing) for packing in (False, True)},
            "grpo": {mode: _grpo(runtime, mode, share) for mode in MODES},
            "train": _train_rank(rank, world_size)}


@pytest.fixture(scope="module")
def dp2():
    return run_ranks(_rank, 2, timeout=240)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_step_with_dp2_equals_one_process(dp2, packing):
    expected = _sft(SingleProcess(), packing)
    for rank in dp2:
        torch.testing.assert_close(rank["sft"][packing], expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("mode", MODES)
def test_grpo_update_with_dp2_equals_one_process(dp2, mode):
    expected = _grpo(SingleProcess(), mode, slice(None))
    for rank in dp2:
        torch.testing.assert_close(rank["grpo"][mode], expected, atol=ATOL, rtol=RTOL)


def test_grpo_training_keeps_dp2_replicas_identical(dp2):
    (params0, buffers0, acc0), (params1, buffers1, acc1) = (rank["train"] for rank in dp2)
    assert torch.equal(params0, params1) and torch.equal(buffers0, buffers1) and acc0 == acc1


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run in a new session; on timeout kill the whole group (torchrun's workers included)."""
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_cli_sft_and_grpo_run_data_parallel_under_torchrun(tmp_path):
    preset = str(Path(__file__).resolve().parents[2] / "configs" / "posttrain" / "arithmetic.yaml")
    tiny = ["model.dim=16", "model.inter_dim=32", "model.moe_inter_dim=8", "model.n_heads=2", "model.kv_lora_rank=8",
            "task.n_train=8", "task.n_test=4", "task.digits=2", "sft.steps=2", "sft.batch_size=4",
            "grpo.steps=1", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=8",
            "grpo.reward_workers=0", "grpo.eval_every=1"]
    cold, sft, grpo = tmp_path / "cold.jsonl", tmp_path / "sft", tmp_path / "grpo"
    posttrain = [sys.executable, "-m", "dsv3_train.posttrain"]
    assert _run(posttrain + ["cold-start", "--config", preset, "--out", str(cold), *tiny], 120).returncode == 0
    for command in (["sft", "--data", str(cold), "--out", str(sft)], ["grpo", "--policy", str(sft), "--out", str(grpo)]):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "dsv3_train.posttrain"]  # --standalone: torchrun binds a free port itself
        done = _run(torchrun + [command[0], "--config", preset, *command[1:], *tiny], 240)
        assert done.returncode == 0, done.stderr[-3000:]
    lines = (grpo / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and (grpo / "tokenizer.json").is_file()  # one writer: rank 0
