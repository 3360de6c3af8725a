"""Derive each rank's sends and receives from its compute actions.

A forward on stage s of micro-batch m consumes the activation of stage s-1, a backward the input
gradient of stage s+1 (``ir.consumed``); when the two stages sit on different ranks the producer
sends and the consumer receives. Where the pair goes in each program:

1. Replay the compute-only schedule with a reference cost model (``simulator``), giving every
   compute a start and an end time in one valid execution.
2. A ``Send`` is posted when its producer ends; the matching ``Recv`` is posted at that same
   moment on the consumer, so it always comes before the compute that uses it.
3. Each rank's program is its actions sorted by (time, communication before compute, sender,
   send number). Both ends of a link therefore list the link's messages in the same order: the
   k-th send from a to b is the k-th receive on b from a, which tag-less transports (NCCL)
   rely on, and a runtime that serialises each link's operations cannot deadlock, because the
   reference execution is a run of it.
"""
from __future__ import annotations

from .ir import Recv, Schedule, Send, computes, consumer_stage, produced
from .simulator import CostModel, simulate

REFERENCE_COST = CostModel(forward=1.0, backward=2.0, weight=1.0)
"""Positive costs for every kind, so a send always sorts after the compute that produced it."""


def place_communication(schedule: Schedule, cost: CostModel = REFERENCE_COST) -> Schedule:
    """Return ``schedule`` (compute actions only) with its sends and receives inserted."""
    timed = simulate(schedule, cost)
    programs: list[list[tuple[tuple, object]]] = [[] for _ in range(schedule.pp)]
    for rank, line in enumerate(timed.timeline):
        sent = 0
        for index, slot in enumerate(line):
            programs[rank].append(((slot.start, 1, rank, index), slot.action))
            for chunk in computes(slot.action):
                key = produced(chunk, schedule.n_stages)
                if key is None:
                    continue
                consumer = schedule.rank_of(consumer_stage(key), key.direction)
                if consumer == rank:
                    continue
                order = (slot.end, 0, rank, sent)
                sent += 1
                fields = (key.tensor, key.stage, key.mb, key.direction)
                programs[rank].append((order, Send(consumer, *fields)))
                programs[consumer].append((order, Recv(rank, *fields)))
    return schedule.with_ranks([[action for _, action in sorted(p, key=lambda e: e[0])]
                                for p in programs])
