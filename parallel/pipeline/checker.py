"""Prove a schedule's invariants, or say which ones fail and where.

``check(schedule)`` raises ``ScheduleError`` listing every violation; ``problems(schedule)``
returns them. The invariants:

1. placement: every compute runs on the rank that holds its (direction, stage) under the
   schedule's layout, on a valid micro-batch of the right direction;
2. completeness: each (micro-batch, stage) has exactly one ``F`` and exactly one backward,
   either one ``B`` or one ``I`` plus one ``W``;
3. order: per (micro-batch, stage), ``F`` comes before ``I``/``B``, which comes before ``W``;
4. communication: every tensor a compute takes from another rank has a ``Recv`` from that rank
   earlier in the program, one taken from the same rank has its producer earlier; every ``Send``
   follows the compute that produced it, goes to the consumer's rank, and is matched by exactly
   one ``Recv`` (and every ``Recv`` by one ``Send``);
5. execution: the programs run to the end under blocking semantics, so nothing waits in a
   cycle. Each link between two ranks is modelled as one FIFO of operations per side (as a
   tag-less transport such as NCCL on one stream per peer): the operations at the two heads
   complete together when one is the ``Send`` and the other the ``Recv`` of the same tensor; a
   compute blocks until the tensors it consumes have arrived. A schedule without any
   communication action (compute-only, before ``comm.place_communication``) is checked with
   tensors arriving as soon as they are produced.
"""
from __future__ import annotations

from collections import Counter, defaultdict, deque

from .ir import (BACKWARD, FORWARD, INPUT_GRAD, WEIGHT_GRAD, Recv, Schedule, ScheduleError, Send,
                 TensorKey, computes, consumed, consumer_stage, produced)
from .schedules import SCHEDULES, layout


def check(schedule: Schedule) -> None:
    """Raise ``ScheduleError`` naming every violated invariant; return None if all hold."""
    found = problems(schedule)
    if found:
        shown = "\n  ".join(found[:20]) + (f"\n  ... and {len(found) - 20} more" if len(found) > 20 else "")
        raise ScheduleError(f"schedule {schedule.name} (pp={schedule.pp}, microbatches="
                            f"{schedule.microbatches}) breaks {len(found)} invariant(s):\n  {shown}")


def problems(schedule: Schedule) -> list[str]:
    """Every violated invariant, as one message each."""
    found = _placement(schedule)
    found += _completeness(schedule)
    found += _order_and_communication(schedule)
    found += _execution(schedule)
    return found


def _placement(s: Schedule) -> list[str]:
    found = []
    if s.name in SCHEDULES and (s.n_stages, s.placement) != layout(s.name, s.pp):
        found.append(f"placement {s.placement} is not the {s.name} layout {layout(s.name, s.pp)[1]}")
    for rank in range(s.pp):
        for c in s.compute_actions(rank):
            if not (0 <= c.stage < s.n_stages and 0 <= c.mb < s.microbatches
                    and 0 <= c.direction < s.directions):
                found.append(f"rank {rank}: {c} is outside stages 0..{s.n_stages - 1}, micro-batches "
                             f"0..{s.microbatches - 1}, directions 0..{s.directions - 1}")
            elif s.direction_of(c.mb) != c.direction:
                found.append(f"rank {rank}: {c} has direction {c.direction}; mb {c.mb} enters in "
                             f"direction {s.direction_of(c.mb)}")
            elif s.rank_of(c.stage, c.direction) != rank:
                found.append(f"rank {rank}: {c} belongs on rank {s.rank_of(c.stage, c.direction)}")
    return found


def _completeness(s: Schedule) -> list[str]:
    kinds: dict[tuple, Counter] = defaultdict(Counter)
    for rank in range(s.pp):
        for c in s.compute_actions(rank):
            kinds[(c.stage, c.mb, c.direction)][c.kind] += 1
    found = []
    for mb in range(s.microbatches):
        direction = s.direction_of(mb)
        for stage in range(s.n_stages):
            seen = kinds.get((stage, mb, direction), Counter())
            split = seen[INPUT_GRAD] == 1 and seen[WEIGHT_GRAD] == 1 and seen[BACKWARD] == 0
            whole = seen[BACKWARD] == 1 and seen[INPUT_GRAD] == 0 and seen[WEIGHT_GRAD] == 0
            if seen[FORWARD] != 1 or not (split or whole):
                counts = ", ".join(f"{k}x{seen[k]}" for k in (FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD))
                found.append(f"stage {stage} mb {mb}: needs one F and one B (or one I and one W), "
                             f"has {counts}")
    return found


def _order_and_communication(s: Schedule) -> list[str]:
    found, with_comm = [], s.has_communication
    sends: Counter = Counter()
    recvs: Counter = Counter()
    for rank, program in enumerate(s.ranks):
        done: dict[tuple, int] = {}         # (kind, stage, mb, direction) -> position
        made: set[TensorKey] = set()
        posted: set[TensorKey] = set()
        for pos, action in enumerate(program):
            if isinstance(action, Send):
                sends[(rank, action.peer, action.key)] += 1
                want = s.rank_of(consumer_stage(action.key), action.direction) \
                    if 0 <= consumer_stage(action.key) < s.n_stages else None
                if action.key not in made:
                    found.append(f"rank {rank}: {action} comes before the compute that produces it")
                if action.peer != want:
                    found.append(f"rank {rank}: {action} goes to the wrong rank; its consumer is on {want}")
                continue
            if isinstance(action, Recv):
                recvs[(action.peer, rank, action.key)] += 1
                posted.add(action.key)
                continue
            for c in computes(action):
                found += _missing_predecessors(rank, c, done)
                key = consumed(c, s.n_stages)
                if key is not None:
                    local = s.rank_of(key.stage, key.direction) == rank
                    if local and key not in made:
                        found.append(f"rank {rank}: {c} runs before the local compute producing {key}")
                    if not local and key not in posted and with_comm:
                        found.append(f"rank {rank}: {c} has no earlier receive of {key}")
            for c in computes(action):
                done[(c.kind, c.stage, c.mb, c.direction)] = pos
                if produced(c, s.n_stages) is not None:
                    made.add(produced(c, s.n_stages))
    for (src, dst, key), count in (sends + recvs).items():
        if sends[(src, dst, key)] != 1 or recvs[(src, dst, key)] != 1:
            found.append(f"{key} from rank {src} to rank {dst}: {sends[(src, dst, key)]} send(s), "
                         f"{recvs[(src, dst, key)]} receive(s); each send needs exactly one receive")
    return found


def _missing_predecessors(rank: int, c, done: dict) -> list[str]:
    where = (c.stage, c.mb, c.direction)
    if c.kind in (BACKWARD, INPUT_GRAD) and (FORWARD, *where) not in done:
        return [f"rank {rank}: {c} runs before its F"]
    if c.kind == WEIGHT_GRAD and (INPUT_GRAD, *where) not in done:
        return [f"rank {rank}: {c} runs before its I"]
    return []


def _execution(s: Schedule) -> list[str]:
    """Run every program with blocking receives and FIFO links; report a deadlock if one occurs."""
    pc, with_comm = [0] * s.pp, s.has_communication
    have: list[set[TensorKey]] = [set() for _ in range(s.pp)]
    links: dict[tuple[int, int], deque] = defaultdict(deque)   # (rank, peer) -> rank's posted ops

    def waits_for(rank: int) -> list[TensorKey]:
        """The tensors the rank's next compute still waits for (empty if it can run)."""
        return [k for c in computes(s.ranks[rank][pc[rank]])
                if (k := consumed(c, s.n_stages)) is not None and k not in have[rank]]

    progress = True
    while progress:
        progress = False
        for rank, program in enumerate(s.ranks):
            while pc[rank] < len(program):
                action = program[pc[rank]]
                if isinstance(action, (Send, Recv)):
                    links[(rank, action.peer)].append(action)
                elif waits_for(rank):
                    break
                else:
                    for c in computes(action):
                        if (key := produced(c, s.n_stages)) is not None:
                            # compute-only schedules: the tensor is there once produced
                            to = rank if with_comm else s.rank_of(consumer_stage(key), key.direction)
                            have[to].add(key)
                pc[rank] += 1
                progress = True
        for a, b in sorted(pair for pair in links if pair[0] < pair[1]):
            matched, mismatch = _match_link(links[(a, b)], links[(b, a)], have, a, b)
            if mismatch:
                return [mismatch]
            progress = progress or matched > 0
    return _deadlock_report(s, pc, links, waits_for)


def _match_link(ours: deque, theirs: deque, have: list[set], a: int, b: int) -> tuple[int, str | None]:
    """Complete operations at the heads of link a<->b while they pair up; a mismatch is fatal."""
    matched = 0
    while ours and theirs:
        x, y = ours[0], theirs[0]
        if isinstance(x, Send) == isinstance(y, Send):
            break                                    # both sending or both receiving: wait
        if x.key != y.key:
            send, recv = (x, y) if isinstance(x, Send) else (y, x)
            return matched, (f"link {a}<->{b}: the next send is {send.key} but the peer's next "
                             f"receive is {recv.key}; a link's sends and receives must be in the same order")
        have[b if isinstance(x, Send) else a].add(x.key)
        ours.popleft()
        theirs.popleft()
        matched += 1
    return matched, None


def _deadlock_report(s: Schedule, pc: list[int], links: dict, waits_for) -> list[str]:
    """Describe what each stuck rank waits for, and the cycle of ranks waiting on each other."""
    stuck = [r for r in range(s.pp) if pc[r] < len(s.ranks[r])]
    found, edges, verb = [], {}, "sent" if s.has_communication else "produced"
    for rank in stuck:
        reasons = []
        for key in waits_for(rank):
            producer = s.rank_of(key.stage, key.direction)
            pending = links.get((producer, rank), ())
            if any(isinstance(op, Send) and op.key == key for op in pending):
                ours = links.get((rank, producer))
                reasons.append(f"{key}, sent by rank {producer} whose next operation on the link is "
                               f"'{pending[0]}', while this rank's is "
                               f"'{ours[0] if ours else 'none: the receive is missing'}'")
            else:
                reasons.append(f"{key} from rank {producer}, which has not {verb} it")
            edges.setdefault(rank, producer)
        found.append(f"deadlock: rank {rank} is stuck at {s.ranks[rank][pc[rank]]} waiting for "
                     + "; ".join(reasons or ["nothing it can name"]))
    for (a, b), ops in sorted(links.items()):
        if ops and not stuck:
            found.append(f"rank {a}: {ops[0]} never completes (the link's two sides disagree)")
    cycle = _cycle(edges)
    if cycle:
        found.append("cyclic wait: " + " -> ".join(f"rank {r}" for r in cycle))
    return found


def _cycle(edges: dict[int, int]) -> list[int]:
    """A cycle in a graph where each node waits on one other, or []."""
    for start in edges:
        path, node = [], start
        while node in edges and node not in path:
            path.append(node)
            node = edges[node]
        if node in path:
            return path[path.index(node):] + [node]
    return []
