"""Elastic restart: dsv3-launch local trains on 2 CPU ranks; a rank SIGKILLed mid-run is restarted
by torchrun and the run resumes from its latest checkpoint to the same losses as an uninterrupted
run; a process killed while writing a checkpoint leaves the previous one loadable.

Run as a module (``python -m tests.distributed.test_elastic <overrides>``) this file is the worker
the restart test launches: the trainer, except that on torchrun's first attempt rank
$ELASTIC_KILL_RANK SIGKILLs itself when it is about to run step $ELASTIC_KILL_AT_STEP + 1.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.unit.test_launch_sweep import TINY_MODEL, corpus  # noqa: F401 (corpus: the fixture)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)

TINY = [*TINY_MODEL, "model.init_std=0.05", "train.grad_accum=2", "train.steps=6", "train.warmup_steps=2",
        "train.eval_every=3", "checkpoint.every=2", "checkpoint.keep_last=3", "parallel.ep=2"]


def _overrides(corpus, run_dir: Path) -> list[str]:
    root, cache = corpus
    # hydra.run.dir (not run_dir) so that Hydra's own files land there too, not in ./runs
    return [f"data=folder", f"data.source={root}", f"data.cache_dir={cache}", "data.max_bytes=0", *TINY,
            f"hydra.run.dir={run_dir}"]


def _descendants(pid: int) -> list[int]:
    """Every process below pid (torchrun starts each worker in a session of its own, so killing
    the launcher's process group would leave them running)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def _launch(args: list[str], env_extra: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """python -m launch ... (which becomes torchrun); it and all its workers die with the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    proc = subprocess.Popen([sys.executable, "-m", "launch", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out)
    finally:
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wandb_run_ids(run_dir: Path) -> list[str]:
    """Run ids of the offline wandb runs under run_dir (the directory names end in -<id>)."""
    return sorted(p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_rank_killed_mid_run_restarts_and_resumes_to_the_same_losses(corpus, tmp_path):
    straight_dir, elastic_dir = tmp_path / "straight", tmp_path / "elastic"
    straight = _launch(["local", "--nproc-per-node", "2", *_overrides(corpus, straight_dir)], {})
    assert straight.returncode == 0, straight.stdout[-4000:]
    assert "model toy:" in straight.stdout and "on 2 ranks (dp 2, ep 2)" in straight.stdout
    reference = _metrics(straight_dir)
    assert [m["step"] for m in reference] == [1, 2, 3, 4, 5, 6]

    # Rank 1 dies at the start of step 4: step 2 is the latest checkpoint, step 3 is lost work.
    elastic = _launch(["local", "--nproc-per-node", "2", "--max-restarts", "1", "--module",
                       "tests.distributed.test_elastic", *_overrides(corpus, elastic_dir),
                       "logger=wandb", "logger.mode=offline"],
                      {"ELASTIC_KILL_RANK": "1", "ELASTIC_KILL_AT_STEP": "3", "WANDB_MODE": "offline"})
    assert elastic.returncode == 0, elastic.stdout[-4000:]
    assert "elastic test: rank 1 SIGKILLs itself before step 4" in elastic.stdout
    assert "resumed from" in elastic.stdout and "step_00000002 at step 2" in elastic.stdout
    resumed = _metrics(elastic_dir)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]  # each step logged once
    # Same layout, same shards, same data position: the resumed run is bit-identical.
    for key in ("loss", "total_loss", "mtp_loss", "balance_loss", "grad_norm", "lr"):
        assert [m[key] for m in resumed] == [m[key] for m in reference], key
    assert [m.get("val_loss") for m in resumed] == [m.get("val_loss") for m in reference]
    assert resumed[-1]["expert_load"] == reference[-1]["expert_load"]
    # the wandb run id travels in the checkpoint: the restarted rank 0 continues the same run
    ids = _wandb_run_ids(elastic_dir)
    assert len(ids) == 2 and len(set(ids)) == 1, ids
    state = json.loads((elastic_dir / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["wandb_id"] == ids[0]


_SAVE_CHILD = textwrap.dedent("""
    import sys, time, torch
    import torch.distributed.checkpoint as dcp
    from pathlib import Path
    from dsv3_train import checkpoint
    from dsv3_train.model import Transformer
    from dsv3_train.trainer import build_optimizer
    from tests.unit.test_train import tiny_config

    root, marker = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = tiny_config(root, root / "run")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    model(torch.randint(0, 300, (2, 16))).float().pow(2).mean().backward()
    for param in model.parameters():  # MTP is not in this forward: give every parameter a state
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    checkpoint.save_checkpoint(root / "checkpoints", 1, model, optimizer, {"step": 1})
    torch.save(model.state_dict(), root / "expected.pt")
    optimizer.step()  # different weights for the save that will be cut short

    real_save = dcp.save
    def slow_save(*args, **kwargs):
        real_save(*args, **kwargs)  # shards written to the staging directory ...
        marker.write_text("writing")
        time.sleep(60)  # ... and killed before the rename that publishes them
    checkpoint.dcp.save = slow_save
    checkpoint.save_checkpoint(root / "checkpoints", 2, model, optimizer, {"step": 2})
""")


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    import torch

    from dsv3_train.checkpoint import latest_checkpoint, load_checkpoint
    from dsv3_train.model import Transformer
    from dsv3_train.trainer import build_optimizer
    from tests.unit.test_train import tiny_config

    marker = tmp_path / "saving"
    child = subprocess.Popen([sys.executable, "-c", _SAVE_CHILD, str(tmp_path), str(marker)], cwd=REPO,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, child.stdout.read()
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.05)
        os.killpg(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step_00000002", "step_00000001"]  # no step_2
    assert latest_checkpoint(root) == root / "step_00000001"

    cfg = tiny_config(tmp_path, tmp_path / "run")
    torch.manual_seed(1)  # other initial weights: everything must come from the checkpoint
    model = Transformer(cfg.model)
    state = load_checkpoint(root / "step_00000001", model, build_optimizer(model, cfg.train))
    assert state == {"step": 1}
    expected = torch.load(tmp_path / "expected.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def _die_on_first_attempt() -> None:
    """Patch the trainer so the chosen rank SIGKILLs itself before step ELASTIC_KILL_AT_STEP + 1."""
    from dsv3_train.trainer import Trainer

    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if os.environ.get("RANK") != os.environ["ELASTIC_KILL_RANK"]:
        return
    kill_at, train_step = int(os.environ["ELASTIC_KILL_AT_STEP"]), Trainer.train_step

    def train_step_or_die(self):
        if self.step == kill_at:
            print(f"elastic test: rank {os.environ['RANK']} SIGKILLs itself before step {kill_at + 1}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(self)

    Trainer.train_step = train_step_or_die


if __name__ == "__main__":
    _die_on_first_attempt()
    from dsv3_train.train import main

    main()
