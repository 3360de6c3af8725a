"""Execute one rank's program of a schedule IR: real point-to-point, I/W split, one reduce per step.

``PipelineRuntime.step(batch)`` runs a whole optimizer step's forwards and backwards on this
rank's ``batch`` (its data-parallel share of the global batch), split into the schedule's
micro-batches, walking ``schedule.ranks[pp_rank]`` in order:

1. ``Recv``: post an ``irecv`` at once (receives are posted early); the consumer waits on it.
2. ``F``: run the chunk's phase-split forward (``overlap.stage_program``) on the received
   activation (or the tokens on stage 0); the last stage records the loss terms.
3. ``B`` / ``I``: backward from the received gradient (or from the loss, scaled by
   1 / micro-batches, so the step equals one process on the whole batch). ``I`` runs under the
   precision factory's ``defer_weight_grad``: linears and experts queue their weight-gradient
   GEMMs, which the runtime holds per (chunk, micro-batch) until that chunk's ``W`` runs them.
   The all-to-alls therefore all run in ``I``; ``W`` is local work that fills bubbles.
4. ``F&B``: the overlapped pair (``overlap.interleave``) when ``overlap`` is on, else F then B.
5. ``Send``: ``isend`` the produced tensor; every send is waited at the end of the step.
   A tensor whose consumer is on this rank (DualPipeV's turn at the last rank) is handed over
   without communication.

After the program: under ZeRO the gradients of every FSDP root are reduce-scattered once
(``zero.reduce_gradients``: nothing is reduced while the step runs), then the gradients of
parameters with copies on another rank (DualPipe's mirrored stages, 1F1B's MTP embedding; see
``stage``) are summed with the copies, as are DualPipe's router loads, so that the copies take
identical optimizer steps. ``clip_grad_norm`` counts every logical parameter once.

The runtime is also the trainer's runtime object (``forward_backward``, ``clip_grad_norm``,
``mean``, ``evaluate_loss``, ...; see docs/pipeline-runtime.md for the hook).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dsv3_train.precision import defer_weight_grad
from parallel import zero
from parallel.distributed import ExpertCheckpointLayout, mean_over
from parallel.expert import apply_expert_parallel

from .ir import (ACTIVATION, BACKWARD, FORWARD, INPUT_GRAD, WEIGHT_GRAD, Compute, Overlapped, Recv,
                 Schedule, Send, TensorKey, consumed, produced)
from .overlap import (BALANCE, MAIN, MTP, Tape, WaitFiller, interleave, run_forward, run_in_sequence,
                      stage_program)
from .schedules import build
from .stage import RankStages, canonical_name, split_model
from .transport import PointToPoint, default_exchange, install_exchange


@dataclass
class _Forward:
    tape: Tape
    input: Optional[torch.Tensor]  # the received activation (a leaf), None on stage 0


@dataclass
class _Step:
    """Everything one step's program touches, dropped when the step ends."""

    micro_batches: list[torch.Tensor]
    mtp_weight: float
    eos_id: Optional[int]
    recvs: dict = field(default_factory=dict)  # TensorKey -> PendingRecv
    outbox: dict = field(default_factory=dict)  # TensorKey -> tensor produced here
    sends: list = field(default_factory=list)
    forwards: dict = field(default_factory=dict)  # (stage, mb, direction) -> _Forward
    deferred: dict = field(default_factory=dict)  # (stage, mb, direction) -> DeferredWeightGrads
    flush: list = field(default_factory=list)  # a B's queued weight gradients, run when its action ends
    values: dict = field(default_factory=lambda: {MAIN: [], MTP: [], BALANCE: []})


def _chunk_key(c: Compute) -> tuple[int, int, int]:
    return c.stage, c.mb, c.direction


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class PipelineRuntime:
    """Runs ``schedule`` for the chunks in ``stages`` (see the module docstring)."""

    def __init__(self, stages: RankStages, schedule: Schedule, pp_group, *, dp_group=None,
                 overlap: bool = False, autocast: Callable = contextlib.nullcontext,
                 mesh=None, exchange="auto", profile: bool = False):
        plan = stages.plan
        if (schedule.name, schedule.pp) != (plan.schedule, plan.pp):
            raise ValueError(f"stages were split for {plan.schedule} on pp={plan.pp} but the schedule "
                             f"is {schedule.name} on pp={schedule.pp}: split and build the same one")
        self.stages, self.schedule, self.overlap, self.autocast = stages, schedule, overlap, autocast
        self.pp_rank, self.pp_group, self.dp_group, self.mesh = plan.pp_rank, pp_group, dp_group, mesh
        self.program = schedule.ranks[plan.pp_rank]
        self.p2p = PointToPoint(pp_group, dist.get_process_group_ranks(pp_group),
                                schedule.n_stages, schedule.microbatches)
        self.zero_roots = [m for m in stages.zero_roots() if hasattr(m, "_zero_layout")]
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        if self.dp_size > 1 and not self.zero_roots:
            raise ValueError(f"dp ({self.dp_size}) > 1 needs ZeRO-sharded stages: call "
                             f"apply_zero on each of stages.zero_roots() first")
        param = next(stages.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.filler = WaitFiller(self.device.type) if overlap else None
        """With overlap on: runs a B's queued weight-gradient GEMMs inside all-to-all waits."""
        self.pair_backward_first = True
        """Overlapped pairs start with the backward phase (``overlap.interleave``)."""
        self.set_exchange(default_exchange(self.device) if exchange == "auto" else exchange)
        self._check_copies_equal()
        self.profile = profile
        self.timeline: list[tuple[str, float, float]] = []
        """With ``profile``: (kind, start, end) of every compute action of the last step."""
        self.is_main = dist.get_rank() == 0
        self.reduce_load = zero.reduce_expert_load(mesh) if mesh is not None and self.dp_size > 1 else None
        self.checkpoint_layout = PipelineCheckpointLayout(stages, mesh) if mesh is not None else None

    def set_exchange(self, exchange) -> None:
        """Route the dispatchers' row exchanges through ``exchange`` (all_to_all_single's
        signature, e.g. ``EmulatedLink.exchange``; None: plain async collectives), with waits
        filled by weight-gradient GEMMs when overlapping."""
        install_exchange(self.stages, self.filler.wrap(exchange) if self.filler else exchange)

    # ------------------------------------------------------------------------------ the step
    def step(self, batch: torch.Tensor, mtp_weight: float, eos_id: Optional[int] = None) -> dict:
        """Forward and backward of ``batch`` (B, T+1) on this rank; gradients reduced and copies
        summed on return. Returns the loss terms (means over the batch, summed over stages)."""
        n = self.schedule.microbatches
        if batch.shape[0] % n:
            raise ValueError(f"this rank's batch ({batch.shape[0]} sequences) must split evenly into "
                             f"{n} micro-batches: make micro_batch_size x grad_accum a multiple of {n}")
        step = _Step(list(batch.chunk(n)), mtp_weight, eos_id)
        self.timeline = []
        for root in self.zero_roots:
            zero.gather_for_accumulation(root)
        for action in self.program:
            self._run(action, step)
        for work in step.sends:
            work.wait()
        assert not (step.forwards or step.deferred or step.recvs), "the schedule left work undone"
        for root in self.zero_roots:
            zero.reduce_gradients(root)
        self._sum_copies()
        return self._loss_terms(step)

    def _run(self, action, step: _Step) -> None:
        start = time.perf_counter()
        self._dispatch(action, step)
        if self.profile and not isinstance(action, (Send, Recv)):
            kind = f"F&{action.backward.kind}" if isinstance(action, Overlapped) else action.kind
            self.timeline.append((kind, start, time.perf_counter()))

    def _dispatch(self, action, step: _Step) -> None:
        if isinstance(action, Recv):
            step.recvs[action.key] = self.p2p.recv(action.key, action.peer,
                                                   self._buffer(step.micro_batches[0]))
        elif isinstance(action, Send):
            step.sends.append(self.p2p.send(action.key, action.peer, step.outbox.pop(action.key)))
        elif isinstance(action, Overlapped):
            pair = (self._forward(action.forward, step), self._backward(action.backward, step))
            if self.overlap:
                interleave(*pair, backward_first=self.pair_backward_first)
            else:
                run_in_sequence(*pair)
            self._flush(step)
        elif action.kind == FORWARD:
            run_in_sequence(self._forward(action, step))
        elif action.kind in (BACKWARD, INPUT_GRAD):
            run_in_sequence(self._backward(action, step))
            self._flush(step)
        elif action.kind == WEIGHT_GRAD:
            step.deferred.pop(_chunk_key(action)).compute()
        else:
            raise ValueError(f"unknown action {action}")

    def _flush(self, step: _Step) -> None:
        """The action is over: run what its B left queued."""
        for pending in step.flush:
            pending.compute()
            self.filler.remove(pending)
        step.flush.clear()

    def _buffer(self, tokens: torch.Tensor) -> torch.Tensor:
        """A receive buffer for the activation or gradient of micro-batch ``tokens`` (B, T+1)."""
        return torch.empty(tokens.shape[0], tokens.shape[1] - 1, self.stages.cfg.dim,
                           dtype=self.dtype, device=self.device)  # (B, T, D)

    @staticmethod
    def _take(step: _Step, key: TensorKey) -> torch.Tensor:
        """A consumed tensor: wait for its receive, or take it from this rank's producer."""
        if key in step.recvs:
            return step.recvs.pop(key).wait()
        return step.outbox.pop(key)

    def _forward(self, c: Compute, step: _Step) -> Iterator[None]:
        chunk = self.stages.chunk(c.direction, c.stage)
        carry, x = {}, None
        if not chunk.is_first:
            x = self._take(step, consumed(c, self.schedule.n_stages)).detach().requires_grad_()
            carry["h"] = x
        tape = Tape(cut=self.overlap)
        program = stage_program(chunk, carry, tape, step.micro_batches[c.mb], step.mtp_weight, step.eos_id)
        yield from run_forward(program, carry, tape, self.autocast)
        if not chunk.is_last:
            tape.finish(carry["h"])
            step.outbox[produced(c, self.schedule.n_stages)] = carry["h"].detach()
        for kind, values in tape.values.items():
            step.values[kind] += values
        step.forwards[_chunk_key(c)] = _Forward(tape, x)

    def _backward(self, c: Compute, step: _Step) -> Iterator[None]:
        chunk = self.stages.chunk(c.direction, c.stage)
        forward = step.forwards.pop(_chunk_key(c))
        grad = None if chunk.is_last else self._take(step, consumed(c, self.schedule.n_stages))
        # I defers the weight gradients to the chunk's W; with overlap on a B defers them too, to
        # the end of its action, so that the filler can run them inside the waits on the way (the
        # pair's forward may run on after the B: the last stage's chunks have more phases).
        fill = c.kind == BACKWARD and self.filler is not None
        defer = c.kind == INPUT_GRAD or fill
        with (defer_weight_grad(chunk) if defer else contextlib.nullcontext()) as pending:
            if fill:
                self.filler.add(pending)
            yield from forward.tape.backward_steps(grad, 1.0 / self.schedule.microbatches)
        if c.kind == INPUT_GRAD:
            step.deferred[_chunk_key(c)] = pending
        elif fill:  # left for the filler until the action ends: the pair's forward may still wait
            step.flush.append(pending)
        if not chunk.is_first:
            step.outbox[produced(c, self.schedule.n_stages)] = forward.input.grad

    # ----------------------------------------------------------------------- after the program
    def _copies(self):
        """(CopySync, parameters by canonical name), or (None, None) where no parameter has copies."""
        sync = self.stages.copy_sync()
        return (None, None) if sync is None else (sync, self.stages.canonical_parameters())

    @torch.no_grad()
    def _check_copies_equal(self) -> None:
        """Copies must start equal: the model has to be built identically on every rank."""
        sync, params = self._copies()
        if sync is None:
            return
        flat = torch.cat([_local(params[name]).reshape(-1) for name in sync.names])
        if not torch.equal(flat, self.p2p.exchange(sync.peer, flat)):
            raise ValueError(f"parameters with copies on pp rank {sync.peer} differ from them: build "
                             f"the model identically on every rank (same seed) before split_model")

    @torch.no_grad()
    def _sum_copies(self) -> None:
        """Gradients (and DualPipe's router loads) summed with the copies on the peer rank."""
        sync, params = self._copies()
        if sync is None:
            return
        tensors = [self._grad(params[name], name) for name in sync.names]
        if self.stages.plan.schedule == "dualpipe":
            tensors += [router.expert_load for _, router in self.stages.routers_in_order()]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        total = flat + self.p2p.exchange(sync.peer, flat)  # a + b here, b + a there: equal bits
        offset = 0
        for t in tensors:
            t.copy_(total[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    @staticmethod
    def _grad(param: torch.Tensor, name: str) -> torch.Tensor:
        if param.grad is None:
            if isinstance(param, DTensor):
                raise RuntimeError(f"{name} has no gradient after the ZeRO reduce")
            param.grad = torch.zeros_like(param)
        return _local(param.grad)

    def _loss_terms(self, step: _Step) -> dict:
        n, depth = self.schedule.microbatches, max(1, self.stages.cfg.mtp_depth)
        sums = [sum(v.double() for v in step.values[kind]) if step.values[kind] else 0.0
                for kind in (MAIN, MTP, BALANCE)]
        terms = torch.tensor([float(s) for s in sums], dtype=torch.float64)
        dist.all_reduce(terms, group=self.pp_group)  # each stage holds its own terms
        main, mtp, balance = (terms / torch.tensor([n, n * depth, n], dtype=torch.float64)).tolist()
        return {"loss": main, "total_loss": main + balance + step.mtp_weight * mtp,
                "mtp_loss": mtp, "balance_loss": balance}

    # ------------------------------------------------------------------- the trainer's runtime
    def forward_backward(self, model: nn.Module, batch: torch.Tensor, mtp_weight: float,
                         eos_id: Optional[int] = None) -> dict:
        """The trainer hook: replaces its micro-batch loop (``model`` is ``self.stages``)."""
        return self.step(batch, mtp_weight, eos_id)

    @torch.no_grad()
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip by the global norm over all stages, each logical parameter counted once."""
        params = self.stages.canonical_parameters()
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        for name, param in params.items():
            if param.grad is not None and self.stages.counts_in_norm(name):
                squares += _local(param.grad).float().square().sum()
        if self.zero_roots and self.dp_size > 1:  # ZeRO shards partition each stage over dp
            dist.all_reduce(squares, group=self.dp_group)
        dist.all_reduce(squares, group=self.pp_group)
        total_norm = squares.sqrt()
        coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
        for param in params.values():
            if param.grad is not None:
                _local(param.grad).mul_(coef.to(param.grad.dtype))
        return total_norm

    def mean(self, values: list[float]) -> list[float]:
        """Average per-rank scalars over the data-parallel ranks (already summed over stages)."""
        return values if self.dp_size == 1 else mean_over(self.dp_group, values)

    def all_loads(self, loads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The expert loads of every stage's routers, by their names in the Transformer."""
        gathered = [None] * dist.get_world_size(self.pp_group)
        dist.all_gather_object(gathered, {canonical_name(name): load.cpu() for name, load in loads.items()},
                               group=self.pp_group)
        merged = {name: load for part in gathered for name, load in part.items()}
        return dict(sorted(merged.items(), key=lambda item: _layer_order(item[0])))

    def reshard(self, model: nn.Module) -> None:
        for root in self.zero_roots:
            zero.reshard(root)

    @torch.no_grad()
    def evaluate_loss(self, model: nn.Module, batch: torch.Tensor, eos_id: Optional[int] = None) -> float:
        """Main next-token loss of ``batch`` through the direction-0 stages, forward only."""
        for root in self.zero_roots:
            zero.gather_for_accumulation(root)
        placement, n_stages = self.schedule.placement[0], self.schedule.n_stages
        main, h = torch.zeros((), dtype=torch.float64), None
        for s in range(n_stages):
            if placement[s] != self.pp_rank:
                continue
            carry = {}
            if s > 0:
                if placement[s - 1] != self.pp_rank:
                    h = self._buffer(batch)
                    dist.recv(h, src=self.p2p.global_ranks[placement[s - 1]], group=self.pp_group,
                              tag=self.p2p.tag(TensorKey(ACTIVATION, s - 1, 0)))
                carry["h"] = h
            tape = Tape(cut=False)
            chunk = self.stages.chunk(0, s)
            run_in_sequence(run_forward(stage_program(chunk, carry, tape, batch, 0.0, eos_id),
                                        carry, tape, self.autocast))
            if chunk.is_last:
                main += tape.values[MAIN][0].double().cpu()
            else:
                h = carry["h"]
                if placement[s + 1] != self.pp_rank:
                    dist.send(h.contiguous(), dst=self.p2p.global_ranks[placement[s + 1]],
                              group=self.pp_group, tag=self.p2p.tag(TensorKey(ACTIVATION, s, 0)))
        dist.all_reduce(main, group=self.pp_group)
        self.reshard(model)
        return main.item()


def _layer_order(name: str) -> tuple:
    """layers.<i>... in numeric order, then mtp.<k>..."""
    parts = name.split(".")
    return (parts[0] != "layers", int(parts[1]) if parts[1].isdigit() else 0, name)


class PipelineCheckpointLayout:
    """Checkpoint state of a rank's stages <-> the unsplit Transformer's checkpoint.

    Keys become the Transformer's names (``stage.canonical_name``) in the model state and the
    optimizer's per-parameter state and param groups, and expert weights with their Adam moments
    become global (E, ...) tensors (``ExpertCheckpointLayout``). A pipeline checkpoint is then the
    checkpoint one process or any (pp, dp, ep) layout writes: DCP keeps one copy of what several
    ranks hold (DualPipe's mirrored stages, 1F1B's embedding copy, edp replicas) and gives each
    rank the keys it asks for.
    """

    def __init__(self, stages: RankStages, mesh):
        self.local = {canonical_name(name): name for name in stages.state_dict()}  # params + buffers
        self.experts = ExpertCheckpointLayout(stages, mesh, rename=canonical_name)

    @staticmethod
    def _rename(model_state: dict, optim_state: dict, rename: Callable[[str], str]) -> None:
        for container in (model_state, optim_state.get("state", {})):
            for key in list(container):
                container[rename(key)] = container.pop(key)
        for group in optim_state.get("param_groups", []):
            group["params"] = [rename(name) for name in group["params"]]

    def to_global(self, model_state: dict, optim_state: dict, gather: bool = True) -> None:
        self._rename(model_state, optim_state, canonical_name)
        self.experts.to_global(model_state, optim_state, gather)

    def to_local(self, model_state: dict, optim_state: dict) -> None:
        self.experts.to_local(model_state, optim_state)
        self._rename(model_state, optim_state, lambda name: self.local.get(name, name))


def build_pipeline(model: nn.Module, mesh, schedule_name: str, microbatches: int, *,
                   zero_stage: Optional[int] = 1, overlap: bool = True,
                   autocast: Callable = contextlib.nullcontext) -> tuple[RankStages, PipelineRuntime]:
    """Split ``model`` for this rank of ``mesh``, shard experts over ep and ZeRO over dp, and
    return the stages (the trainer's model) with their runtime (the trainer's runtime)."""
    dims = mesh.dims
    pp_rank = dims.rank_coordinates(dist.get_rank())["pp"]
    schedule = build(schedule_name, dims.pp, microbatches, n_layers=model.cfg.n_layers)
    stages = split_model(model, schedule_name, dims.pp, pp_rank)
    if dims.ep > 1:
        apply_expert_parallel(stages, mesh.group("ep"), mesh.group("ep_counts"))
    if zero_stage is not None:
        for root in stages.zero_roots():
            zero.apply_zero(root, mesh, stage=zero_stage)
    runtime = PipelineRuntime(stages, schedule, mesh.group("pp"), dp_group=mesh.group("dp"),
                              overlap=overlap, autocast=autocast, mesh=mesh)
    return stages, runtime
