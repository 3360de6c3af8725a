"""End-to-end training on a tiny corpus: learning, accumulation, precision, stop/resume, plots."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3_train.config import CheckpointConfig, Config, DataConfig, LoggerConfig, ModelConfig, TrainConfig
from dsv3_train.data import build_dataset
from dsv3_train.model import Transformer, routers
from dsv3_train.train import run
from dsv3_train.trainer import Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    for doc in range(40):
        lines = [" ".join(words[(doc * 7 + i * j) % len(words)] for j in range(8)) for i in range(30)]
        (root / f"doc{doc:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


def tiny_config(corpus, run_dir, **train_overrides) -> Config:
    train = dict(steps=6, seq_len=32, micro_batch_size=4, warmup_steps=2, eval_every=3, eval_batches=2,
                 log_every=1, lr=3e-3, bias_update_speed=0.01,
                 device="cpu")  # gloo ranks on one host, bit-exact CPU kernels, also on a GPU box
    train.update(train_overrides)
    return Config(
        model=ModelConfig(vocab_size=300, dim=32, n_layers=3, n_dense_layers=1, n_heads=2, inter_dim=64,
                          moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2, n_expert_groups=2,
                          n_limited_groups=1, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                          v_head_dim=8, max_seq_len=64, mtp_depth=1, init_std=0.05),
        train=TrainConfig(**train),
        data=DataConfig(source=str(corpus), cache_dir=str(Path(run_dir).parent / "cache"), max_bytes=0),
        logger=LoggerConfig(progress=False),
        checkpoint=CheckpointConfig(every=3, keep_last=3),
        run_dir=str(run_dir),
    )


def _metrics_file(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_stop_and_resume_gives_bit_identical_losses(corpus, tmp_path):
    straight = run(tiny_config(corpus, tmp_path / "straight"))
    interrupted = tiny_config(corpus, tmp_path / "interrupted")
    first = run(interrupted, stop_at=4)  # "crashes" after step 4; last checkpoint is step 3
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    second = run(interrupted)  # resumes from step 3 in a fresh model, optimizer and sampler
    assert [m["step"] for m in second] == [4, 5, 6]
    for key in ("loss", "total_loss", "mtp_loss", "balance_loss", "grad_norm", "lr"):
        assert [m[key] for m in second] == [m[key] for m in straight[3:]], key
    assert [m.get("val_loss") for m in second] == [m.get("val_loss") for m in straight[3:]]
    assert second[-1]["expert_load"] == straight[-1]["expert_load"]
    # metrics.jsonl holds each step once, as the uninterrupted run's does
    assert [m["loss"] for m in _metrics_file(tmp_path / "interrupted")] == [m["loss"] for m in straight]


def test_resume_restores_expert_biases_and_weights(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run")
    run(cfg, stop_at=3)
    dataset = build_dataset(cfg.data, cfg.model.vocab_size, progress=False)
    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    model = Transformer(cfg.model)
    trainer = Trainer(cfg, model, dataset, tmp_path / "run")
    assert trainer.resume() is not None and trainer.step == 3
    biases = [r.expert_bias for _, r in routers(model)]
    assert all(b.abs().sum() > 0 for b in biases)  # 3 updates of +-0.01 moved them


def test_training_lowers_validation_loss(corpus, tmp_path):
    history = run(tiny_config(corpus, tmp_path / "learn", steps=40, eval_every=20, warmup_steps=5))
    val = [m["val_loss"] for m in history if "val_loss" in m]
    assert val[-1] < 0.75 * val[0], val
    assert all(k in history[-1] for k in ("tokens_per_s", "grad_norm", "lr", "load_max_mean", "mtp_loss"))


def test_gradient_accumulation_equals_one_big_batch(corpus, tmp_path):
    grads = []
    for micro, accum in ((4, 1), (2, 2)):
        cfg = tiny_config(corpus, tmp_path / f"acc{accum}", micro_batch_size=micro, grad_accum=accum,
                          mask_cross_document=False)
        dataset = build_dataset(cfg.data, cfg.model.vocab_size, progress=False)
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        trainer = Trainer(cfg, model, dataset, tmp_path / f"acc{accum}")
        trainer.optimizer.step = lambda: None  # keep the gradients for comparison
        trainer.optimizer.zero_grad = lambda set_to_none=True: None
        trainer.train_step()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_trains(corpus, tmp_path):
    history = run(tiny_config(corpus, tmp_path / "bf16", steps=3, precision="bf16"))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in history)


def test_plot_writes_loss_and_expert_load_pngs(corpus, tmp_path):
    run(tiny_config(corpus, tmp_path / "plotted", steps=3))
    result = subprocess.run([sys.executable, "-m", "dsv3_train.plot", str(tmp_path / "plotted")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("loss.png", "expert_load.png"):
        png = tmp_path / "plotted" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_wandb_logger_runs_offline_and_keeps_its_run_id(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(corpus, tmp_path / "wb", steps=3)
    cfg.logger.kind, cfg.logger.mode = "wandb", "offline"
    run(cfg)
    state = json.loads((tmp_path / "wb" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["wandb_id"]
    assert any((tmp_path / "wb" / "wandb").iterdir())
