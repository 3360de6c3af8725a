"""dsv3-launch without launching: node lists, torchrun and sbatch rendering, submission through a
fake sbatch, the requeue trap, the plan's layout and memory arithmetic."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv3_train.config import ConfigError, ModelConfig
from launch.cli import main
from launch.layout import Layout, format_ranks, groups, stage_blocks
from launch.memory import PRECISIONS, model_size
from launch.nodelist import expand_nodelist
from launch.plan import PlanInputs, estimate
from launch.slurm import rendezvous_from_env, rendezvous_port, time_limit_seconds
from tests.unit.test_config import compose_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def launch(capsys, *argv):
    """Run dsv3-launch in this process; (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# ----------------------------------------------------------------------------- node lists
@pytest.mark.parametrize("nodelist,hosts", [
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("node7", ["node7"]),
    ("node[9-11]", ["node9", "node10", "node11"]),
    ("a[1-2]-ib[08-09]", ["a1-ib08", "a1-ib09", "a2-ib08", "a2-ib09"]),
    ("x[001,010],y", ["x001", "x010", "y"]),
])
def test_compressed_node_lists_expand_like_scontrol(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu01-03]", "gpu[a-b]", "gpu[5-3]", ""])
def test_malformed_node_lists_are_refused(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_slurm_environment_becomes_a_c10d_rendezvous_on_the_first_host():
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "123456",
           "SLURM_NODEID": "1"}
    rdzv = rendezvous_from_env(env)
    assert (rdzv.head, rdzv.nnodes, rdzv.node_rank, rdzv.job_id) == ("gpu07", 2, 1, "123456")
    assert rdzv.port == 15000 + 123456 % 15000 and rdzv.port < 32768  # below the ephemeral range
    with pytest.raises(ConfigError, match="disagrees"):
        rendezvous_from_env({**env, "SLURM_JOB_NUM_NODES": "3"})
    with pytest.raises(ConfigError, match="inside a Slurm job"):
        rendezvous_from_env({})


@pytest.mark.parametrize("text,seconds", [("90", 5400), ("1:30", 90), ("12:00:00", 43200), ("2-00:00:00", 172800),
                                          ("1-6", 108000), ("1-0:30", 88200)])
def test_slurm_time_formats(text, seconds):
    assert time_limit_seconds(text) == seconds


# ----------------------------------------------------------------------------- local
def test_local_dry_run_sets_dp_from_the_process_count(capsys):
    code, out, _ = launch(capsys, "local", "--nproc-per-node", "2", "--max-restarts", "3", "--dry-run",
                          "parallel.ep=2", "train.steps=5")
    assert code == 0
    command = out.split("dsv3-launch: ", 1)[1].split()
    assert command[0] == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"  # fresh worker store per restart
    command = command[1:]
    assert command[1:3] == ["-m", "torch.distributed.run"]
    for flag in ("--nnodes=1", "--nproc-per-node=2", "--max-restarts=3", "--standalone"):
        assert flag in command
    assert command[command.index("-m", 3):] == ["-m", "dsv3_train.train", "parallel.ep=2", "train.steps=5",
                                                "parallel.dp=2"]


def test_local_multi_node_uses_the_given_c10d_endpoint(capsys):
    code, out, _ = launch(capsys, "local", "--nproc-per-node", "2", "--nnodes", "2", "--rdzv-endpoint",
                          "head:29400", "--rdzv-id", "run7", "--dry-run")
    assert code == 0
    assert "--rdzv-backend=c10d --rdzv-endpoint=head:29400 --rdzv-id=run7" in out
    assert out.rstrip().endswith("parallel.dp=4")


# ----------------------------------------------------------------------------- slurm
SLURM_ARGS = ["slurm", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "2-00:00:00",
              "--account", "proj1", "--container-image", "nvcr.io#nvidia/pytorch:25.01-py3", "--max-restarts", "2"]


def test_slurm_dry_run_renders_a_two_node_requeueable_job(capsys, tmp_path):
    code, script, _ = launch(capsys, *SLURM_ARGS, "--output-dir", str(tmp_path / "out"), "--dry-run",
                             "name=big run", "parallel.ep=8")
    assert code == 0
    directives = re.findall(r"^#SBATCH (\S+)", script, flags=re.M)
    for expected in ("--job-name=big-run", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
                     "--account=proj1", "--time=2-00:00:00", f"--output={tmp_path}/out/slurm-%j.out",
                     "--requeue", "--signal=B:USR1@120", "--open-mode=append"):
        assert expected in directives
    assert "trap requeue USR1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    srun = script[script.index("srun "):script.index(" &\n")]
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in srun
    assert "python -m launch slurm-node --gpus-per-node=8 --max-restarts=2" in srun
    overrides = srun.split(" -- ", 1)[1].replace("\\\n", " ").split()
    assert overrides[:2] == ["'name=big", "run'"]  # quoted for the shell
    assert "parallel.ep=8" in overrides and "parallel.dp=16" in overrides  # 2 nodes x 8 GPUs
    assert f"hydra.run.dir={tmp_path}/out" in overrides
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_slurm_node_turns_the_allocation_into_one_torchrun_per_node(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02]")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_NODEID", "1")
    code, out, _ = launch(capsys, "slurm-node", "--gpus-per-node=8", "--max-restarts=2", "--dry-run", "--",
                          "parallel.dp=16", "parallel.ep=8")
    assert code == 0
    assert out.startswith("dsv3-launch node 1/2:")
    assert (f"--nnodes=2 --nproc-per-node=8 --max-restarts=2 --rdzv-backend=c10d "
            f"--rdzv-endpoint=gpu01:{rendezvous_port('777')} --rdzv-id=777 -m dsv3_train.train "
            f"parallel.dp=16 parallel.ep=8") in out


def _fake_tools(bin_dir: Path, log: Path) -> dict:
    """sbatch / srun / scontrol stand-ins that record their arguments."""
    bin_dir.mkdir()
    tools = {
        "sbatch": f'echo "sbatch $*" >> {log}; cp "${{@: -1}}" {log}.script; echo "4242;cluster"',
        "srun": f'echo "srun $*" >> {log}; exec sleep 30',
        "scontrol": f'echo "scontrol $*" >> {log}',
    }
    for name, body in tools.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_submission_goes_through_sbatch(capsys, tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    env = _fake_tools(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", env["PATH"])
    out_dir = tmp_path / "run"
    code, out, _ = launch(capsys, *SLURM_ARGS, "--output-dir", str(out_dir))
    assert code == 0
    assert f"submitted job 4242: 2 node(s) x 8 GPUs; log {out_dir}/slurm-4242.out" in out
    assert log.read_text() == f"sbatch --parsable {out_dir}/sbatch.sh\n"
    assert (out_dir / "sbatch.sh").read_text() == Path(f"{log}.script").read_text()


def test_sbatch_missing_is_named(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = launch(capsys, *SLURM_ARGS, "--output-dir", str(tmp_path / "run"))
    assert code == 2 and "sbatch is not on PATH" in err and "--dry-run" in err


def test_the_script_requeues_itself_on_usr1(capsys, tmp_path):
    """Run the rendered script under bash with fake srun/scontrol; USR1 (Slurm's time-limit
    warning) must call `scontrol requeue <job>` while the step keeps running."""
    code, script, _ = launch(capsys, *SLURM_ARGS, "--output-dir", str(tmp_path / "run"), "--dry-run")
    assert code == 0
    path = tmp_path / "job.sh"
    path.write_text(script)
    log = tmp_path / "calls.log"
    env = {**_fake_tools(tmp_path / "bin", log), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    job = subprocess.Popen(["bash", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not (log.exists() and "srun" in log.read_text()):
            assert time.monotonic() < deadline, "srun never started"
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while "scontrol" not in log.read_text():
            assert time.monotonic() < deadline, "no requeue after USR1"
            time.sleep(0.05)
        assert job.poll() is None  # the trap does not end the job; Slurm's requeue does
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=10)
    calls = log.read_text().splitlines()
    assert calls[0].startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 --container-image=")
    assert calls[1] == "scontrol requeue 4242"


def test_python_dash_m_launch_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "launch", "plan", "--nodes", "1", "--gpus-per-node", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "fits: yes" in result.stdout


# ----------------------------------------------------------------------------- plan arithmetic
def _instantiated_sizes(model_cfg: ModelConfig):
    import torch

    from dsv3_train.model import Transformer

    torch.manual_seed(0)
    model = Transformer(model_cfg)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return sum(p.numel() for p in model.parameters()), expert


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": None}, {"n_dense_layers": 0, "mtp_depth": 2},
                                     {"n_shared_experts": 2, "mtp_depth": 0}])
def test_parameter_count_matches_an_instantiated_model(changes):
    import dataclasses

    model_cfg = dataclasses.replace(compose_config("model=toy").model, **changes)
    total, expert = _instantiated_sizes(model_cfg)
    assert model_size(model_cfg).total == total
    inputs = PlanInputs(model_cfg, 1, 32, 1, Layout(1, 1, 1))
    held = estimate(inputs)[0].params
    assert (held.total, held.expert) == (total, expert)


def test_v3_preset_has_the_reported_671b_total_and_37b_active():
    size = model_size(compose_config("model=v3-671b").model)
    assert round(size.main / 1e9) == 671  # V3 report: 671B total
    assert 37e9 < size.active < 38e9  # "37B activated"
    assert 684e9 < size.total + 129280 * 7168 * 2 < 686e9  # HF's 685B stores MTP's own embed + head


def test_rank_groups_follow_the_mesh_order():
    layout = Layout(pp=2, dp=4, ep=2)
    g = groups(layout)
    assert g["dp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert g["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # contiguous: an EP group stays in a node
    assert g["edp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert format_ranks(list(range(0, 2048, 128))) == "0,128,...,1920"
    assert format_ranks(list(range(64, 128))) == "64-127"


def test_dualpipe_places_stage_r_and_its_mirror_on_rank_r():
    assert Layout(pp=4, dp=1, ep=1, schedule="dualpipe").stages_of(1) == [1, 2]
    assert Layout(pp=4, dp=1, ep=1, schedule="dualpipev").stages_of(1) == [1, 6]
    assert [len(r) for r in stage_blocks(61, 16)] == [4] * 13 + [3] * 3


V3_PLAN = ["plan", "model=v3-671b", "--nodes", "256", "parallel.pp=16", "parallel.ep=64", "parallel.schedule=dualpipe",
           "train.seq_len=4096", "train.micro_batch_size=1", "train.grad_accum=120", "--precision", "fp8",
           "--recompute", "selective"]


def test_plan_for_v3_on_2048_gpus_matches_the_published_layout(capsys):
    code, out, _ = launch(capsys, *V3_PLAN)
    assert code == 0, out
    assert "671.0B main model" in out and "37.6B active per token" in out
    assert "pp 16 x dp 128 (dp = edp 2 x ep 64)" in out
    assert "global batch 15360 sequences x 4096 tokens" in out  # V3's final batch size
    # EP 64 spans 8 nodes
    assert re.search(r"ep\s+32 x 64\s+ranks\s+\[0-63\] \.\.\. \[1984-2047\]\s+\(8 nodes each\)", out)
    assert "4 per GPU" in out  # 256 routed experts / ep 64
    assert "stage 0: embed + blocks 0-3 (3 dense); stage 15: blocks 58-60 + head + MTP x1" in out
    peak = float(re.search(r"peak: ([\d.]+) GiB on pp rank 0 \(17 micro-batch", out).group(1))  # PP + 1
    assert peak < 80
    assert "fits: yes" in out


def test_plan_memory_follows_the_dualpipe_table():
    """DualPipe keeps 2x parameters and PP+1 micro-batches of activations; 1F1B 1x and PP."""
    model_cfg = compose_config("model=v3-671b").model
    base = dict(model=model_cfg, micro_batch_size=1, seq_len=4096, grad_accum=40, precision="fp8")
    one_f_one_b = estimate(PlanInputs(**base, layout=Layout(16, 128, 64, schedule="1f1b")))
    dualpipe = estimate(PlanInputs(**base, layout=Layout(16, 128, 64, schedule="dualpipe")))
    middle = 5  # holds stage 5 under 1F1B, stages 5 and 10 under DualPipe: both 4 MoE blocks
    assert dualpipe[middle].params.total == 2 * one_f_one_b[middle].params.total
    assert dualpipe[middle].activations / one_f_one_b[middle].activations == pytest.approx(17 / 16)
    # ZeRO-1 shards the optimizer state only: dense over dp = 128, this rank's experts over edp = 2
    p = one_f_one_b[middle].params
    assert one_f_one_b[middle].optimizer == pytest.approx(p.dense * 8 / 128 + p.expert * 8 / 2)
    assert one_f_one_b[middle].grads == p.total * PRECISIONS["fp8"].grad


def test_plan_refuses_a_layout_that_does_not_fit_and_names_what_would(capsys):
    code, out, err = launch(capsys, *[a for a in V3_PLAN if a not in ("--recompute", "selective")])
    assert code == 2
    assert "peak:" in out  # the report is printed before the refusal
    assert re.search(r"error: estimated [\d.]+ GiB per GPU \(pp rank 0\) exceeds the 80 GiB of --gpu-memory; "
                     r"fix: --recompute selective \([\d.]+ GiB\)", err)
