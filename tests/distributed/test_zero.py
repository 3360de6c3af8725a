"""ZeRO data parallelism (FSDP2, dense over dp, experts over edp) equals one process on the global batch.

Every layout trains the same tiny model for 3 optimizer steps with 2 accumulated micro-batches per
rank. The reference is one process holding every expert, computed here: one forward and backward
over the whole global batch, torch's clip_grad_norm_, AdamW, and the bias update. Step 2 skews the
routers so that experts 2..7 receive no tokens; in step 3 the first two sequences repeat a single
token, so dp rank 0 dispatches very differently from the others.
"""
import contextlib
import functools

import pytest
import torch
import torch.distributed as dist

from dsv3_train.config import ModelConfig, TrainConfig
from dsv3_train.model.moe import routers, update_expert_biases
from dsv3_train.model.transformer import Transformer
from dsv3_train.trainer import build_optimizer
from parallel.expert import apply_expert_parallel
from parallel.mesh import ParallelDims, ParallelMesh
from parallel.testing import run_ranks
from parallel.zero import apply_zero, clip_grad_norm_, reduce_expert_load, set_gradient_sync

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_dense_layers=1, n_heads=2, inter_dim=64,
                  moe_inter_dim=16, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                  n_expert_groups=2, n_limited_groups=1, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=8, v_head_dim=8, max_seq_len=16, mtp_depth=1, init_std=0.02,
                  balance_loss_alpha=1e-2)
TRAIN = TrainConfig(lr=1e-2)
SEED, STEPS, GLOBAL_BATCH, SEQ_LEN, GRAD_ACCUM = 0, 3, 8, 8, 2
MTP_WEIGHT, BIAS_SPEED, MAX_NORM, ADAM_EPS = 0.3, 0.01, 0.5, 1e-3
ZERO_TOKEN_STEP, UNEVEN_STEP = 1, 2  # 0-based
SKEW = torch.tensor([1.0, 1.0, 0, 0, 0, 0, 0, 0])  # on top of the biases: every token picks experts 0, 1
LAYOUTS = [(2, 1), (2, 2), (4, 2), (4, 4)]  # (dp, ep)


def _global_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1), generator=gen) for _ in range(STEPS)]
    batches[UNEVEN_STEP][:2] = 7  # dp rank 0's sequences (for dp=4; half of them for dp=2)
    return batches


def _optimizer(model) -> torch.optim.AdamW:
    """The trainer's AdamW, with eps raised for conditioning. Adam's first steps move every element
    by about lr * g / (|g| + eps): at eps = 1e-8, elements whose gradient is near eps (every matrix
    has some) turn fp32 rounding differences of ~1e-10 into parameter differences of ~0.1 * lr,
    and two correct fp32 runs (one batch vs. eight micro-batches) drift apart by 1e-4 relative
    after one step. At eps = 1e-3 they agree to 7e-7 over all three steps."""
    optimizer = build_optimizer(model, TRAIN)
    for group in optimizer.param_groups:
        group["eps"] = ADAM_EPS
    return optimizer


def _skew_routers(model, step: int, sign: int) -> None:
    if step == ZERO_TOKEN_STEP:
        for _, router in routers(model):
            router.expert_bias += sign * SKEW


def _rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@functools.lru_cache(maxsize=None)
def _reference():
    """One process, all experts, the whole global batch per step."""
    torch.manual_seed(SEED)
    model = Transformer(CFG)
    optimizer = _optimizer(model)
    steps = []
    for step, batch in enumerate(_global_batches()):
        with torch.no_grad():
            _skew_routers(model, step, +1)
        loss = model.loss(batch, MTP_WEIGHT).total
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loads = update_expert_biases(model, BIAS_SPEED)
        with torch.no_grad():
            _skew_routers(model, step, -1)
        biases = {name: r.expert_bias.clone() for name, r in routers(model)}
        steps.append({"loss": loss.item(), "grads": grads, "norm": norm.item(), "loads": loads,
                      "biases": biases})
    return steps, {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------- the ranks' side
def _full(tensor, name: str, mesh: ParallelMesh) -> torch.Tensor:
    """A gradient or parameter shard -> the whole tensor; experts also gathered across ep ranks."""
    full = tensor.full_tensor()
    if ".experts." in name and mesh.dims.ep > 1:
        parts = [torch.empty_like(full) for _ in range(mesh.dims.ep)]
        dist.all_gather(parts, full.contiguous(), group=mesh.group("ep"))
        full = torch.cat(parts)
    return full


class _CollectiveCounter:
    """Counts FSDP's all-gathers and reduce-scatters (they go through these two functions)."""

    def __init__(self):
        self.counts = {"all_gather": 0, "reduce_scatter": 0}
        self._originals = {"all_gather": dist.all_gather_single, "reduce_scatter": dist.reduce_scatter_single}

    @contextlib.contextmanager
    def counting(self):
        def wrap(kind):
            def call(*args, **kwargs):
                self.counts[kind] += 1
                return self._originals[kind](*args, **kwargs)
            return call

        dist.all_gather_single, dist.reduce_scatter_single = wrap("all_gather"), wrap("reduce_scatter")
        before = dict(self.counts)
        try:
            yield
        finally:
            dist.all_gather_single = self._originals["all_gather"]
            dist.reduce_scatter_single = self._originals["reduce_scatter"]
            self.last = {k: self.counts[k] - before[k] for k in self.counts}


def _train(mesh: ParallelMesh, rank: int, stage: int) -> dict:
    dp, dp_rank = mesh.dims.dp, mesh.dims.rank_coordinates(rank)["dp"]
    torch.manual_seed(SEED)
    model = Transformer(CFG)
    apply_expert_parallel(model, mesh.group("ep"))
    apply_zero(model, mesh, stage=stage)
    optimizer = _optimizer(model)
    reduce_load = reduce_expert_load(mesh)
    counter = _CollectiveCounter()
    steps = []
    for step, batch in enumerate(_global_batches()):
        with torch.no_grad():
            _skew_routers(model, step, +1)
        loss, comms = torch.zeros(()), []
        for index, micro_batch in enumerate(batch.chunk(dp)[dp_rank].chunk(GRAD_ACCUM)):
            set_gradient_sync(model, index == GRAD_ACCUM - 1)
            with counter.counting():
                total = model.loss(micro_batch, MTP_WEIGHT).total
                (total / GRAD_ACCUM).backward()
            comms.append(counter.last)
            loss += total.detach() / GRAD_ACCUM
        dist.all_reduce(loss, group=mesh.group("dp"))
        local_loads = {name: r.expert_load.clone() for name, r in routers(model)}
        missing = [name for name, p in model.named_parameters() if p.grad is None]
        assert not missing, f"rank {rank}: no gradient for {missing}"
        grads = {name: _full(p.grad, name, mesh) for name, p in model.named_parameters()}
        norm = clip_grad_norm_(model, MAX_NORM)
        clipped = torch.stack([_full(p.grad, name, mesh).norm() for name, p in model.named_parameters()]).norm()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loads = update_expert_biases(model, BIAS_SPEED, reduce_load)
        with torch.no_grad():
            _skew_routers(model, step, -1)
        biases = {name: r.expert_bias.clone() for name, r in routers(model)}
        steps.append({"loss": loss.item() / dp, "norm": norm.item(), "clipped_norm": clipped.item(),
                      "loads": loads, "local_loads": local_loads, "biases": biases, "comms": comms,
                      "grads": grads if rank == 0 else None})
    params = {name: _full(p.detach(), name, mesh) for name, p in model.named_parameters()}
    return {"steps": steps, "params": params if rank == 0 else None}


def _zero_worker(rank, world, dp, ep, stages):
    mesh = ParallelDims(dp=dp, ep=ep).build_mesh("cpu")
    return {stage: _train(mesh, rank, stage) for stage in stages}


EXTRA_STAGES = {(2, 1): (1,), (4, 2): (3,)}  # stage 1 (run as 2) and stage 3 ride along one layout each


@functools.lru_cache(maxsize=None)
def _distributed_run(dp: int, ep: int) -> list[dict]:
    """Per rank: {stage: results}; one spawn per layout, shared by the tests below."""
    return run_ranks(_zero_worker, dp, dp, ep, (2, *EXTRA_STAGES.get((dp, ep), ())), timeout=150)


# ---------------------------------------------------------------------------- the specification
def _assert_matches_reference(results: list[dict], stage: int) -> None:
    reference, ref_params = _reference()
    for step, ref in enumerate(reference):
        for rank, by_stage in enumerate(results):
            ours = by_stage[stage]["steps"][step]
            assert abs(ours["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (rank, step, ours["loss"], ref["loss"])
            assert abs(ours["norm"] - ref["norm"]) <= 1e-5 * ref["norm"], (rank, step, ours["norm"], ref["norm"])
            for name, bias in ref["biases"].items():
                assert torch.equal(ours["loads"][name], ref["loads"][name]), (rank, step, name)
                assert torch.equal(ours["biases"][name], bias), (rank, step, name)
        grads = results[0][stage]["steps"][step]["grads"]
        for name, ref_grad in ref["grads"].items():
            assert _rel_err(grads[name], ref_grad) < 1e-5, (step, name, _rel_err(grads[name], ref_grad))
    params = results[0][stage]["params"]
    for name, ref_param in ref_params.items():
        assert _rel_err(params[name], ref_param) < 1e-5, (name, _rel_err(params[name], ref_param))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dp, ep", LAYOUTS)
def test_stage_2_training_matches_single_process(dp, ep):
    """Losses, reduced gradients (experts gathered across ep too), norms, final parameters, and
    expert biases on every rank equal the one-process run on the global batch."""
    _assert_matches_reference(_distributed_run(dp, ep), stage=2)


@pytest.mark.timeout(240)
def test_stage_3_training_matches_single_process():
    _assert_matches_reference(_distributed_run(4, 2), stage=3)


@pytest.mark.timeout(240)
def test_stage_1_runs_as_stage_2():
    results = _distributed_run(2, 1)
    _assert_matches_reference(results, stage=1)
    for by_stage in results:
        assert [s["loss"] for s in by_stage[1]["steps"]] == [s["loss"] for s in by_stage[2]["steps"]]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dp, ep", [(4, 2), (4, 4)])
def test_global_grad_norm_covers_every_shard_and_clips(dp, ep):
    reference, _ = _reference()
    for step, ref in enumerate(reference):
        ref_norm = torch.stack([g.norm() for g in ref["grads"].values()]).norm().item()
        assert ref_norm > 1.5 * MAX_NORM  # clipping really happens
        for by_stage in _distributed_run(dp, ep):
            ours = by_stage[2]["steps"][step]
            assert abs(ours["norm"] - ref_norm) <= 1e-5 * ref_norm
            assert abs(ours["clipped_norm"] - MAX_NORM) <= 1e-5 * MAX_NORM


@pytest.mark.timeout(240)
def test_zero_token_experts_and_uneven_dispatch_are_exercised():
    reference, _ = _reference()
    for name, load in reference[ZERO_TOKEN_STEP]["loads"].items():
        assert load[2:].sum() == 0 and load[:2].sum() > 0, name
    # dp=4, ep=4: tokens each dp rank sends to each ep rank (2 experts per ep rank) in step 3.
    results = _distributed_run(4, 4)
    for name in reference[UNEVEN_STEP]["loads"]:
        sent = torch.stack([r[2]["steps"][UNEVEN_STEP]["local_loads"][name].view(4, 2).sum(1) for r in results])
        assert sent.max() >= 3 * sent.min().clamp_min(1), (name, sent)  # (source rank, destination rank)
        assert not torch.equal(sent[0], sent[1]), (name, sent)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", [2, 3])
def test_gradients_are_reduced_once_per_step(stage):
    """No reduce-scatter in the accumulating micro-batch; stage 2 gathers parameters only once."""
    for by_stage in _distributed_run(4, 2):
        for step in by_stage[stage]["steps"]:
            accumulate, last = step["comms"]
            assert accumulate["reduce_scatter"] == 0 and last["reduce_scatter"] > 0
            assert accumulate["all_gather"] > 0
            if stage == 2:
                assert last["all_gather"] == 0
            else:
                assert last["all_gather"] > 0


def test_invalid_stage_is_refused():
    mesh = ParallelMesh(ParallelDims(dp=2), mesh=None, expert_mesh=None)
    with pytest.raises(ValueError, match=r"zero stage \(4\) must be one of \(1, 2, 3\)"):
        apply_zero(Transformer(CFG), mesh, stage=4)


def test_experts_must_be_sharded_over_ep_first():
    mesh = ParallelMesh(ParallelDims(dp=2, ep=2), mesh=None, expert_mesh=None)
    with pytest.raises(ValueError, match=r"apply_expert_parallel\(model, mesh.group\('ep'\)\) before apply_zero"):
        apply_zero(Transformer(CFG), mesh)
