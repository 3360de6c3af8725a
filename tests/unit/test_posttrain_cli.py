"""dsv3-posttrain: presets load onto the typed configs, and every command runs end to end on a
tiny model (cold start -> SFT -> GRPO -> rejection sampling -> distillation -> eval)."""
import json
from pathlib import Path

import pytest

from dsv3_train.posttrain.cli import main
from dsv3_train.posttrain.config import ConfigError, load_config
from dsv3_train.posttrain.data import read_jsonl
from dsv3_train.posttrain.demo import demo_config, results_table

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "posttrain"
TINY = ["model.dim=16", "model.inter_dim=32", "model.moe_inter_dim=8", "model.n_heads=2", "model.kv_lora_rank=8",
        "student.dim=16", "student.n_heads=2", "student.inter_dim=16", "task.n_train=8", "task.n_test=4",
        "task.digits=2", "sft.steps=2", "sft.batch_size=4", "student_sft.steps=1", "student_sft.batch_size=4",
        "grpo.steps=1", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=8",
        "grpo.reward_workers=0", "grpo.eval_every=1", "sample.n_samples=2", "sample.max_new_tokens=8"]


def test_the_arithmetic_preset_is_the_demo_config():
    assert load_config([str(PRESETS / "arithmetic.yaml")]) == demo_config()


@pytest.mark.parametrize("preset", ["countdown", "dapo", "dr_grpo", "r1_zero"])
def test_overlay_presets_merge_onto_the_demo(preset):
    cfg = load_config([str(PRESETS / "arithmetic.yaml"), str(PRESETS / f"{preset}.yaml")])
    assert cfg.model == demo_config().model


def test_a_bad_override_names_the_field_and_the_fix():
    with pytest.raises(ConfigError, match="loss_aggregation"):
        load_config([], ["grpo.loss_aggregation=mean"])


def test_every_command_runs_on_a_tiny_model(tmp_path, capsys):
    config = ["--config", str(PRESETS / "arithmetic.yaml")]
    cold, sft, grpo, rs, student = (tmp_path / name for name in ("cold.jsonl", "sft", "grpo", "rs.jsonl", "student"))
    main(["cold-start", *config, "--out", str(cold), *TINY])
    assert len(read_jsonl(cold)) == 8 and "<think>" in read_jsonl(cold)[0]["completion"]
    main(["sft", *config, "--data", str(cold), "--out", str(sft), *TINY])
    main(["grpo", *config, "--policy", str(sft), "--out", str(grpo), *TINY])
    logged = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert "eval/accuracy" in logged[0] and "reward" in logged[0]
    main(["rejection-sample", *config, "--policy", str(grpo), "--out", str(rs), *TINY])
    main(["distill", *config, "--teacher", str(grpo), "--out", str(student), *TINY])
    report = json.loads((student / "distill.json").read_text())
    assert {"teacher_accuracy", "student_accuracy", "size_ratio"} <= set(report)
    capsys.readouterr()
    main(["eval", *config, "--policy", str(student), *TINY])
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) == {"accuracy", "format"}


def test_a_fresh_model_with_the_wrong_vocabulary_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="vocab_size"):
        main(["sft", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"), "model.vocab_size=50"])


def test_results_table_has_a_row_per_seed_and_the_mean():
    run = {"seed": 0, "cpu_total_s": 120.0, **{k: 0.5 for k in ("teacher_rule", "sft", "grpo", "shuffled",
                                                                "continued_sft", "rejection_sft", "student")}}
    table = results_table([run, dict(run, seed=1, grpo=1.0)])
    assert "| 0 | 50.0 | 50.0 | 50.0 |" in table and "**75.0**" in table and table.count("\n") == 4
