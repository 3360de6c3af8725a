"""Schedule generators: 1F1B, ZB1P, DualPipe and DualPipeV, each writing the IR of ``ir.py``.

Each generator decides only the per-rank order of compute actions; ``comm.place_communication``
then derives the sends and receives. ``build`` validates a request and runs the generator.

DualPipe and DualPipeV follow the eight phases of DeepSeek's ``DualPipe.step`` and
``DualPipeV.step`` (deepseek-ai/DualPipe), written again here as ``_eight_phases``. On a rank,
chunk 0 is the chunk its micro-batches reach first and chunk 1 the other; h is the rank's
distance from the nearer end (DualPipe) or its rank (DualPipeV), P the number of rank pairs
(pp / 2) or of ranks (DualPipeV), n the micro-batches per chunk.
"""
from __future__ import annotations

from collections import deque

from .comm import place_communication
from .ir import (BACKWARD, FORWARD, INPUT_GRAD, WEIGHT_GRAD, Compute, Overlapped, Schedule,
                 ScheduleError, action_from_json)

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def layout(name: str, pp: int) -> tuple[int, tuple[tuple[int, ...], ...]]:
    """(n_stages, placement[direction][stage] -> rank) of a schedule on ``pp`` ranks."""
    if name in ("1f1b", "zb1p"):
        return pp, (tuple(range(pp)),)
    if name == "dualpipe":
        # rank r holds stage r of direction 0 and stage pp-1-r of direction 1
        return pp, (tuple(range(pp)), tuple(reversed(range(pp))))
    if name == "dualpipev":
        # V shape: stages 0..pp-1 go down the ranks, stages pp..2pp-1 come back up
        return 2 * pp, (tuple(range(pp)) + tuple(reversed(range(pp))),)
    _require_known(name)


def _require_known(name: str) -> None:
    if name not in SCHEDULES:
        raise ScheduleError(f"schedule ({name!r}) is unknown: choose one of {SCHEDULES}")


def validate(name: str, pp: int, microbatches: int, n_layers: int | None = None) -> None:
    """Refuse requests a generator cannot honour, naming the value and the fix."""
    _require_known(name)
    if not isinstance(pp, int) or pp < 1:
        raise ScheduleError(f"pp ({pp!r}) must be an integer >= 1")
    if not isinstance(microbatches, int):
        raise ScheduleError(f"microbatches ({microbatches!r}) must be an integer")
    n_stages, _ = layout(name, pp)
    if name == "dualpipe" and pp % 2:
        choices = " or ".join(f"pp={p}" for p in sorted({max(2, pp - 1), pp + 1}))
        raise ScheduleError(f"dualpipe needs an even pp (pairs of ranks r, pp-1-r), got pp={pp}: "
                            f"choose {choices}, or use dualpipev")
    least = 2 * pp if name.startswith("dualpipe") else pp
    if microbatches < least:
        raise ScheduleError(f"{name} on pp={pp} needs microbatches >= {least}, got {microbatches}: "
                            f"set microbatches={least}")
    if name == "dualpipe" and microbatches % 2:
        raise ScheduleError(f"dualpipe splits the micro-batches evenly between its two directions, "
                            f"got microbatches={microbatches}: set microbatches={microbatches + 1}")
    if n_layers is not None and (n_layers < n_stages or n_layers % n_stages):
        fits = [p for p in range(1, n_layers + 1) if n_layers % layout(name, p)[0] == 0
                and (name != "dualpipe" or p % 2 == 0)]
        lower, upper = n_layers // n_stages * n_stages, (n_layers // n_stages + 1) * n_stages
        layers = [n for n in (lower, upper) if n > 0]
        other_pp = f" or pp in {fits}" if fits else ""
        raise ScheduleError(f"n_layers ({n_layers}) does not split into the {n_stages} equal stages of "
                            f"{name} on pp={pp}: choose n_layers in {layers}{other_pp}")


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """The blocks each stage holds, in forward order (equal, contiguous)."""
    per = n_layers // n_stages
    return [range(s * per, (s + 1) * per) for s in range(n_stages)]


def build(name: str, pp: int, microbatches: int, n_layers: int | None = None,
          communication: bool = True) -> Schedule:
    """Validate, generate the compute order, and (by default) derive the communication."""
    validate(name, pp, microbatches, n_layers)
    n_stages, placement = layout(name, pp)
    generate = {"1f1b": _one_f_one_b, "zb1p": _zb1p, "dualpipe": _dualpipe, "dualpipev": _dualpipev}
    ranks = generate[name](pp, microbatches)
    schedule = Schedule(name, pp, microbatches, n_stages, placement, tuple(map(tuple, ranks)))
    return place_communication(schedule) if communication else schedule


def from_json(obj: dict) -> Schedule:
    """A schedule from the printer's JSON (placement comes from the schedule's name)."""
    n_stages, placement = layout(obj["schedule"], obj["pp"])
    ranks = tuple(tuple(action_from_json(a) for a in program) for program in obj["ranks"])
    return Schedule(obj["schedule"], obj["pp"], obj["microbatches"], n_stages, placement, ranks)


def _one_f_one_b(pp: int, n: int) -> list[list[Compute]]:
    """PipeDream-flush 1F1B: pp-1-r warm-up forwards, then one forward one backward, then drain."""
    ranks = []
    for r in range(pp):
        warmup = min(pp - 1 - r, n)
        program = [Compute(FORWARD, r, mb) for mb in range(warmup)]
        for i in range(n - warmup):
            program += [Compute(FORWARD, r, warmup + i), Compute(BACKWARD, r, i)]
        program += [Compute(BACKWARD, r, mb) for mb in range(n - warmup, n)]
        ranks.append(program)
    return ranks


def _zb1p(pp: int, n: int) -> list[list[Compute]]:
    """ZB-H1 (zero bubble, 1F1B memory): 1F1B with B split into I and W, rank r keeping up to
    r weight gradients deferred so that every rank has pp micro-batches in flight; the deferred
    W's fill the drain's waits."""
    ranks = []
    for r in range(pp):
        warmup = min(pp - 1 - r, n)
        deferred: deque[Compute] = deque()
        program = [Compute(FORWARD, r, mb) for mb in range(warmup)]

        def input_grad(mb: int) -> None:
            program.append(Compute(INPUT_GRAD, r, mb))
            deferred.append(Compute(WEIGHT_GRAD, r, mb))

        for i in range(n - warmup):                 # steady state: F, I, and W once r are held
            program.append(Compute(FORWARD, r, warmup + i))
            input_grad(i)
            if len(deferred) > r:
                program.append(deferred.popleft())
        for mb in range(n - warmup, n):             # drain: each wait for a gradient gets a W
            input_grad(mb)
            program.append(deferred.popleft())
        program += deferred
        ranks.append(program)
    return ranks


class _RankScript:
    """One rank's compute list, written phase by phase as in DualPipe's step().

    ``chunks[c]`` is (direction, stage, micro-batches in order) of chunk c. Forwards and
    backwards of a chunk go first-in first-out; so do deferred weight gradients.
    """

    def __init__(self, chunks: list[tuple[int, int, list[int]]]):
        self.chunks = chunks
        self.actions: list = []
        self._next_forward = [0, 0]
        self._next_backward = [0, 0]
        self._deferred: deque[Compute] = deque()

    def _take(self, counters: list[int], chunk: int, kind: str) -> Compute:
        direction, stage, mbs = self.chunks[chunk]
        mb = mbs[counters[chunk]]
        counters[chunk] += 1
        return Compute(kind, stage, mb, direction)

    def _backward_chunk(self, chunk: int, defer_weight: bool) -> Compute:
        compute = self._take(self._next_backward, chunk, INPUT_GRAD if defer_weight else BACKWARD)
        if defer_weight:
            self._deferred.append(Compute(WEIGHT_GRAD, compute.stage, compute.mb, compute.direction))
        return compute

    def forward(self, chunk: int) -> None:
        self.actions.append(self._take(self._next_forward, chunk, FORWARD))

    def backward(self, chunk: int, defer_weight: bool = False) -> None:
        self.actions.append(self._backward_chunk(chunk, defer_weight))

    def weight(self) -> None:
        self.actions.append(self._deferred.popleft())

    def forward_backward(self, forward_chunk: int, backward_chunk: int) -> None:
        forward = self._take(self._next_forward, forward_chunk, FORWARD)
        self.actions.append(Overlapped(forward, self._backward_chunk(backward_chunk, False)))

    def finish(self) -> list:
        assert not self._deferred, "every deferred weight gradient has its W"
        return self.actions


def _eight_phases(script: _RankScript, h: int, pairs: int, n: int) -> list:
    """DeepSeek's eight DualPipe phases for one rank (h, P = pairs, n per chunk; see module doc)."""
    s, outer = script, pairs - h - 1
    for _ in range(2 * outer):                    # Step 1: nF0
        s.forward(0)
    for _ in range(h + 1):                        # Step 2: nF0F1
        s.forward(0)
        s.forward(1)
    for _ in range(outer):                        # Step 3: nB1W1F1, zero bubble
        s.backward(1, defer_weight=True)
        s.weight()
        s.forward(1)
    for i in range(n - 2 * pairs + h + 1):        # Step 4: nF0B1F1B0, the main phase
        if i == 0 and h == pairs - 1:
            s.forward(0)                          # middle ranks: the first pair is not overlapped,
            s.backward(1)                         # which shortens the bubble (DeepSeek's note)
        else:
            s.forward_backward(0, 1)
        s.forward_backward(1, 0)
    for _ in range(outer):                        # Step 5: nB1F1B0
        s.backward(1)
        s.forward_backward(1, 0)
    half = (h + 1) // 2                           # Step 6: nB1B0, W deferred from half way
    for i in range(h + 1):
        s.backward(1, defer_weight=i > half or (i == half and h % 2 == 1))
        s.backward(0, defer_weight=i >= half)
    for _ in range(outer):                        # Step 7: nWB0, zero bubble
        s.weight()
        s.backward(0, defer_weight=True)
    for _ in range(h + 1):                        # Step 8: nW
        s.weight()
    return s.finish()


def _dualpipe(pp: int, n: int) -> list[list]:
    """Bidirectional: micro-batches 0..n/2-1 enter at rank 0 (direction 0), the rest at rank pp-1."""
    half = n // 2
    directions = [(0, list(range(half))), (1, list(range(half, n)))]
    ranks = []
    for r in range(pp):
        stage = {0: r, 1: pp - 1 - r}
        first = 0 if r < pp // 2 else 1            # the direction that reaches this rank first
        chunks = [(d, stage[d], mbs) for d, mbs in (directions[first], directions[1 - first])]
        ranks.append(_eight_phases(_RankScript(chunks), min(r, pp - 1 - r), pp // 2, half))
    return ranks


def _dualpipev(pp: int, n: int) -> list[list]:
    """V shape on pp ranks: rank r holds stages r and 2pp-1-r; all micro-batches enter at rank 0."""
    mbs = list(range(n))
    return [_eight_phases(_RankScript([(0, r, mbs), (0, 2 * pp - 1 - r, mbs)]), r, pp, n)
            for r in range(pp)]
