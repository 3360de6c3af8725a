"""ZeRO data parallelism with PyTorch FSDP2: dense parameters over ``dp``, expert parameters over ``edp``.

Call order (after ``apply_expert_parallel``, before building the optimizer)::

    apply_expert_parallel(model, mesh.group("ep"))
    apply_zero(model, mesh, stage=2)
    optimizer = build_optimizer(model, cfg.train)      # plain AdamW on the DTensor shards
    for step:
        for i, micro_batch in enumerate(micro_batches):  # one reduce per optimizer step
            with no_sync(model) if i < len(micro_batches) - 1 else nullcontext():
                (model.loss(micro_batch, ...).total / grad_accum).backward()
        clip_grad_norm_(model, max_norm)                  # global norm over every shard
        optimizer.step(); optimizer.zero_grad()
        update_expert_biases(model, speed, reduce_expert_load(mesh))

Layout
  1. each MoE layer's ``GroupedExperts`` (the E/ep experts this ep rank holds) is one FSDP unit
     sharded over the 1-D ``edp`` mesh: the ranks holding the same experts;
  2. each transformer block (main model and MTP) is one FSDP unit over ``dp``;
  3. the root unit over ``dp`` takes the rest: embedding, final norm, head, MTP projections.

Gradient scale. Each rank's loss is the mean over its own micro-batch, so the global-batch mean
is (1/dp) * sum over dp ranks. Dense gradients are summed over ``dp`` and divided by dp. An
expert's gradient on one rank already holds the contributions of the tokens of every rank in
its ep group (the all-to-all's backward brings them home), so summing over ``edp`` covers all dp
ranks' tokens exactly once: the divisor is again dp, not edp (FSDP's default would be edp).
Reductions are plain sums followed by that division (``set_force_sum_reduction_for_comms``):
gloo has no pre-scaled sum, and one code path keeps CPU and GPU numerics alike.

Stages. FSDP2 always reduce-scatters gradients, so it has no "replicated gradients, sharded
optimizer" mode (ZeRO-1). Stage 1 is therefore run as stage 2: the bytes on the wire per step
are the same (ZeRO-1 all-reduces gradients = reduce-scatter + all-gather, which is stage 2's
reduce-scatter of gradients + all-gather of parameters), and stage 2 holds less gradient memory.
During gradient accumulation both keep full local gradients, as ZeRO-1 does.
  - stage 1, 2: parameters stay unsharded from forward to backward and, inside ``no_sync``,
    across micro-batches (one all-gather and one reduce-scatter per unit per optimizer step);
  - stage 3: parameters are resharded after every forward and backward and re-gathered when
    needed (one all-gather per unit per forward and per backward).
After an evaluation forward under stage 1/2 the parameters stay gathered until the next
backward; call ``reshard(model)`` before a step that must see sharded parameters (e.g. saving).

Custom schedules (pipeline runtimes) drive the same switches: ``set_gradient_sync(model, False)``
before the forward of the first micro-batch, ``set_gradient_sync(model, True)`` before the
backward that is the last of the step on this rank; the reduce-scatters run inside that
backward, so clip and step only after it returns.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from dsv3_train.model.moe import MoE
from dsv3_train.model.transformer import Block
from parallel.expert import AllToAllDispatcher
from parallel.mesh import ParallelMesh

ZERO_STAGES = (1, 2, 3)
FORWARD_METHODS = ("loss",)  # Transformer entry points besides forward() that use root parameters


@dataclass(frozen=True)
class ZeroLayout:
    """What apply_zero did, kept on the model for the functions below."""

    stage: int
    mesh: ParallelMesh


def apply_zero(model: nn.Module, mesh: ParallelMesh, stage: int = 2) -> nn.Module:
    """Shard ``model`` in place (see the module docstring); returns it, now an FSDPModule."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"zero stage ({stage!r}) must be one of {ZERO_STAGES}: 1 = optimizer states "
                         f"(run as 2 with FSDP2), 2 = + gradients, 3 = + parameters")
    if isinstance(model, FSDPModule):
        raise ValueError("apply_zero was already applied to this model: apply it once, after "
                         "apply_expert_parallel and before building the optimizer")
    dims = mesh.dims
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        if isinstance(block.ffn, MoE) and dims.ep > 1 and not isinstance(block.ffn.dispatcher, AllToAllDispatcher):
            raise ValueError(f"ep ({dims.ep}) > 1 but the MoE layers still hold all experts: call "
                             f"apply_expert_parallel(model, mesh.group('ep')) before apply_zero")
    dp_mesh, edp_mesh = mesh.mesh["dp"], mesh.expert_mesh["edp"]
    reshard_after_forward = stage == 3
    for block in blocks:
        if isinstance(block.ffn, MoE):
            _shard(block.ffn.experts, edp_mesh, dims.dp, reshard_after_forward)
            # Experts without tokens still need a (zero) gradient in the edp reduce-scatter, or
            # its size would differ between ranks; GroupedExperts gives one, this guarantees it.
            block.ffn.experts.set_reduce_scatter_unused_params(True)
        _shard(block, dp_mesh, dims.dp, reshard_after_forward)
    # The root's parameters (embedding, head) are needed again as soon as backward starts.
    _shard(model, dp_mesh, dims.dp, reshard_after_forward=False)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    model._zero_layout = ZeroLayout(stage, mesh)
    return model


def _shard(module: nn.Module, mesh_1d, dp: int, reshard_after_forward: bool) -> None:
    """One FSDP unit over mesh_1d whose reduced gradients are sum / dp (see the module docstring)."""
    fully_shard(module, mesh=mesh_1d, reshard_after_forward=reshard_after_forward)
    module.set_gradient_divide_factor(float(dp))
    # Sum, then divide: gloo has no pre-scaled sum. Not on a one-rank mesh (edp = 1): there torch
    # 2.13's foreach_reduce divides by the factor in its local copy and again afterwards.
    module.set_force_sum_reduction_for_comms(mesh_1d.size() > 1)


def _fsdp_modules(model: nn.Module) -> Iterator[FSDPModule]:
    return (m for m in model.modules() if isinstance(m, FSDPModule))


def _layout(model: nn.Module) -> ZeroLayout:
    layout = getattr(model, "_zero_layout", None)
    if layout is None:
        raise ValueError("model is not ZeRO-sharded: call apply_zero(model, mesh) first")
    return layout


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce gradients in the coming backward (True), or only accumulate them locally (False).

    Stage 1/2 also keep the gathered parameters across the accumulation, so the next micro-batch's
    forward needs no all-gather; stage 3 reshards them to keep its memory bound.
    """
    layout = _layout(model)
    model.set_requires_gradient_sync(enabled)
    model.set_is_last_backward(enabled)
    if layout.stage < 3:
        model.set_reshard_after_backward(enabled)


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Micro-batches run inside accumulate gradients without communication."""
    set_gradient_sync(model, False)
    try:
        yield
    finally:
        set_gradient_sync(model, True)


def reshard(model: nn.Module) -> None:
    """Free every gathered parameter (stage 1/2 keep them after an evaluation forward)."""
    for module in _fsdp_modules(model):
        module.reshard()


def gather_for_accumulation(model: nn.Module) -> None:
    """Pipeline runtimes: gather every unit's parameters once and keep them until ``reduce_gradients``.

    A pipeline schedule interleaves many micro-batches' forwards, input-gradient and deferred
    weight-gradient backwards in an order FSDP's hooks cannot follow (and the phase-split forward
    calls a block's sub-modules directly), so the runtime does what the hooks would: initialise
    the root, all-gather each unit once, keep the parameters gathered, reduce nothing until the
    step's last backward on this rank has run. Stages 1 and 2 only: stage 3 reshards between
    micro-batches while deferred weight gradients still read the gathered parameters.
    """
    layout = _layout(model)
    if layout.stage == 3:
        raise ValueError("a pipeline schedule keeps parameters gathered across its micro-batches: "
                         "use parallel.zero_stage=1 or 2 with pp > 1 (DeepSeek-V3 uses ZeRO-1)")
    fully_shard.state(model)._lazy_init()  # no-op once done; root detection as a forward would
    set_gradient_sync(model, False)
    for module in _fsdp_modules(model):
        module.unshard()


def reduce_gradients(model: nn.Module) -> None:
    """Pipeline runtimes: reduce-scatter what accumulated since ``gather_for_accumulation``, reshard.

    The post-backward FSDP runs after a step's last backward, run by hand as
    torch.distributed.pipelining does (``_PipelineStageBase.perform_reduce_grad``): every unit's
    reduce-scatter, then the root's final callback that waits for them and resets FSDP's state.
    """
    set_gradient_sync(model, True)
    state = fully_shard.state(model)
    for unit_state in state._state_ctx.all_states:
        for group in unit_state._fsdp_param_groups:
            group.post_backward()
    state._root_post_backward_final_callback()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before.

    Every FSDP shard is disjoint: dense shards partition each dense parameter over ``dp``, and
    expert shards partition each ep rank's experts over ``edp`` while different ep ranks hold
    different experts, so over the whole ``dp`` group (= edp x ep) every element of every
    parameter appears exactly once. One sum of local squares over ``dp`` (and over ``pp``, whose
    stages hold different layers) is the global squared norm; every rank then clips alike.
    """
    layout = _layout(model)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if any(not isinstance(g, DTensor) for g in grads):
        raise ValueError("clip_grad_norm_ expects every gradient to be an FSDP shard (DTensor): "
                         "shard every parameter with apply_zero")
    local = [g.to_local() for g in grads]  # views of the shards: scaling them scales the grads
    device = local[0].device if local else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for g in local:
        squares += g.float().square().sum()
    dist.all_reduce(squares, group=layout.mesh.group("dp"))
    if layout.mesh.dims.pp > 1:
        dist.all_reduce(squares, group=layout.mesh.group("pp"))
    total_norm = squares.sqrt()
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for g in local:
        g.mul_(coef.to(g.dtype))
    return total_norm


def reduce_expert_load(mesh: ParallelMesh) -> Callable[[torch.Tensor], None]:
    """The ``reduce_load`` of update_expert_biases: sum a router's load counts over ``dp`` in place.

    Every rank's router counts the choices of its own tokens for all E experts; the sum is the
    global batch's load, identical on every rank, so the bias updates stay identical too.
    """
    group = mesh.group("dp")

    def reduce_load(load: torch.Tensor) -> None:
        dist.all_reduce(load, op=dist.ReduceOp.SUM, group=group)

    return reduce_load
