"""Pipeline schedules train exactly like one process on the global batch.

For 1F1B, DualPipe and DualPipeV (and ZB1P) on pp=2 and pp=4, and on pp=2 x dp=2 x ep=2 with the
overlapped forward&backward off and on: three optimizer steps with MTP on, gradient clipping
and the router-bias update. The reference is one process holding the whole model, computed
here: ``Transformer.loss`` on the whole global batch, ``backward``, torch's ``clip_grad_norm_``,
AdamW, ``update_expert_biases``. Losses, gradients (before clipping), gradient norms, final
parameters and router biases agree within 1e-5 relative, and every copy of a parameter on
another rank (DualPipe's mirrored stages, 1F1B's MTP embedding) is bit-for-bit the same.

AdamW's eps is raised to 1e-3 (the trainer uses 1e-8): at 1e-8, elements whose gradient is near
eps turn fp32 rounding differences (one batch vs. micro-batches) into ~1e-4 relative parameter
differences after one step, for any two correct runs (see tests/distributed/test_zero.py).
The learning rate is 3e-3, not 1e-2: at 1e-2 each step moves the tiny model's weights by half
their scale, and one process accumulating eight micro-batches already drifts 1.2e-5 relative
from one process on the whole batch by step 3 (at 3e-3: 1e-6), whichever pipeline runs them.

bf16: the overlapped DualPipe step under bf16 autocast runs every linear of every phase in bf16
(forward hooks see each output's dtype), and its loss and gradients equal one process running
the same micro-batches under the same autocast to bf16's resolution (measured: 2e-3 relative on
the gradients, the same order as bf16 vs fp32, 4e-3: rounding differences of one ulp in any
activation, from different row batching in the expert GEMMs, propagate through bf16).
"""
import functools

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dsv3_train.config import ModelConfig, TrainConfig
from dsv3_train.model.moe import routers, update_expert_biases
from dsv3_train.model.transformer import Transformer
from dsv3_train.precision import Linear
from dsv3_train.trainer import autocast_context, build_optimizer
from parallel.mesh import ParallelDims
from parallel.pipeline.runtime import build_pipeline
from parallel.testing import run_ranks

STEPS, GLOBAL_BATCH, SEQ_LEN = 3, 8, 8
MTP_WEIGHT, BIAS_SPEED, MAX_NORM, ADAM_EPS, TOLERANCE = 0.3, 0.01, 0.5, 1e-3, 1e-5
TRAIN = TrainConfig(lr=3e-3)


def _config(n_layers: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=32, n_layers=n_layers, n_dense_layers=1, n_heads=2,
                       inter_dim=64, moe_inter_dim=16, n_routed_experts=8, n_shared_experts=1,
                       n_activated_experts=2, n_expert_groups=2, n_limited_groups=1, kv_lora_rank=16,
                       qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=16,
                       mtp_depth=1, init_std=0.02, balance_loss_alpha=1e-2)


def _global_batches(cfg: ModelConfig) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1), generator=gen) for _ in range(STEPS)]


def _optimizer(parameters_of) -> torch.optim.AdamW:
    optimizer = build_optimizer(parameters_of, TRAIN)
    for group in optimizer.param_groups:
        group["eps"] = ADAM_EPS
    return optimizer


@functools.lru_cache(maxsize=None)
def _reference(n_layers: int):
    """One process, the whole model, the whole global batch per step."""
    cfg = _config(n_layers)
    torch.manual_seed(0)
    model = Transformer(cfg)
    optimizer = _optimizer(model)
    steps = []
    for batch in _global_batches(cfg):
        total = model.loss(batch, MTP_WEIGHT).total
        total.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_expert_biases(model, BIAS_SPEED)
        steps.append({"loss": total.item(), "grads": grads, "norm": norm.item()})
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    biases = {name: r.expert_bias.clone() for name, r in routers(model)}
    model.eval()
    with torch.no_grad():
        steps[-1]["eval"] = model.loss(_global_batches(cfg)[0], 0.0).main.item()
    return steps, params, biases


# ---------------------------------------------------------------------------- the ranks' side
def _full(tensor: torch.Tensor, name: str, mesh) -> torch.Tensor:
    """A ZeRO shard -> the whole tensor; an ep rank's experts -> all experts."""
    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
    if ".experts." in name and mesh.dims.ep > 1:
        parts = [torch.empty_like(full) for _ in range(mesh.dims.ep)]
        dist.all_gather(parts, full.contiguous(), group=mesh.group("ep"))
        full = torch.cat(parts)
    return full.clone()


def _train(mesh, n_layers: int, schedule: str, microbatches: int, overlap: bool) -> dict:
    cfg = _config(n_layers)
    dp_rank = mesh.dims.rank_coordinates(dist.get_rank())["dp"]
    torch.manual_seed(0)
    stages, runtime = build_pipeline(Transformer(cfg), mesh, schedule, microbatches,
                                     zero_stage=2 if mesh.dims.dp > 1 else None, overlap=overlap)
    optimizer = _optimizer(stages)
    params = stages.canonical_parameters()
    steps = []
    for batch in _global_batches(cfg):
        terms = runtime.forward_backward(stages, batch.chunk(mesh.dims.dp)[dp_rank], MTP_WEIGHT)
        loss = runtime.mean([terms["total_loss"]])[0]
        grads = {name: _full(params[name].grad, name, mesh) for name in sorted(params)}
        norm = runtime.clip_grad_norm(stages, MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_expert_biases(stages, BIAS_SPEED, runtime.reduce_load)
        steps.append({"loss": loss, "grads": grads, "norm": norm.item()})
    stages.eval()
    steps[-1]["eval"] = runtime.evaluate_loss(stages, _global_batches(cfg)[0])
    final = {name: _full(params[name], name, mesh) for name in sorted(params)}
    biases = {name: r.expert_bias.clone() for name, r in stages.routers_in_order()}
    return {"steps": steps, "params": final, "biases": biases}


def _bf16_step(mesh, n_layers: int, schedule: str, microbatches: int, overlap: bool) -> dict:
    """One step's loss and gradients under bf16 autocast."""
    cfg = _config(n_layers)
    dp_rank = mesh.dims.rank_coordinates(dist.get_rank())["dp"]
    torch.manual_seed(0)
    stages, runtime = build_pipeline(Transformer(cfg), mesh, schedule, microbatches, zero_stage=2,
                                     overlap=overlap, autocast=lambda: autocast_context("bf16"))
    batch = _global_batches(cfg)[0].chunk(mesh.dims.dp)[dp_rank]
    dtypes = []
    for module in stages.modules():
        if isinstance(module, Linear):
            module.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    terms = runtime.forward_backward(stages, batch, MTP_WEIGHT)
    params = stages.canonical_parameters()
    return {"loss": runtime.mean([terms["total_loss"]])[0], "linear_dtypes": dtypes,
            "grads": {name: _full(params[name].grad, name, mesh) for name in sorted(params)}}


def _worker(rank, world, pp, dp, ep, n_layers, runs, bf16_runs=()):
    mesh = ParallelDims(pp=pp, dp=dp, ep=ep).build_mesh("cpu")
    results = {run: _train(mesh, n_layers, *run) for run in runs}
    results.update({("bf16", *run): _bf16_step(mesh, n_layers, *run) for run in bf16_runs})
    return results


LAYOUTS = {  # (pp, dp, ep): (n_layers, micro-batches, runs of (schedule, overlap))
    (2, 1, 1): (4, 4, [("1f1b", False), ("zb1p", False), ("dualpipe", False), ("dualpipev", False)]),
    (4, 1, 1): (8, 8, [("1f1b", False), ("dualpipe", False), ("dualpipev", False)]),
    (2, 2, 2): (4, 4, [(s, o) for s in ("1f1b", "dualpipe", "dualpipev") for o in (False, True)]),
}


BF16_LAYOUT, BF16_RUN = (2, 2, 2), ("dualpipe", 4, True)  # run in the same spawn


@functools.lru_cache(maxsize=None)
def _distributed_run(layout: tuple[int, int, int]) -> list[dict]:
    """Per rank: {(schedule, micro-batches, overlap): results}; one spawn per layout."""
    pp, dp, ep = layout
    n_layers, microbatches, runs = LAYOUTS[layout]
    runs = tuple((schedule, microbatches, overlap) for schedule, overlap in runs)
    bf16_runs = (BF16_RUN,) if layout == BF16_LAYOUT else ()
    return run_ranks(_worker, pp * dp, pp, dp, ep, n_layers, runs, bf16_runs, timeout=280)


@functools.lru_cache(maxsize=None)
def _micro_batched_reference(n_layers: int, dp: int, microbatches: int, precision: str) -> dict:
    """One process, one step: each dp share's micro-batches in turn, loss / count, accumulated."""
    cfg = _config(n_layers)
    torch.manual_seed(0)
    model = Transformer(cfg)
    pieces = [mb for share in _global_batches(cfg)[0].chunk(dp) for mb in share.chunk(microbatches)]
    loss = 0.0
    for piece in pieces:
        with autocast_context(precision):
            total = model.loss(piece, MTP_WEIGHT).total / len(pieces)
        total.backward()
        loss += total.item()
    return {"loss": loss, "grads": {name: p.grad.clone() for name, p in model.named_parameters()}}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _cases():
    for layout, (n_layers, microbatches, runs) in LAYOUTS.items():
        for schedule, overlap in runs:
            name = f"pp{layout[0]}dp{layout[1]}ep{layout[2]}-{schedule}" + ("-overlap" if overlap else "")
            yield pytest.param(layout, n_layers, (schedule, microbatches, overlap), id=name)


# ---------------------------------------------------------------------------- the specification
@pytest.mark.slow
@pytest.mark.parametrize("layout, n_layers, run", list(_cases()))
def test_pipeline_step_equals_one_process_on_the_global_batch(layout, n_layers, run):
    ref_steps, ref_params, ref_biases = _reference(n_layers)
    per_rank = [r[run] for r in _distributed_run(layout)]
    for step, ref in enumerate(ref_steps):
        for rank, result in enumerate(per_rank):
            got = result["steps"][step]
            assert got["loss"] == pytest.approx(ref["loss"], rel=TOLERANCE), (step, rank)
            assert got["norm"] == pytest.approx(ref["norm"], rel=TOLERANCE), (step, rank)
            for name, grad in got["grads"].items():
                assert _rel_err(grad, ref["grads"][name]) < TOLERANCE, (step, rank, name)
    for rank, result in enumerate(per_rank):
        for name, param in result["params"].items():
            assert _rel_err(param, ref_params[name]) < TOLERANCE, (rank, name)
        for name, bias in result["biases"].items():
            assert torch.allclose(bias, ref_biases[name], atol=1e-6), (rank, name)


@pytest.mark.slow
@pytest.mark.parametrize("layout, n_layers, run", list(_cases()))
def test_every_parameter_is_trained_and_copies_stay_bitwise_equal(layout, n_layers, run):
    _, ref_params, ref_biases = _reference(n_layers)
    per_rank = [r[run] for r in _distributed_run(layout)]
    held: dict[str, list[torch.Tensor]] = {}
    for result in per_rank:
        for name, param in result["params"].items():
            held.setdefault(name, []).append(param)
    assert set(held) == set(ref_params)
    for name, copies in held.items():
        assert all(torch.equal(copy, copies[0]) for copy in copies), name
    biases: dict[str, list[torch.Tensor]] = {}
    for result in per_rank:
        for name, bias in result["biases"].items():
            biases.setdefault(name, []).append(bias)
    assert set(biases) == set(ref_biases)
    assert all(torch.equal(b, copies[0]) for copies in biases.values() for b in copies)


@pytest.mark.slow
@pytest.mark.parametrize("layout, n_layers, run", list(_cases()))
def test_forward_only_evaluation_equals_the_reference_loss(layout, n_layers, run):
    ref_steps, _, _ = _reference(n_layers)
    for result in _distributed_run(layout):
        assert result[run]["steps"][-1]["eval"] == pytest.approx(ref_steps[-1]["eval"], rel=TOLERANCE)


@pytest.mark.slow
def test_bf16_pipeline_step_equals_one_process_under_the_same_autocast():
    n_layers, dp = LAYOUTS[BF16_LAYOUT][0], BF16_LAYOUT[1]
    schedule, microbatches, overlap = BF16_RUN
    bf16 = _micro_batched_reference(n_layers, dp, microbatches, "bf16")
    fp32 = _micro_batched_reference(n_layers, dp, microbatches, "fp32")
    names = sorted(bf16["grads"])
    flat = {key: torch.cat([ref["grads"][n].flatten() for n in names]) for key, ref in
            (("bf16", bf16), ("fp32", fp32))}
    assert _rel_err(flat["bf16"], flat["fp32"]) > 1e-3  # autocast really changes the numbers
    for rank, result in enumerate(_distributed_run(BF16_LAYOUT)):
        got = result[("bf16", *BF16_RUN)]
        assert len(got["linear_dtypes"]) > 0 and set(got["linear_dtypes"]) == {torch.bfloat16}, rank
        assert sorted(got["grads"]) == names
        pipe = torch.cat([got["grads"][n].flatten() for n in names])
        assert _rel_err(pipe, flat["bf16"]) < 1e-2, rank
        assert _rel_err(pipe, flat["bf16"]) < _rel_err(pipe, flat["fp32"]), rank  # bf16, not fp32
        assert got["loss"] == pytest.approx(bf16["loss"], rel=1e-3), rank
