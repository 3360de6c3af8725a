"""The trainer on several gloo ranks: equal to one process, checkpoints that reshard, torchrun."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3_train.config import ConfigError, ParallelConfig
from dsv3_train.data import build_dataset
from dsv3_train.train import run
from parallel.testing import run_ranks
from tests.unit.test_train import tiny_config

pytestmark = pytest.mark.timeout(600)

GLOBAL_ROWS = 8  # sequences per optimizer step, the same in every layout
MICRO = 2  # rows per micro-batch, so every layout sees the same micro-batches


def _corpus(root: Path) -> Path:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    root.mkdir(parents=True, exist_ok=True)
    for doc in range(40):
        lines = [" ".join(words[(doc * 7 + i * j) % len(words)] for j in range(8)) for i in range(30)]
        (root / f"doc{doc:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = _corpus(tmp_path_factory.mktemp("corpus"))
    cfg = tiny_config(root, tmp_path_factory.mktemp("cache-owner") / "run")
    build_dataset(cfg.data, cfg.model.vocab_size, progress=False)  # one cache, built before any rank runs
    return root, cfg.data.cache_dir


def layout_config(corpus, run_dir, dp=1, ep=1, steps=3, resume="auto", every=2, pp=1, schedule="none",
                  rows=GLOBAL_ROWS, n_layers=3):
    root, cache_dir = corpus
    cfg = tiny_config(root, run_dir, steps=steps, micro_batch_size=MICRO, grad_accum=rows // (MICRO * dp),
                      eval_every=steps)
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, cache_dir=cache_dir),
        model=dataclasses.replace(cfg.model, n_layers=n_layers),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=every, resume=resume),
        parallel=ParallelConfig(pp=pp, dp=dp, ep=ep, schedule=schedule))


def _run_rank(rank, world_size, cfg):
    return run(cfg)


def train(cfg):
    world = cfg.parallel.dp * cfg.parallel.pp
    return run(cfg) if world == 1 else run_ranks(_run_rank, world, cfg, timeout=300)[0]


def assert_close(actual, expected, rel=1e-5):
    assert actual == pytest.approx(expected, rel=rel), (actual, expected)


@pytest.mark.parametrize("dp,ep", [(2, 1), (2, 2), (4, 2), (4, 4)])
def test_trainer_on_ranks_equals_one_process(corpus, tmp_path, dp, ep):
    reference = train(layout_config(corpus, tmp_path / "one"))
    parallel = train(layout_config(corpus, tmp_path / "many", dp=dp, ep=ep))
    assert [m["step"] for m in parallel] == [1, 2, 3]
    for ours, ref in zip(parallel, reference):
        for key in ("loss", "total_loss", "mtp_loss", "balance_loss", "grad_norm"):
            assert_close(ours[key], ref[key])
        for name, load in ref["expert_load"].items():  # loads summed over ranks before the bias update
            assert ours["expert_load"][name] == pytest.approx(load, abs=1e-12)
    assert_close(parallel[-1]["val_loss"], reference[-1]["val_loss"])
    logged = [json.loads(line) for line in (tmp_path / "many" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3]  # rank 0 alone writes metrics


@pytest.mark.parametrize("schedule,pp,dp,ep", [("1f1b", 2, 1, 1), ("dualpipev", 2, 1, 1), ("dualpipe", 2, 2, 2)])
def test_pipeline_trainer_equals_one_process(corpus, tmp_path, schedule, pp, dp, ep):
    """parallel.pp > 1: the trainer hands each step to the pipeline runtime (4 blocks, 8 micro-batches)."""
    shape = dict(rows=16, n_layers=4)
    reference = train(layout_config(corpus, tmp_path / "one", **shape))
    piped = train(layout_config(corpus, tmp_path / "pp", pp=pp, dp=dp, ep=ep, schedule=schedule, **shape))
    for ours, ref in zip(piped, reference):
        for key in ("loss", "total_loss", "mtp_loss", "balance_loss", "grad_norm"):
            assert_close(ours[key], ref[key])
        # rank 0 reports every stage's routers, by their names in the Transformer
        assert set(ours["expert_load"]) == set(ref["expert_load"])
        for name, load in ours["expert_load"].items():
            assert load == pytest.approx(ref["expert_load"][name], abs=1e-12), name
    assert_close(piped[-1]["val_loss"], reference[-1]["val_loss"])


def test_pipeline_checkpoint_resumes_the_same_steps(corpus, tmp_path):
    """A DualPipe run (pp=2, copies of each stage on two ranks) resumed from step 2 repeats step 3."""
    shape = dict(pp=2, schedule="dualpipe", rows=8, n_layers=4)
    straight = train(layout_config(corpus, tmp_path / "straight", every=2, **shape))
    checkpoint = tmp_path / "straight" / "checkpoints" / "step_00000002"
    resumed = train(layout_config(corpus, tmp_path / "resumed", resume=str(checkpoint), **shape))
    assert [m["step"] for m in resumed] == [3]
    for key in ("loss", "total_loss", "grad_norm", "val_loss"):
        assert resumed[0][key] == straight[2][key], key


PIPELINE_CHECKPOINTS = {  # name: (source layout, target layout), as layout_config keywords
    "dualpipe-pp2dp2ep2-same": (dict(pp=2, dp=2, ep=2, schedule="dualpipe"),
                                dict(pp=2, dp=2, ep=2, schedule="dualpipe")),
    "dualpipe-pp2dp2ep2-to-one": (dict(pp=2, dp=2, ep=2, schedule="dualpipe"), dict()),
    "dp2ep2-to-1f1b-pp2": (dict(dp=2, ep=2), dict(pp=2, schedule="1f1b")),
    "1f1b-pp2-to-dualpipev-pp2dp2ep2": (dict(pp=2, schedule="1f1b"),
                                        dict(pp=2, dp=2, ep=2, schedule="dualpipev")),
}


@pytest.mark.parametrize("name", list(PIPELINE_CHECKPOINTS))
def test_pipeline_checkpoint_resumes_at_any_layout(corpus, tmp_path, name):
    """Pipeline checkpoints hold the Transformer's names and global expert tensors, so they resume
    at the same layout (every ep rank's experts kept) and at any other, with or without pp."""
    source, target = PIPELINE_CHECKPOINTS[name]
    shape = dict(rows=16, n_layers=4)  # DualPipe on pp=2 needs >= 4 micro-batches per dp rank
    straight = train(layout_config(corpus, tmp_path / "source", every=2, **shape, **source))
    checkpoint = tmp_path / "source" / "checkpoints" / "step_00000002"
    resumed = train(layout_config(corpus, tmp_path / "resumed", resume=str(checkpoint), **shape, **target))
    assert [m["step"] for m in resumed] == [3]
    for key in ("loss", "total_loss", "grad_norm", "val_loss"):
        if source == target:  # the same layout repeats the step bit for bit (overlap on, ep > 1:
            assert resumed[0][key] == straight[2][key], key  # weight-grad order is fixed)
        else:
            assert_close(resumed[0][key], straight[2][key])
    for name, load in straight[2]["expert_load"].items():
        assert resumed[0]["expert_load"][name] == pytest.approx(load, abs=1e-12)


@pytest.mark.parametrize("source,target", [((2, 2), (1, 1)), ((2, 2), (4, 4)), ((1, 1), (4, 2))],
                         ids=["dp2ep2-to-dp1", "dp2ep2-to-dp4ep4", "dp1-to-dp4ep2"])
def test_checkpoint_resumes_at_another_layout(corpus, tmp_path, source, target):
    """Stopped after step 2 at one (dp, ep) and resumed at another: step 3 is the same step."""
    straight = train(layout_config(corpus, tmp_path / "source", *source, every=2))
    checkpoint = tmp_path / "source" / "checkpoints" / "step_00000002"
    assert checkpoint.is_dir()
    resumed = train(layout_config(corpus, tmp_path / "resumed", *target, resume=str(checkpoint)))
    assert [m["step"] for m in resumed] == [3]
    for key in ("loss", "total_loss", "grad_norm", "val_loss"):
        assert_close(resumed[0][key], straight[2][key])
    for name, load in straight[2]["expert_load"].items():  # the restored biases route alike
        assert resumed[0]["expert_load"][name] == pytest.approx(load, abs=1e-12)


def test_parallel_run_in_one_process_is_refused_before_any_work(corpus, tmp_path):
    cfg = layout_config(corpus, tmp_path / "run", dp=2)
    with pytest.raises(ConfigError, match=r"parallel.dp \(2\).*torchrun --nproc-per-node 2"):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_torchrun_trains_with_rank_zero_logging(corpus, tmp_path):
    root, cache_dir = corpus
    run_dir = tmp_path / "tr"
    overrides = [f"run_dir={run_dir}", f"data.source={root}", f"data.cache_dir={cache_dir}", "data.max_bytes=0",
                 "model.vocab_size=300", "model.max_seq_len=64", "train.seq_len=32", "train.micro_batch_size=2",
                 "train.steps=3", "train.eval_every=3", "train.eval_batches=1", "logger.progress=false",
                 "parallel.dp=2", "parallel.ep=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "dsv3_train.train", *overrides],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("model toy:") == 1  # one rank prints
    assert "on 2 ranks (dp 2, ep 2)" in result.stdout
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "step_00000003").is_dir()
