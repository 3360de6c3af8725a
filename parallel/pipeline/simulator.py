"""Replay a schedule IR with a cost model: step time, bubble, exposed communication, memory.

The replay is exact for the model it states: every rank runs its program in order; a compute
starts when the rank is free and every tensor it consumes has arrived (``p2p`` after the later
of the matching ``Send`` and ``Recv`` being posted; a schedule without communication actions
uses the producer's end time instead); posting a send or a receive takes ``post`` rank time
(default none), counted as idle like any time outside compute. Costs are per chunk
(one stage, one micro-batch), the same on every stage unless ``CostModel.per_stage`` gives some
stages their own (e.g. the last stage, which also runs the head, the MTP block and the loss).

Reported per rank:

* bubble: step time minus the rank's busy time (its compute chunks' costs);
* exposed communication: time spent waiting for a tensor already produced but still in flight
  (``p2p``), plus the expert all-to-all time a chunk does not hide (all of it for a lone chunk;
  for an ``F&B`` pair, whatever of the pair's time is not covered by the two chunks' compute);
* peak activations, in chunk units (one stage's activations for one micro-batch): a forward
  holds them from its start until the end of that chunk's ``B`` or ``I`` (what ``W`` keeps,
  the inputs of the linears, is not counted, as in the DualPipe table).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping, Optional, Union

from .ir import (BACKWARD, FORWARD, INPUT_GRAD, WEIGHT_GRAD, Action, Compute, Overlapped, Recv,
                 Schedule, ScheduleError, Send, TensorKey, computes, consumed, produced)


@dataclass(frozen=True)
class CostModel:
    """Per-chunk phase costs (any time unit). Load measured ones with ``CostModel.load``."""

    forward: float = 1.0
    """F: a stage's forward for one micro-batch."""
    backward: float = 2.0
    """B: a stage's full backward (input and weight gradients)."""
    weight: float = 1.0
    """W: the weight-gradient part of B, when deferred."""
    input_grad: Optional[float] = None
    """I: the input-gradient part of B when W is deferred; default B - W."""
    forward_backward: Optional[float] = None
    """F&B: an overlapped forward and full backward of two micro-batches; default F + B
    (no overlap benefit). A pair whose backward is an ``I`` costs F&B - W."""
    p2p: float = 0.0
    """Point-to-point transfer time of one activation or gradient between neighbouring ranks."""
    post: float = 0.0
    """Rank time to post one ``Send`` or ``Recv`` (a runtime's isend / irecv call): idle, not busy,
    and only in schedules with communication actions."""
    a2a_forward: float = 0.0
    """The part of F spent in expert all-to-all (dispatch + combine); exposed unless overlapped."""
    a2a_backward: float = 0.0
    """The part of B (and of I) spent in expert all-to-all; W has none."""
    per_stage: Optional[Mapping[int, Mapping[str, float]]] = field(default=None, hash=False)
    """Costs of particular stages, ``{stage: {"F": .., "B": .., "W": .., "I": ..}}`` (global stage
    index in forward order, both directions); a key a stage leaves out takes the uniform value,
    except I, which defaults to that stage's B - W unless ``input_grad`` is given."""
    pair_overlap: Optional[float] = None
    """With ``per_stage``: an F&B pair touching a listed stage costs pair_overlap x (its forward's F
    + its backward's B), minus the backward stage's W when the backward is an I (the uniform
    rule F&B - W, per pair). Default forward_backward / (forward + backward): the uniform
    F&B's overlap gain, 1 when F&B is not given."""

    _ALIASES = {"F": "forward", "B": "backward", "W": "weight", "I": "input_grad",
                "F&B": "forward_backward"}
    _STAGE_KEYS = ("F", "B", "W", "I")

    def __post_init__(self):
        for stage, costs in (self.per_stage or {}).items():
            unknown = sorted(set(costs) - set(self._STAGE_KEYS))
            if not isinstance(stage, int) or stage < 0 or unknown:
                raise ValueError(f"per_stage entry {stage!r}: {dict(costs)} must map a stage index >= 0 "
                                 f"to costs keyed by {list(self._STAGE_KEYS)} (unknown: {unknown}; "
                                 f"give an F&B pair's overlap as pair_overlap)")

    @classmethod
    def load(cls, source: Union[str, Path, dict]) -> "CostModel":
        """From a dict or a JSON file of measured phase costs; keys are field names or F, B, W, I, F&B.

        ``per_stage`` is ``{"<stage>": {"F": .., ...}}`` (JSON keys are strings)."""
        data = source if isinstance(source, dict) else json.loads(Path(source).read_text())
        names = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in data.items():
            name = cls._ALIASES.get(key, key)
            if name not in names:
                known = sorted(names | set(cls._ALIASES))
                raise ValueError(f"cost key ({key!r}) is unknown: use one of {known}")
            if name == "per_stage":
                kwargs[name] = {int(stage): {k: float(v) for k, v in costs.items()}
                                for stage, costs in value.items()}
            else:
                kwargs[name] = float(value)
        return cls(**kwargs)

    @property
    def I(self) -> float:  # noqa: E743 - the paper's name
        return self.backward - self.weight if self.input_grad is None else self.input_grad

    @property
    def FB(self) -> float:
        return self.forward + self.backward if self.forward_backward is None else self.forward_backward

    def phase(self, kind: str, stage: int) -> float:
        """The cost of one chunk of ``kind`` (F, B, I or W) on ``stage``."""
        given = (self.per_stage or {}).get(stage, {})
        if kind in given:
            return given[kind]
        if kind == INPUT_GRAD and self.input_grad is None:
            return self.phase(BACKWARD, stage) - self.phase(WEIGHT_GRAD, stage)
        return {FORWARD: self.forward, BACKWARD: self.backward, INPUT_GRAD: self.I,
                WEIGHT_GRAD: self.weight}[kind]

    def _pair(self, pair: Overlapped) -> float:
        f, b = pair.forward.stage, pair.backward.stage
        minus_w = self.phase(WEIGHT_GRAD, b) if pair.backward.kind == INPUT_GRAD else 0.0
        listed = self.per_stage or {}
        if f not in listed and b not in listed:
            return self.FB - minus_w
        overlap = self.FB / (self.forward + self.backward) if self.pair_overlap is None else self.pair_overlap
        return overlap * (self.phase(FORWARD, f) + self.phase(BACKWARD, b)) - minus_w

    def of(self, action: Action) -> float:
        """The busy rank time an action takes (none for communication: posting is ``post``, idle)."""
        if isinstance(action, Overlapped):
            return self._pair(action)
        if isinstance(action, Compute):
            return self.phase(action.kind, action.stage)
        return 0.0

    def exposed_all_to_all(self, action: Action) -> float:
        """All-to-all time of an action that no compute hides."""
        if isinstance(action, Overlapped):
            busy = (self.of(action.forward) - self.a2a_forward + self.of(action.backward)
                    - self.a2a_backward)
            return max(0.0, self.of(action) - busy)
        if isinstance(action, Compute):
            return {FORWARD: self.a2a_forward, BACKWARD: self.a2a_backward,
                    INPUT_GRAD: self.a2a_backward, WEIGHT_GRAD: 0.0}[action.kind]
        return 0.0


@dataclass(frozen=True)
class Slot:
    """One compute action placed in time on its rank."""

    action: Action
    start: float
    end: float


@dataclass
class SimulationResult:
    """What a replay measured; per-rank lists are indexed by rank."""

    schedule: Schedule
    cost: CostModel
    timeline: list[list[Slot]]
    """Per rank, its compute actions with start and end times."""
    step_time: float
    """When the last rank finishes (all start at 0)."""
    busy: list[float]
    """Per rank, the sum of its compute costs."""
    exposed_comm: list[float]
    """Per rank, p2p waiting plus all-to-all time not hidden (see the module docstring)."""
    peak_activations: list[int]
    """Per rank, the most chunks whose activations are held at once."""

    @property
    def bubble(self) -> list[float]:
        """Per rank, step time minus busy time."""
        return [self.step_time - b for b in self.busy]

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks' time over the step."""
        return sum(self.bubble) / (self.schedule.pp * self.step_time)

    @property
    def stages_per_rank(self) -> list[int]:
        """Stage-sized parameter blocks each rank holds (2 under DualPipe and DualPipeV)."""
        return [len(self.schedule.chunks_of(r)) for r in range(self.schedule.pp)]

    @property
    def param_copies(self) -> int:
        """How many ranks hold each stage's parameters: 2 under DualPipe (one per direction)."""
        return self.schedule.directions


class _Replay:
    """Walks every rank's program, advancing whichever rank can run its next action."""

    def __init__(self, schedule: Schedule, cost: CostModel):
        self.s, self.cost = schedule, cost
        self.has_comm = schedule.has_communication
        self.pc = [0] * schedule.pp
        self.clock = [0.0] * schedule.pp
        self.produced_at: dict[TensorKey, float] = {}
        self.sent_at: dict[TensorKey, float] = {}
        self.posted_at: dict[tuple[int, TensorKey], float] = {}
        self.timeline: list[list[Slot]] = [[] for _ in range(schedule.pp)]
        self.exposed = [0.0] * schedule.pp

    def _arrival(self, rank: int, key: TensorKey) -> Optional[tuple[float, float]]:
        """(time the data left, time it is usable on ``rank``) or None if not yet known."""
        producer = self.s.rank_of(key.stage, key.direction)
        if producer == rank:
            t = self.produced_at.get(key)
            return None if t is None else (t, t)
        if not self.has_comm:
            t = self.produced_at.get(key)
            return None if t is None else (t, t + self.cost.p2p)
        if key not in self.sent_at or (rank, key) not in self.posted_at:
            return None
        left = max(self.sent_at[key], self.posted_at[(rank, key)])
        return left, left + self.cost.p2p

    def _run_compute(self, rank: int, action: Action) -> bool:
        chunks = computes(action)
        arrivals = []
        for c in chunks:
            key = consumed(c, self.s.n_stages)
            if key is not None:
                got = self._arrival(rank, key)
                if got is None:
                    return False
                arrivals.append(got)
        free = self.clock[rank]
        start = max([free] + [usable for _, usable in arrivals])
        ready_if_instant = max([free] + [left for left, _ in arrivals])
        end = start + self.cost.of(action)
        self.exposed[rank] += start - ready_if_instant + self.cost.exposed_all_to_all(action)
        self.timeline[rank].append(Slot(action, start, end))
        self.clock[rank] = end
        for c in chunks:
            key = produced(c, self.s.n_stages)
            if key is not None:
                self.produced_at[key] = end
                if not self.has_comm:
                    self.sent_at[key] = end
        return True

    def _advance(self, rank: int) -> bool:
        program, moved = self.s.ranks[rank], False
        while self.pc[rank] < len(program):
            action = program[self.pc[rank]]
            if isinstance(action, (Send, Recv)):
                self.clock[rank] += self.cost.post
            if isinstance(action, Send):
                self.sent_at[action.key] = max(self.clock[rank], self.produced_at.get(action.key, 0.0))
            elif isinstance(action, Recv):
                self.posted_at[(rank, action.key)] = self.clock[rank]
            elif not self._run_compute(rank, action):
                return moved
            self.pc[rank] += 1
            moved = True
        return moved

    def run(self) -> SimulationResult:
        pending = set(range(self.s.pp))
        while pending:
            moved = [r for r in sorted(pending) if self._advance(r)]
            pending = {r for r in pending if self.pc[r] < len(self.s.ranks[r])}
            if pending and not moved:
                stuck = "; ".join(f"rank {r} at {self.s.ranks[r][self.pc[r]]}" for r in sorted(pending))
                raise ScheduleError(f"schedule {self.s.name} cannot run to the end: {stuck} "
                                    f"(parallel.pipeline.checker.check names the cycle)")
        busy = [sum(self.cost.of(slot.action) for slot in line) for line in self.timeline]
        return SimulationResult(self.s, self.cost, self.timeline, max(self.clock), busy,
                                self.exposed, [_peak_activations(line) for line in self.timeline])


def _peak_activations(line: list[Slot]) -> int:
    live = peak = 0
    for slot in line:
        chunks = computes(slot.action)
        live += sum(c.kind == FORWARD for c in chunks)
        peak = max(peak, live)
        live -= sum(c.is_backward for c in chunks)
    return peak


def simulate(schedule: Schedule, cost: Optional[CostModel] = None) -> SimulationResult:
    """Replay ``schedule`` under ``cost`` (default F=1, B=2, W=1, F&B=F+B, no communication cost)."""
    return _Replay(schedule, cost or CostModel()).run()


def paper_bubble(name: str, n_stages: int, cost: CostModel) -> float:
    """The DualPipe table's bubble for a schedule over ``n_stages`` stages (PP in the table)."""
    F, B, W, FB, PP = cost.forward, cost.backward, cost.weight, cost.FB, n_stages
    return {"1f1b": (PP - 1) * (F + B), "zb1p": (PP - 1) * (F + B - 2 * W),
            "dualpipe": (PP / 2 - 1) * (FB + B - 3 * W),
            "dualpipev": (PP / 2 - 1) * (FB + B - 3 * W)}[name]


def comparison(n_stages: int, microbatches: int, cost: Optional[CostModel] = None,
               names: tuple[str, ...] = ("1f1b", "zb1p", "dualpipe", "dualpipev")) -> list[dict]:
    """The DualPipe table, simulated: one row per schedule over the same ``n_stages`` stages.

    DualPipeV runs them on n_stages / 2 ranks. A schedule that needs more micro-batches than
    asked (DualPipe: >= 2 * pp) is run with its minimum, and the row says so.
    """
    from .schedules import build, validate
    cost = cost or CostModel()
    rows = []
    for name in names:
        pp = n_stages // 2 if name == "dualpipev" else n_stages
        n, note = microbatches, ""
        try:
            validate(name, pp, n)
        except ScheduleError as refusal:
            n = max(2 * pp, n + n % 2)
            note = f"{microbatches} refused ({refusal}); ran {n}"
        result = simulate(build(name, pp, n), cost)
        rows.append({"schedule": name, "devices": pp, "microbatches": n,
                     "step_time": result.step_time, "bubble": max(result.bubble),
                     "paper_bubble": paper_bubble(name, n_stages, cost),
                     "bubble_fraction": result.bubble_fraction,
                     "exposed_comm": max(result.exposed_comm),
                     "peak_activations": max(result.peak_activations),
                     "stages_per_device": max(result.stages_per_rank),
                     "param_copies": result.param_copies, "note": note})
    return rows
