"""CUDA only (GPU CI, .ci/gpu-tests): the trainer really trains on the GPU and agrees with the CPU.

train.device=auto puts the model and every batch on this process's GPU; the same seed gives the
same initial weights (initialised on the CPU RNG, then moved), so three fp32 steps give the CPU
run's losses to GPU-vs-CPU kernel rounding.
"""
import pytest
import torch

from dsv3_train.train import run
from tests.distributed.test_train_parallel import _corpus
from tests.unit.test_train import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("corpus"))


def test_trainer_runs_on_the_gpu_and_matches_the_cpu(corpus, tmp_path):
    torch.cuda.reset_peak_memory_stats()
    gpu = run(tiny_config(corpus, tmp_path / "gpu", steps=3, eval_every=3, device="cuda"))
    assert torch.cuda.max_memory_allocated() > 0  # the model and its activations lived on the GPU
    cpu = run(tiny_config(corpus, tmp_path / "cpu", steps=3, eval_every=3, device="cpu"))
    for ours, ref in zip(gpu, cpu):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert gpu[-1]["val_loss"] == pytest.approx(cpu[-1]["val_loss"], rel=1e-4)


def test_bf16_autocast_runs_on_the_gpu(corpus, tmp_path):
    metrics = run(tiny_config(corpus, tmp_path / "bf16", steps=2, eval_every=2, device="cuda",
                              precision="bf16"))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
