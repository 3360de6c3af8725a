"""Invalid configurations are refused by dsv3-launch before any process starts: one case per rule,
each message naming the offending value and the fix.

Every case runs the real command line (``local --dry-run``, ``slurm --dry-run`` or ``plan``): the
config rules of dsv3_train/config.py and parallel/mesh.py are exercised through the launcher,
next to the launcher's own rules (world size, restarts, paths, wandb, schedules, memory)."""
import re
from types import SimpleNamespace

import pytest

from dsv3_train.config import ConfigError
from dsv3_train.precision.config import PrecisionConfig
from launch.cli import main
from launch.validate import check_precision_backend

pytestmark = pytest.mark.timeout(120)

LOCAL = ["local", "--dry-run"]
SLURM = ["slurm", "--dry-run", "--nodes", "2", "--gpus-per-node", "8"]
PLAN = ["plan", "--nodes", "1", "--gpus-per-node", "8"]


def _incomplete_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "step_00000004"
    path.mkdir(parents=True)
    return str(path)


CASES = {
    # config rules, through the launcher -----------------------------------------------------
    "ep-divides-dp": (LOCAL + ["--nproc-per-node", "4", "parallel.ep=3"],
                      r"parallel.ep \(3\) must divide parallel.dp \(4\).*choose ep in \[1, 2, 4\]"),
    "world-size": (LOCAL + ["--nproc-per-node", "2", "parallel.dp=4"],
                   r"world size \(2\) must equal pp \(1\) x dp \(4\) = 4: launch 4 processes or set parallel.dp=2"),
    "experts-divisible-by-ep": (LOCAL + ["--nproc-per-node", "4", "parallel.ep=4", "model.n_routed_experts=6",
                                         "model.n_expert_groups=1"],
                                r"parallel.ep \(4\) must divide model.n_routed_experts \(6\): choose ep in \[1, 2\]"),
    "pipeline-without-schedule": (LOCAL + ["--nproc-per-node", "2", "parallel.pp=2"],
                                  r"parallel.pp \(2\) > 1 needs a pipeline schedule: set parallel.schedule=dualpipe"),
    "zero-stage": (LOCAL + ["parallel.zero_stage=4"], r"parallel.zero_stage \(4\) must be 1, 2 or 3"),
    "seq-len-vs-rope-tables": (LOCAL + ["train.seq_len=1024"],
                               r"train.seq_len \(1024\) exceeds model.max_seq_len \(512\): raise max_seq_len"),
    "expert-groups-divide-experts": (LOCAL + ["model.n_expert_groups=3"],
                                     r"model.n_expert_groups \(3\) must divide n_routed_experts \(8\).*\[1, 2, 4, 8\]"),
    "top-k-reachable": (LOCAL + ["model.n_activated_experts=5"],
                        r"model.n_activated_experts \(5\) exceeds the 4 experts.*raise n_limited_groups"),
    "precision-name": (LOCAL + ["train.precision=fp16"], r"train.precision \('fp16'\) must be one of 'fp32', 'bf16'"),
    "device-name": (LOCAL + ["train.device=gpu"], r"train.device \('gpu'\) must be one of 'auto', 'cuda', 'cpu'"),
    "vocab-too-small": (LOCAL + ["model.vocab_size=100"], r"model.vocab_size \(100\) is too small.*use at least"),
    "unknown-key": (LOCAL + ["train.stepz=10"], r"Key 'stepz' not in 'TrainConfig'.*check the override's key"),
    # launcher rules --------------------------------------------------------------------------
    "pp-divides-world": (LOCAL + ["--nproc-per-node", "3", "parallel.pp=2"],
                         r"parallel.pp \(2\) must divide the world size \(3 = 1 node\(s\) x 3\): "
                         r"choose pp in \[1, 3\]"),
    "negative-restarts": (LOCAL + ["--max-restarts", "-1"], r"--max-restarts \(-1\) must be >= 0"),
    "restart-without-resume": (LOCAL + ["--max-restarts", "2", "checkpoint.resume=never"],
                               r"checkpoint.resume \(never\) would make --max-restarts 2 start again from step 0: "
                               r"set checkpoint.resume=auto"),
    "restart-without-checkpoints": (LOCAL + ["--max-restarts", "1", "checkpoint.every=0"],
                                    r"checkpoint.every \(0\).*repeat the whole run: set checkpoint.every"),
    "data-source-missing": (LOCAL + ["data=folder", "data.source=/no/such/corpus"], r"/no/such/corpus"),
    "tokenizer-missing": (LOCAL + ["data.tokenizer=/no/such/tokenizer.json"],
                          r"data.tokenizer \(/no/such/tokenizer.json\) is not a file.*data.tokenizer=null"),
    "resume-missing": (LOCAL + ["checkpoint.resume=/no/such/step_00000100"],
                       r"checkpoint.resume \(/no/such/step_00000100\) does not exist: use auto, never or"),
    "resume-incomplete": (LOCAL + ["checkpoint.resume={incomplete}"],
                          r"is not a complete checkpoint \(no trainer_state.json\): point it at a step_\* directory"),
    "wandb-online-without-key": (LOCAL + ["logger=wandb", "logger.mode=online"],
                                 r"logger.mode \(online\) needs a wandb key.*logger.mode=offline"),
    "multi-node-without-endpoint": (LOCAL + ["--nnodes", "2"], r"--nnodes \(2\) needs --rdzv-endpoint HOST:PORT"),
    "slurm-time-format": (SLURM + ["--time", "25h"], r"slurm time \('25h'\) is not a Slurm time limit: use e.g."),
    "slurm-signal-after-limit": (SLURM + ["--time", "1"],
                                 r"requeue_signal_s \(120\) must be shorter than the time limit \(1 = 60 s\)"),
    "slurm-requeue-without-resume": (SLURM + ["checkpoint.resume=never"],
                                     r"checkpoint.resume \(never\) would make a requeued Slurm job start again.*"
                                     r"--no-requeue"),
    "slurm-memory": (SLURM + ["--nodes", "1", "model=v3-671b", "parallel.ep=8"],
                     r"estimated [\d.]+ GiB per GPU \(pp rank 0\) exceeds the 80 GiB of --gpu-memory; no single "
                     r"change fits: use more GPUs"),
    "slurm-node-outside-slurm": (["slurm-node", "--gpus-per-node", "8", "--dry-run"],
                                 r"SLURM_JOB_NODELIST / SLURM_JOB_ID are unset.*submit with dsv3-launch slurm"),
    # schedule and layout rules (plan accepts pp > 1) ----------------------------------------
    "dualpipe-odd-pp": (["plan", "--nodes", "3", "parallel.pp=3", "parallel.schedule=dualpipe",
                         "train.grad_accum=6"], r"dualpipe needs an even pp .*got pp=3: choose pp=2 or pp=4, or use dualpipev"),
    "dualpipe-microbatches": (PLAN + ["parallel.pp=2", "parallel.schedule=dualpipe", "train.grad_accum=2"],
                              r"dualpipe on pp=2 needs train.grad_accum >= 4, got 2: set train.grad_accum=4"),
    "dualpipe-even-microbatches": (PLAN + ["parallel.pp=2", "parallel.schedule=dualpipe", "train.grad_accum=5"],
                                   r"got train.grad_accum=5: set train.grad_accum=6"),
    "1f1b-microbatches": (PLAN + ["parallel.pp=2", "parallel.schedule=1f1b", "train.grad_accum=1"],
                          r"1f1b on pp=2 needs train.grad_accum >= 2, got 1: set train.grad_accum=2"),
    "schedule-without-pipeline": (PLAN + ["parallel.schedule=dualpipe"],
                                  r"parallel.schedule \(dualpipe\) needs parallel.pp >= 2"),
    "schedule-unknown": (PLAN + ["parallel.pp=2", "parallel.schedule=gpipe"],
                         r"parallel.schedule \('gpipe'\) is unknown: choose one of"),
    "dualpipev-stages": (PLAN + ["parallel.pp=2", "parallel.schedule=dualpipev", "train.grad_accum=4"],
                         r"dualpipev on parallel.pp \(2\) needs 4 stages but model.n_layers is 3"),
    "partial-node": (["plan", "--world-size", "12", "--gpus-per-node", "8"],
                     r"world size \(12\) is not a whole number of nodes of 8 GPUs"),
    "plan-memory": (PLAN + ["model=v3-671b"], r"exceeds the 80 GiB of --gpu-memory"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_config_is_refused_before_launch(case, capsys, tmp_path, monkeypatch):
    argv, message = CASES[case]
    argv = [a.replace("{incomplete}", _incomplete_checkpoint(tmp_path)) if "{incomplete}" in a else a for a in argv]
    for name in ("WANDB_API_KEY", "SLURM_JOB_NODELIST", "SLURM_JOB_ID", "SLURM_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a wandb key
    monkeypatch.chdir(tmp_path)  # a refused launch must not create runs/
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, (out, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert "torch.distributed.run" not in out and "#SBATCH" not in out  # nothing was started or rendered
    assert not (tmp_path / "runs").exists()


def test_cuda_device_is_refused_on_a_machine_without_cuda(capsys, tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(LOCAL + ["train.device=cuda"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert re.search(r"train.device \('cuda'\) needs a CUDA GPU but torch .* sees none: install a CUDA "
                     r"build of torch \(see the README\) or set train.device=cpu", err), err
    assert not (tmp_path / "runs").exists()


def test_fp8_on_transformer_engine_is_refused_on_a_machine_without_cuda():
    """The precision package's own check, run by the launcher before anything starts."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    te_config = SimpleNamespace(precision=PrecisionConfig(linear="fp8", fp8_backend="te"))
    with pytest.raises(ConfigError, match=r"precision.fp8_backend='te' needs a CUDA GPU.*fp8_backend=emulated"):
        check_precision_backend(te_config)
    check_precision_backend(SimpleNamespace(precision=PrecisionConfig(linear="fp8", fp8_backend="emulated")))
    check_precision_backend(SimpleNamespace())  # a config without a precision section


def test_fp8_te_through_the_launcher_once_the_config_has_a_precision_section(capsys):
    from dsv3_train.config import Config

    if "precision" not in Config.__dataclass_fields__:
        pytest.skip("Config has no precision section yet (the precision issue wires it in)")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_info:
        main(LOCAL + ["precision.linear=fp8", "precision.fp8_backend=te"])
    assert exit_info.value.code == 2
    assert "precision.fp8_backend='te' needs a CUDA GPU" in capsys.readouterr().err
