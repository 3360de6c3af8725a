"""Hydra sweeps: every job validated before the first starts, one directory per job shared by its
ranks, the wandb group = the sweep's name, and the submitit Slurm launcher config composes."""
import glob
import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launch.sweep import expand_sweep, job_environment, torch_env_from_slurm_task

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)

# ++ adds the callback now and still works once configs/config.yaml registers it itself
CALLBACK = "++hydra.callbacks.launch._target_=launch.sweep.LaunchCallback"
TINY_MODEL = ["model.vocab_size=300", "model.dim=32", "model.n_heads=2", "model.inter_dim=64",
              "model.moe_inter_dim=16", "model.q_lora_rank=null", "model.kv_lora_rank=8", "model.qk_nope_head_dim=8",
              "model.qk_rope_head_dim=4", "model.v_head_dim=8", "model.max_seq_len=64", "train.seq_len=32",
              "train.micro_batch_size=2", "train.eval_batches=1", "logger.progress=false"]
"""A tiny model and its batches, shared with tests/distributed/test_elastic.py."""
TINY = ["data=folder", "data.max_bytes=0", *TINY_MODEL, "train.steps=2", "train.eval_every=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tests.distributed.test_train_parallel import _corpus

    return _corpus(tmp_path_factory.mktemp("corpus")), tmp_path_factory.mktemp("cache")


def _sweep(corpus, sweep_dir, *overrides, env=None, processes=1):
    """dsv3-train -m in `processes` processes (each gets env(rank)); their CompletedProcesses."""
    root, cache = corpus
    argv = [sys.executable, "-m", "dsv3_train.train", "-m", CALLBACK, f"hydra.sweep.dir={sweep_dir}",
            f"data.source={root}", f"data.cache_dir={cache}", *TINY, *overrides]
    procs = [subprocess.Popen(argv, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **(env(rank) if env else {})})
             for rank in range(processes)]
    try:
        return [subprocess.CompletedProcess(p.args, p.wait(timeout=240), p.stdout.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


def _wandb_records(path: Path):
    """The protobuf records of an offline wandb run file (LevelDB log format, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, block = path.read_bytes(), 7, [], 32768  # 7-byte ':W&B' file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


@pytest.mark.slow
def test_two_job_sweep_gets_one_directory_each_and_one_wandb_group(corpus, tmp_path):
    sweep_dir = tmp_path / "lr-sweep"
    [result] = _sweep(corpus, sweep_dir, "logger=wandb", "logger.mode=offline", "train.lr=1e-3,2e-3",
                      env=lambda rank: {"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stdout[-3000:]
    for job, lr in ((0, 1e-3), (1, 2e-3)):
        metrics = [json.loads(line) for line in (sweep_dir / str(job) / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["lr"] == pytest.approx(lr)
        assert (sweep_dir / str(job) / "checkpoints" / "step_00000002").is_dir()
        [run_file] = glob.glob(str(sweep_dir / str(job) / "wandb" / "offline-run-*" / "run-*.wandb"))
        groups = [r.run.run_group for r in _wandb_records(Path(run_file)) if r.WhichOneof("record_type") == "run"]
        assert groups and set(groups) == {"lr-sweep"}


def test_a_bad_job_stops_the_sweep_before_the_first_job_runs(corpus, tmp_path):
    [result] = _sweep(corpus, tmp_path / "sweep", "train.seq_len=32,128")
    assert result.returncode != 0
    assert ("error: sweep job 1" in result.stdout and
            "train.seq_len (128) exceeds model.max_seq_len (64)" in result.stdout), result.stdout[-2000:]
    assert not (tmp_path / "sweep").exists()  # job 0 never started


@pytest.mark.slow
def test_slurm_tasks_of_a_job_share_its_directory_and_jobs_do_not_collide(corpus, tmp_path):
    """Two processes stand in for the two Slurm tasks of each job of a submitit sweep: the callback
    makes them ranks 0 and 1 of one process group per job, writing into that job's directory."""
    slurm = {"SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "2",
             "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(20000 + os.getpid() % 9000)}
    results = _sweep(corpus, tmp_path / "sweep", "parallel.dp=2", "train.lr=1e-3,2e-3", processes=2,
                     env=lambda rank: {**slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)})
    assert [r.returncode for r in results] == [0, 0], results[0].stdout[-3000:] + results[1].stdout[-3000:]
    assert results[0].stdout.count("on 2 ranks (dp 2, ep 1)") == 2  # rank 0 of each job
    assert "on 2 ranks" not in results[1].stdout
    for job in (0, 1):
        shards = sorted(p.name for p in (tmp_path / "sweep" / str(job) / "checkpoints" / "step_00000002").iterdir())
        assert [name for name in shards if name.endswith(".distcp")] == ["__0_0.distcp", "__1_0.distcp"]  # both ranks
    metrics = [(tmp_path / "sweep" / str(job) / "metrics.jsonl").read_text() for job in (0, 1)]
    assert metrics[0] != metrics[1]


def test_submitit_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class

    from dsv3_train.train import CONFIG_DIR

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Hydra's deprecated same-name schema matching
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                               "hydra.launcher.nodes=2", CALLBACK], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"  # the plugin's, with our defaults
    assert (launcher.partition, launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == ("gpu", 2, 8, 8)
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"  # per sweep, per Slurm job
    assert launcher.max_num_timeout > 0  # resubmitted at the time limit; resume=auto continues
    assert get_class(cfg.hydra.callbacks.launch._target_).__name__ == "LaunchCallback"


def test_sweep_expansion_follows_hydras_basic_sweeper():
    assert expand_sweep(["a=1,2", "b=x", "c=3,4"]) == [["a=1", "b=x", "c=3"], ["a=1", "b=x", "c=4"],
                                                       ["a=2", "b=x", "c=3"], ["a=2", "b=x", "c=4"]]


def test_slurm_task_becomes_a_torch_rank():
    env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "31000"}
    assert torch_env_from_slurm_task(env, job_num=3) == {
        "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu03",
        "MASTER_PORT": str(15000 + 31000 % 15000 + 3)}
    assert torch_env_from_slurm_task({**env, "TORCHELASTIC_RUN_ID": "x"}) == {}  # torchrun sets its own
    assert torch_env_from_slurm_task({**env, "SLURM_NTASKS": "1"}) == {}


def test_wandb_group_only_in_sweeps_and_only_when_unset():
    def config(mode, group=None):
        return OmegaConf.create({"logger": {"group": group}, "hydra": {"mode": mode, "job": {"num": 0},
                                                                       "sweep": {"dir": "runs/toy-sweep"}}})

    assert job_environment(config("RunMode.MULTIRUN"), {}) == {"WANDB_RUN_GROUP": "toy-sweep"}
    assert job_environment(config("RunMode.RUN"), {}) == {}
    assert job_environment(config("RunMode.MULTIRUN", group="mine"), {}) == {}
