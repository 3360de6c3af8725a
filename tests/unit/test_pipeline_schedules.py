"""Pipeline schedule IR: generators, checker, printer and refusals (parallel/pipeline)."""
import json

import pytest

from parallel.pipeline import SCHEDULES, ScheduleError, build, from_json, stage_layers
from parallel.pipeline.__main__ import main
from parallel.pipeline.checker import check, problems
from parallel.pipeline.comm import place_communication
from parallel.pipeline.ir import Compute, Overlapped, Recv, Send, computes


def _tokens(schedule, rank, with_stage=False):
    """A rank's compute order as short strings, written here independently of the printer."""
    def one(c):
        return f"{c.kind}{c.mb}" + (f"s{c.stage}" if with_stage else "")
    out = []
    for action in schedule.ranks[rank]:
        if isinstance(action, Overlapped):
            out.append(f"{one(action.forward)}&{one(action.backward)}")
        elif isinstance(action, Compute):
            out.append(one(action))
    return out


def _requests():
    for name in SCHEDULES:
        for pp in (2, 4, 8):
            least = 2 * pp if name.startswith("dualpipe") else pp
            for n in sorted({least, least + 2, 2 * least + 2, 20}):
                if n >= least:
                    yield name, pp, n


@pytest.mark.parametrize("name,pp,n", list(_requests()))
def test_checker_passes_every_generated_schedule(name, pp, n):
    check(build(name, pp, n))


def test_1f1b_runs_warmup_then_one_forward_one_backward():
    s = build("1f1b", 4, 6)
    assert _tokens(s, 0) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5".split()
    assert _tokens(s, 3) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5".split()


def test_zb1p_defers_r_weight_gradients_on_rank_r():
    s = build("zb1p", 4, 6)
    assert _tokens(s, 0) == "F0 F1 F2 F3 I0 W0 F4 I1 W1 F5 I2 W2 I3 W3 I4 W4 I5 W5".split()
    assert _tokens(s, 3) == "F0 I0 F1 I1 F2 I2 F3 I3 W0 F4 I4 W1 F5 I5 W2 W3 W4 W5".split()


# Derived by hand from DeepSeek's DualPipe.step() (eight phases) for pp=4, 10 micro-batches:
# rank 0 is an edge rank (h=0), rank 1 a middle rank (h=1, first main-phase pair not overlapped).
DUALPIPE_PP4_MB10 = {
    0: "F0 F1 F2 F5 I5 W5 F6 F3&B6 F7&B0 F4&B7 F8&B1 B8 F9&B2 B9 I3 W3 I4 W4",
    1: "F0 F5 F1 F6 F2 B5 F7&B0 F3&B6 F8&B1 F4&B7 F9&B2 B8 B3 I9 I4 W9 W4",
}


def test_dualpipe_follows_deepseek_phase_order():
    s = build("dualpipe", 4, 10)
    for rank, expected in DUALPIPE_PP4_MB10.items():
        assert _tokens(s, rank) == expected.split()


def test_dualpipe_is_mirror_symmetric():
    # rank pp-1-r runs rank r's program with the two directions' micro-batches swapped
    s, half = build("dualpipe", 8, 20), 10
    swap = {f"{k}{m}": f"{k}{(m + half) % 20}" for k in "FBIW" for m in range(20)}
    for r in range(8):
        mirrored = ["&".join(swap[p] for p in t.split("&")) for t in _tokens(s, r)]
        assert _tokens(s, 7 - r) == mirrored


# Derived by hand from DeepSeek's DualPipeV.step() for pp=2 (4 stages), 5 micro-batches.
DUALPIPEV_PP2_MB5 = {
    0: "F0s0 F1s0 F2s0 F0s3 I0s3 W0s3 F1s3 F3s0&B1s3 F2s3&B0s0 F4s0&B2s3 F3s3&B1s0 B3s3 "
       "F4s3&B2s0 B4s3 I3s0 W3s0 I4s0 W4s0",
    1: "F0s1 F0s2 F1s1 F1s2 F2s1 B0s2 F2s2&B0s1 F3s1&B1s2 F3s2&B1s1 F4s1&B2s2 F4s2&B2s1 "
       "B3s2 B3s1 I4s2 I4s1 W4s2 W4s1",
}


def test_dualpipev_follows_deepseek_phase_order():
    s = build("dualpipev", 2, 5)
    for rank, expected in DUALPIPEV_PP2_MB5.items():
        assert _tokens(s, rank, with_stage=True) == expected.split()


@pytest.mark.parametrize("name,pp,n", [("dualpipe", 4, 8), ("dualpipe", 8, 20), ("dualpipev", 4, 9)])
def test_dualpipe_stage_placement(name, pp, n):
    s = build(name, pp, n)
    for r in range(pp):
        for c in s.compute_actions(r):
            if name == "dualpipe":   # rank r: stage r forward direction, stage pp-1-r reverse
                assert (c.direction, c.stage) == ((0, r) if c.mb < n // 2 else (1, pp - 1 - r))
            else:                    # V: rank r holds stages r and 2pp-1-r
                assert c.stage in (r, 2 * pp - 1 - r)
    if name == "dualpipe":           # half the micro-batches enter from each end
        assert {c.mb for c in s.compute_actions(0) if c.kind == "F" and c.stage == 0} == set(range(n // 2))
        assert {c.mb for c in s.compute_actions(pp - 1) if c.kind == "F" and c.stage == 0} == \
            set(range(n // 2, n))


@pytest.mark.parametrize("name,pp,n", [("1f1b", 4, 6), ("dualpipe", 4, 8), ("dualpipev", 4, 8)])
def test_communication_crosses_every_rank_boundary_once_each_way(name, pp, n):
    s = build(name, pp, n)
    # one activation and one gradient per micro-batch per stage boundary between two ranks
    boundaries = {"1f1b": pp - 1, "dualpipe": pp - 1, "dualpipev": 2 * pp - 2}[name]
    sends = [a for p in s.ranks for a in p if isinstance(a, Send)]
    recvs = [a for p in s.ranks for a in p if isinstance(a, Recv)]
    assert len(sends) == len(recvs) == 2 * n * boundaries
    for rank, program in enumerate(s.ranks):     # each receive comes before the compute using it
        received = set()
        for action in program:
            if isinstance(action, Recv):
                received.add((action.tensor, action.stage, action.mb))
            for c in computes(action):
                if c.kind == "F" and c.stage > 0 and s.rank_of(c.stage - 1, c.direction) != rank:
                    assert ("activation", c.stage - 1, c.mb) in received
                last = s.n_stages - 1
                if c.kind in "BI" and c.stage < last and s.rank_of(c.stage + 1, c.direction) != rank:
                    assert ("gradient", c.stage + 1, c.mb) in received


def _programs(schedule):
    return [list(p) for p in schedule.ranks]


def _index(program, predicate):
    return next(i for i, a in enumerate(program) if predicate(a))


def _swap(schedule, rank, first, second):
    """The schedule with two of a rank's actions exchanged."""
    ranks = _programs(schedule)
    i, j = ranks[rank].index(first), ranks[rank].index(second)
    ranks[rank][i], ranks[rank][j] = ranks[rank][j], ranks[rank][i]
    return schedule.with_ranks(ranks)


def test_checker_rejects_swapped_computes_as_a_cyclic_wait():
    # rank 1 runs a backward before the forward that precedes it in 1F1B: rank 2 waits for
    # that forward's activation while rank 1 waits for rank 2's gradient
    found = problems(_swap(build("1f1b", 4, 6), 1, Compute("F", 1, 2), Compute("B", 1, 0)))
    assert any(p.startswith("deadlock: rank 1") for p in found)
    assert any(p.startswith("cyclic wait") for p in found)


def test_checker_rejects_backward_before_its_forward():
    broken = _swap(build("1f1b", 2, 4), 1, Compute("F", 1, 0), Compute("B", 1, 0))
    assert "rank 1: B[s=1,mb=0] runs before its F" in problems(broken)


def test_checker_rejects_a_dropped_receive():
    s = build("dualpipe", 4, 8)
    ranks = _programs(s)
    del ranks[2][_index(ranks[2], lambda a: isinstance(a, Recv))]
    found = "\n".join(problems(s.with_ranks(ranks)))
    assert "has no earlier receive" in found
    assert "1 send(s), 0 receive(s)" in found


def test_checker_rejects_a_duplicated_forward():
    s = build("dualpipev", 2, 4)
    ranks = _programs(s)
    ranks[0].append(Compute("F", 0, 0))
    assert "stage 0 mb 0: needs one F and one B (or one I and one W), has Fx2, Bx1, Ix0, Wx0" \
        in problems(s.with_ranks(ranks))


def test_checker_rejects_a_missing_weight_gradient_and_w_before_i():
    s = build("zb1p", 2, 2)
    ranks = _programs(s)
    ranks[1].remove(Compute("W", 1, 1))
    i = _index(ranks[1], lambda a: a == Compute("I", 1, 0))
    ranks[1].insert(i, ranks[1].pop(_index(ranks[1], lambda a: a == Compute("W", 1, 0))))
    found = problems(s.with_ranks(ranks))
    assert "stage 1 mb 1: needs one F and one B (or one I and one W), has Fx1, Bx0, Ix1, Wx0" in found
    assert "rank 1: W[s=1,mb=0] runs before its I" in found


def test_checker_rejects_sends_out_of_link_order():
    # an F&B pair on rank 0 sends an activation (direction 0) and a gradient (direction 1) to rank 1
    s = build("dualpipe", 4, 8)
    ranks = _programs(s)
    i = next(i for i, (a, b) in enumerate(zip(ranks[0], ranks[0][1:]))
             if isinstance(a, Send) and isinstance(b, Send) and a.peer == b.peer)
    ranks[0][i], ranks[0][i + 1] = ranks[0][i + 1], ranks[0][i]
    found = problems(s.with_ranks(ranks))
    assert len(found) == 1 and found[0].startswith("link 0<->1: the next send is")
    assert "must be in the same order" in found[0]


def test_checker_rejects_compute_on_the_wrong_rank():
    s = build("dualpipe", 2, 4)
    ranks = _programs(s)
    i = _index(ranks[0], lambda a: isinstance(a, Compute))
    ranks[0][i] = Compute("F", 0, 0, direction=1)
    assert "rank 0: F[s=0,mb=0,d=1] has direction 1; mb 0 enters in direction 0" \
        in problems(s.with_ranks(ranks))
    ranks[0][i] = Compute("F", 1, 0)
    assert "rank 0: F[s=1,mb=0] belongs on rank 1" in problems(s.with_ranks(ranks))


@pytest.mark.parametrize("request_, message", [
    (("dualpipe", 3, 12),
     "dualpipe needs an even pp (pairs of ranks r, pp-1-r), got pp=3: choose pp=2 or pp=4"),
    (("dualpipe", 4, 6), "dualpipe on pp=4 needs microbatches >= 8, got 6: set microbatches=8"),
    (("dualpipe", 4, 9), "got microbatches=9: set microbatches=10"),
    (("dualpipev", 4, 7), "dualpipev on pp=4 needs microbatches >= 8, got 7: set microbatches=8"),
    (("1f1b", 4, 3), "1f1b on pp=4 needs microbatches >= 4, got 3: set microbatches=4"),
    (("gpipe", 4, 8), "schedule ('gpipe') is unknown: choose one of"),
])
def test_invalid_requests_are_refused_with_the_fix(request_, message):
    with pytest.raises(ScheduleError) as refusal:
        build(*request_)
    assert message in str(refusal.value)


def test_layers_must_split_into_the_stages():
    with pytest.raises(ScheduleError) as refusal:
        build("dualpipev", 4, 8, n_layers=12)        # 8 stages
    assert "n_layers (12) does not split into the 8 equal stages of dualpipev on pp=4: choose " \
           "n_layers in [8, 16] or pp in [1, 2, 3, 6]" in str(refusal.value)
    build("dualpipev", 4, 8, n_layers=16)
    assert stage_layers(16, 8)[3] == range(6, 8)


def test_json_has_the_documented_shape(capsys):
    assert main(["show", "--schedule", "dualpipe", "--pp", "2", "--microbatches", "4",
                 "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == ["schedule", "pp", "microbatches", "ranks"]
    assert (data["schedule"], data["pp"], data["microbatches"], len(data["ranks"])) == ("dualpipe", 2, 4, 2)
    actions = [a for rank in data["ranks"] for a in rank]
    assert {a["kind"] for a in actions} == {"F", "B", "I", "W", "F&B", "send", "recv"}
    for a in actions:
        if a["kind"] in "FBIW":
            assert set(a) == {"kind", "stage", "mb", "direction"}
        elif a["kind"] == "F&B":
            assert set(a) == {"kind", "forward", "backward"}
            assert a["forward"]["kind"] == "F" and a["backward"]["kind"] in ("B", "I")
    assert from_json(data) == build("dualpipe", 2, 4)


def test_json_has_no_direction_outside_dualpipe():
    for name in ("1f1b", "dualpipev"):
        data = build(name, 2, 4).to_json(communication=False)
        assert all(set(a) == {"kind", "stage", "mb"} for rank in data["ranks"] for a in rank
                   if a["kind"] != "F&B")


def test_cli_refuses_and_draws(tmp_path, capsys):
    assert main(["show", "--schedule", "dualpipe", "--pp", "3", "--microbatches", "6"]) == 2
    assert "even pp" in capsys.readouterr().err
    out = tmp_path / "t.png"
    assert main(["show", "--schedule", "dualpipev", "--pp", "2", "--microbatches", "4", "--format", "png",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["show", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2"]) == 0
    text = capsys.readouterr().out
    assert "rank 0: F0 F1 B0 B1" in text and "rank  1 |" in text


def test_checker_finds_a_cyclic_wait_in_a_compute_only_order():
    # each rank of a pp=2 DualPipe first runs the forward that needs the other rank's forward
    s = build("dualpipe", 2, 4, communication=False)
    ranks = _programs(s)
    for rank in (0, 1):
        ranks[rank].insert(0, ranks[rank].pop(_index(ranks[rank], lambda a: a.kind == "F" and a.stage == 1)))
    broken = s.with_ranks(ranks)
    found = problems(broken)
    assert found[-1] in ("cyclic wait: rank 0 -> rank 1 -> rank 0", "cyclic wait: rank 1 -> rank 0 -> rank 1")
    with pytest.raises(ScheduleError, match="cannot run to the end"):
        place_communication(broken)
    assert problems(s) == []
