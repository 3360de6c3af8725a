"""Every preset composes and validates; bad input gets a one-line error naming value and fix."""
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dsv3_train.config import Config, ConfigError, ModelConfig, TrainConfig, register_configs, to_config
from dsv3_train.train import CONFIG_DIR

register_configs()
ROOT = Path(__file__).resolve().parents[2]


def compose_config(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        composed = compose(config_name="config", overrides=["run_dir=/tmp/unused", *overrides])
    return to_config(composed)


@pytest.mark.parametrize("preset", ["toy", "small", "v2-lite", "v3-671b"])
def test_every_model_preset_composes_and_validates(preset):
    cfg = compose_config(f"model={preset}")
    assert cfg.model.name == preset


def test_v3_preset_has_the_published_shape():
    m = compose_config("model=v3-671b").model
    assert (m.n_layers, m.n_dense_layers, m.dim, m.n_heads, m.vocab_size, m.mtp_depth) == (61, 3, 7168, 128, 129280, 1)
    assert (m.n_shared_experts, m.n_routed_experts, m.moe_inter_dim, m.n_activated_experts) == (1, 256, 2048, 8)
    assert (m.n_expert_groups, m.n_limited_groups, m.route_scale) == (8, 4, 2.5)
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (1536, 512, 128, 64, 128)


def test_toy_preset_meets_the_cpu_shape_contract():
    m = compose_config().model
    assert m.n_dense_layers >= 1 and m.n_layers - m.n_dense_layers >= 2
    assert m.n_routed_experts >= 8 and m.n_activated_experts == 2 and m.n_expert_groups >= 2 and m.mtp_depth == 1


def test_overrides_reach_the_dataclasses():
    cfg = compose_config("train.steps=7", "model.dim=64")
    assert isinstance(cfg.train, TrainConfig) and cfg.train.steps == 7 and cfg.model.dim == 64


@pytest.mark.parametrize("overrides, needle", [
    (["model.vocab_size=100"], "model.vocab_size (100) is too small"),
    (["model.n_expert_groups=3"], "model.n_expert_groups (3) must divide n_routed_experts (8): choose n_expert_groups in [1, 2, 4, 8]"),
    (["model.n_activated_experts=6"], "model.n_activated_experts (6) exceeds the 4 experts"),
    (["model.kv_lora_rank=0"], "model.kv_lora_rank (0) must be > 0"),
    (["model.q_lora_rank=0"], "model.q_lora_rank (0) must be > 0 or null"),
    (["model.qk_rope_head_dim=7"], "model.qk_rope_head_dim (7) must be a positive even number"),
    (["model.n_limited_groups=3"], "model.n_limited_groups (3) must be <= n_expert_groups (2)"),
    (["model.n_expert_groups=8"], "leaves 1 expert per group"),
    (["model.n_dense_layers=5"], "model.n_dense_layers (5) must be in [0, n_layers=3]"),
    (["train.seq_len=1024"], "train.seq_len (1024) exceeds model.max_seq_len (512)"),
    (["train.precision=fp16"], "train.precision ('fp16') must be one of"),
    (["train.warmup_steps=-1"], "train.warmup_steps (-1) must be >= 0"),
    (["train.decay_start_frac=2"], "train.decay_start_frac (2.0) must be in [0, 1]"),
    (["data.val_fraction=0.9"], "data.val_fraction (0.9) must be in (0, 0.5)"),
    (["logger.kind=tensorboard"], "logger.kind ('tensorboard') must be"),
    (["model.rope_factor=0.5"], "model.rope_factor (0.5) must be >= 1"),
])
def test_bad_values_are_refused_with_the_fix(overrides, needle):
    with pytest.raises(ConfigError) as error:
        compose_config(*overrides)
    assert needle in str(error.value)
    assert "\n" not in str(error.value)


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelConfig(kv_lora_rank=-1)


def _cli(*overrides, cwd):
    return subprocess.run([sys.executable, "-m", "dsv3_train.train", *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_one_line_error_before_any_work(tmp_path):
    result = _cli("model.n_expert_groups=3", "name=bad", cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: model.n_expert_groups (3) must divide n_routed_experts (8): choose n_expert_groups in [1, 2, 4, 8]"]
    assert not (tmp_path / "data_cache").exists()


def test_cli_refuses_a_missing_corpus_before_building_anything(tmp_path):
    result = _cli(f"data.source={tmp_path / 'nowhere'}", "name=bad", cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nowhere" in lines[0] and lines[0].startswith("error: data.source")
    assert not (tmp_path / "data_cache").exists()
