"""The pipeline schedule IR: for each rank, the ordered list of actions it runs.

One IR, many readers (DESIGN.md principle 3): generators in ``schedules.py`` write it, the
checker proves its invariants, the simulator replays it with a cost model, the printer draws it,
and the runtime executes it. A runtime walks ``schedule.ranks[rank]`` in order:

1. ``Recv``: post a non-blocking receive into the buffer named by ``action.key``;
2. ``Send``: post a non-blocking send of the tensor named by ``action.key`` (it was produced by
   an earlier compute action on this rank); wait for it late, at the latest at the end of the step;
3. ``Compute`` / ``Overlapped``: first wait for the receives of the tensors it consumes
   (``consumed``), then run it.

Stages are global indices in forward order (``0 .. n_stages - 1``). Micro-batches are numbered
``0 .. microbatches - 1`` over the whole step; under DualPipe the first half enters from rank 0
(direction 0) and the second half from the last rank (direction 1), and the two directions hold
separate copies of each stage, so a compute is named by (kind, stage, mb, direction).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Optional, Union

from dsv3_train.config import ConfigError

FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD = "F", "B", "I", "W"
COMPUTE_KINDS = (FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD)
OVERLAPPED = "F&B"
SEND, RECV = "send", "recv"
ACTIVATION, GRADIENT = "activation", "gradient"


class ScheduleError(ConfigError):
    """A schedule request or a schedule is invalid; the message names the value and the fix."""


@dataclass(frozen=True)
class TensorKey:
    """Names one tensor that crosses ranks: what it is, which stage's compute made it, for which mb."""

    tensor: str
    """``activation`` (a forward's output, consumed by stage + 1) or ``gradient`` (a backward's
    input gradient, consumed by stage - 1)."""
    stage: int
    """The stage whose compute produced the tensor."""
    mb: int
    """Micro-batch."""
    direction: int = 0
    """DualPipe direction of the micro-batch (0 elsewhere)."""

    def __str__(self) -> str:
        return f"{self.tensor}[{_where(self.stage, self.mb, self.direction)}]"


def _where(stage: int, mb: int, direction: int) -> str:
    return f"s={stage},mb={mb}" + (f",d={direction}" if direction else "")


@dataclass(frozen=True)
class Compute:
    """One chunk of compute: a stage's forward or backward for one micro-batch."""

    kind: str
    """``F`` forward; ``B`` full backward; ``I`` input-gradient backward with the weight gradient
    deferred to a later ``W`` (zero-bubble split); ``W`` that deferred weight-gradient backward."""
    stage: int
    """Global stage index in forward order."""
    mb: int
    """Micro-batch."""
    direction: int = 0
    """DualPipe direction: 0 enters at rank 0, 1 at the last rank (0 for other schedules)."""

    def __post_init__(self) -> None:
        if self.kind not in COMPUTE_KINDS:
            raise ValueError(f"compute kind ({self.kind!r}) must be one of {COMPUTE_KINDS}")

    def __str__(self) -> str:
        return f"{self.kind}[{_where(self.stage, self.mb, self.direction)}]"

    @property
    def is_backward(self) -> bool:
        """True for the input-gradient-producing backward (``B`` or ``I``)."""
        return self.kind in (BACKWARD, INPUT_GRAD)


@dataclass(frozen=True)
class Overlapped:
    """An overlapped pair ``F&B``: one micro-batch's forward interleaved with another's backward."""

    forward: Compute
    """The forward half (kind ``F``)."""
    backward: Compute
    """The backward half (kind ``B`` or ``I``)."""
    kind: str = field(default=OVERLAPPED, init=False)

    def __post_init__(self) -> None:
        if self.forward.kind != FORWARD or not self.backward.is_backward:
            raise ValueError(f"an F&B pair holds a forward and a backward, got "
                             f"{self.forward.kind} and {self.backward.kind}")

    def __str__(self) -> str:
        return f"{self.forward}&{self.backward}"


@dataclass(frozen=True)
class _Transfer:
    peer: int
    """The other rank."""
    tensor: str
    """``activation`` or ``gradient`` (see ``TensorKey``)."""
    stage: int
    """The stage whose compute produced the tensor."""
    mb: int
    direction: int = 0

    @property
    def key(self) -> TensorKey:
        return TensorKey(self.tensor, self.stage, self.mb, self.direction)


@dataclass(frozen=True)
class Send(_Transfer):
    """Post a non-blocking send of ``key`` to rank ``peer``; wait for it late."""

    kind: str = field(default=SEND, init=False)

    def __str__(self) -> str:
        return f"send {self.key} to rank {self.peer}"


@dataclass(frozen=True)
class Recv(_Transfer):
    """Post a non-blocking receive of ``key`` from rank ``peer``; the consumer waits on it."""

    kind: str = field(default=RECV, init=False)

    def __str__(self) -> str:
        return f"recv {self.key} from rank {self.peer}"


Action = Union[Compute, Overlapped, Send, Recv]


def computes(action: Action) -> tuple[Compute, ...]:
    """The compute chunks inside an action: one, two for ``F&B``, none for communication."""
    if isinstance(action, Compute):
        return (action,)
    if isinstance(action, Overlapped):
        return (action.forward, action.backward)
    return ()


def consumed(compute: Compute, n_stages: int) -> Optional[TensorKey]:
    """The tensor a compute needs from a neighbouring stage, or None.

    A forward on stage s needs stage s-1's activation; a backward on stage s needs stage s+1's
    input gradient (the last stage starts from its own loss). ``W`` needs nothing from outside.
    """
    if compute.kind == FORWARD and compute.stage > 0:
        return TensorKey(ACTIVATION, compute.stage - 1, compute.mb, compute.direction)
    if compute.is_backward and compute.stage < n_stages - 1:
        return TensorKey(GRADIENT, compute.stage + 1, compute.mb, compute.direction)
    return None


def produced(compute: Compute, n_stages: int) -> Optional[TensorKey]:
    """The tensor a compute hands to a neighbouring stage, or None (mirror of ``consumed``)."""
    if compute.kind == FORWARD and compute.stage < n_stages - 1:
        return TensorKey(ACTIVATION, compute.stage, compute.mb, compute.direction)
    if compute.is_backward and compute.stage > 0:
        return TensorKey(GRADIENT, compute.stage, compute.mb, compute.direction)
    return None


def consumer_stage(key: TensorKey) -> int:
    """The stage that consumes a tensor: the next stage for activations, the previous for gradients."""
    return key.stage + 1 if key.tensor == ACTIVATION else key.stage - 1


@dataclass(frozen=True)
class Schedule:
    """A whole pipeline step: the stage placement and, per rank, the ordered actions."""

    name: str
    """Generator name: ``1f1b``, ``zb1p``, ``dualpipe`` or ``dualpipev``."""
    pp: int
    """Pipeline ranks (devices)."""
    microbatches: int
    """Micro-batches in the step (both directions together under DualPipe)."""
    n_stages: int
    """Model stages in forward order: pp, or 2 * pp for DualPipeV."""
    placement: tuple[tuple[int, ...], ...]
    """``placement[direction][stage]`` is the rank holding that stage (one row per direction)."""
    ranks: tuple[tuple[Action, ...], ...]
    """``ranks[r]`` is rank r's program, in execution order."""

    @property
    def directions(self) -> int:
        return len(self.placement)

    def rank_of(self, stage: int, direction: int = 0) -> int:
        return self.placement[direction][stage]

    def direction_of(self, mb: int) -> int:
        """DualPipe: the first half of the micro-batches is direction 0, the second direction 1."""
        return mb * self.directions // self.microbatches

    def chunks_of(self, rank: int) -> list[tuple[int, int]]:
        """The (direction, stage) chunks a rank holds."""
        return [(d, s) for d, row in enumerate(self.placement) for s, r in enumerate(row) if r == rank]

    @property
    def has_communication(self) -> bool:
        """False for a compute-only schedule (before ``comm.place_communication``)."""
        return any(isinstance(a, (Send, Recv)) for program in self.ranks for a in program)

    def compute_actions(self, rank: int) -> Iterator[Compute]:
        """A rank's compute chunks in program order, pairs flattened (forward before backward)."""
        for action in self.ranks[rank]:
            yield from computes(action)

    def with_ranks(self, ranks) -> "Schedule":
        """The same schedule with other per-rank programs (used to hand-break schedules in tests)."""
        return replace(self, ranks=tuple(tuple(r) for r in ranks))

    def to_json(self, communication: bool = True) -> dict:
        """``{"schedule", "pp", "microbatches", "ranks": [[action, ...], ...]}`` (the printer's JSON)."""
        bidirectional = self.directions > 1
        return {"schedule": self.name, "pp": self.pp, "microbatches": self.microbatches,
                "ranks": [[action_to_json(a, bidirectional) for a in program
                           if communication or computes(a)] for program in self.ranks]}


def action_to_json(action: Action, with_direction: bool) -> dict:
    """One action as JSON; ``direction`` only for bidirectional (DualPipe) schedules."""
    if isinstance(action, Overlapped):
        return {"kind": OVERLAPPED, "forward": action_to_json(action.forward, with_direction),
                "backward": action_to_json(action.backward, with_direction)}
    out = {"kind": action.kind}
    if isinstance(action, (Send, Recv)):
        out.update(peer=action.peer, tensor=action.tensor)
    out.update(stage=action.stage, mb=action.mb)
    if with_direction:
        out["direction"] = action.direction
    return out


def action_from_json(obj: dict) -> Action:
    """Inverse of ``action_to_json``."""
    kind = obj["kind"]
    if kind == OVERLAPPED:
        return Overlapped(action_from_json(obj["forward"]), action_from_json(obj["backward"]))
    direction = obj.get("direction", 0)
    if kind in (SEND, RECV):
        cls = Send if kind == SEND else Recv
        return cls(obj["peer"], obj["tensor"], obj["stage"], obj["mb"], direction)
    return Compute(kind, obj["stage"], obj["mb"], direction)
