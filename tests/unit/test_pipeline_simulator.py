"""Pipeline simulator: the DualPipe table of the DeepSeek-V3 report, timing, memory, costs."""
import json

import pytest

from parallel.pipeline import CostModel, build, simulate
from parallel.pipeline.simulator import comparison


def _cost(F, B, W, FB=None, **kw):
    return CostModel(forward=F, backward=B, weight=W, forward_backward=FB, **kw)


# The table's formulas, written out here (PP = model stages; DualPipeV runs on PP/2 ranks).
def _table_bubble(name, PP, c):
    F, B, W, FB = c.forward, c.backward, c.weight, c.FB
    return {"1f1b": (PP - 1) * (F + B), "zb1p": (PP - 1) * (F + B - 2 * W),
            "dualpipe": (PP / 2 - 1) * (FB + B - 3 * W), "dualpipev": (PP / 2 - 1) * (FB + B - 3 * W)}[name]


# Costs inside each formula's assumptions:
#   DualPipe/V: F = I (= B - W), W <= F, max(F, B) <= F&B <= F + B (F&B = F + B: no overlap gain)
#   ZB1P: W <= F and W <= I;   1F1B: any.
DUALPIPE_COSTS = [(1, 2, 1, 3), (1, 2, 1, 2), (1, 2, 1, 2.5), (2, 3, 1, 4), (2, 3.5, 1.5, 4)]
ZB1P_COSTS = [(1, 2, 1), (2, 3, 1), (1, 3, 1), (1.5, 4, 1)]
ONE_F_ONE_B_COSTS = [(1, 2, 1), (2, 5, 1), (1, 1, 0.5)]


@pytest.mark.parametrize("PP", [4, 8])
@pytest.mark.parametrize("name,costs", [("1f1b", ONE_F_ONE_B_COSTS), ("zb1p", ZB1P_COSTS),
                                        ("dualpipe", DUALPIPE_COSTS), ("dualpipev", DUALPIPE_COSTS)])
def test_bubble_matches_the_dualpipe_table(name, costs, PP):
    ranks = PP // 2 if name == "dualpipev" else PP
    for n in (2 * PP, 2 * PP + 6):
        schedule = build(name, ranks, n)
        for cost in costs:
            result = simulate(schedule, _cost(*cost))
            # the bubble of the worst rank: DualPipe's middle ranks overlap the most pairs
            assert max(result.bubble) == pytest.approx(_table_bubble(name, PP, result.cost)), (n, cost)


def test_dualpipe_formula_needs_forward_equal_to_input_grad():
    # F=1, I=2: outside the assumption the table over-states DualPipe's bubble
    result = simulate(build("dualpipe", 8, 20), _cost(1, 3, 1, 3))
    assert max(result.bubble) == 8 and _table_bubble("dualpipe", 8, result.cost) == 9


def test_zb1p_formula_needs_weight_grad_no_longer_than_forward():
    result = simulate(build("zb1p", 4, 12), _cost(1, 3, 2))       # W=2 > F=1
    assert max(result.bubble) == 3 and _table_bubble("zb1p", 4, result.cost) == 0


def test_1f1b_step_time_and_bubble_fraction():
    PP, n, F, B = 4, 10, 1.0, 2.0
    result = simulate(build("1f1b", PP, n), _cost(F, B, 1))
    assert result.step_time == (n + PP - 1) * (F + B)
    assert result.bubble_fraction == pytest.approx((PP - 1) / (n + PP - 1))


def test_peak_activations_and_parameters_follow_the_table():
    PP = 8
    one_f_one_b = simulate(build("1f1b", PP, 20))
    assert one_f_one_b.peak_activations == [PP - r for r in range(PP)]
    assert (one_f_one_b.param_copies, max(one_f_one_b.stages_per_rank)) == (1, 1)
    dualpipe = simulate(build("dualpipe", PP, 20))
    assert dualpipe.peak_activations == [PP + 1] * PP
    assert (dualpipe.param_copies, dualpipe.stages_per_rank) == (2, [2] * PP)
    dualpipev = simulate(build("dualpipev", PP // 2, 20))            # PP stages on PP/2 ranks
    assert dualpipev.peak_activations == [PP + 1] * (PP // 2)
    assert (dualpipev.param_copies, dualpipev.stages_per_rank) == (1, [2] * (PP // 2))


def test_p2p_latency_is_exposed_communication():
    # pp=2, 2 micro-batches, F=1, B=2, p2p=0.5, by hand:
    # rank 1: F0 [1.5, 2.5] B0 [2.5, 4.5] F1 [4.5, 5.5] B1 [5.5, 7.5]
    # rank 0: F0 [0, 1] F1 [1, 2] B0 [5, 7] (grad sent 4.5) B1 [8, 10] (grad sent 7.5)
    result = simulate(build("1f1b", 2, 2), _cost(1, 2, 1, p2p=0.5))
    assert [(s.start, s.end) for s in result.timeline[1]] == [(1.5, 2.5), (2.5, 4.5), (4.5, 5.5), (5.5, 7.5)]
    assert result.step_time == 10
    assert result.exposed_comm == [1.0, 0.5]


def test_overlapped_pairs_hide_the_all_to_all():
    cost = _cost(1, 2, 1, 2.4, a2a_forward=0.3, a2a_backward=0.5)
    schedule = build("dualpipe", 4, 8)
    result = simulate(schedule, cost)
    # exposed per action: lone F 0.3, lone B or I 0.5, W 0, pair 2.4 - (0.7 + 1.5) = 0.2
    per_kind = {"F": 0.3, "B": 0.5, "I": 0.5, "W": 0.0, "F&B": 0.2}
    for rank in range(4):
        expected = sum(per_kind[a.kind] for a in schedule.ranks[rank] if a.kind in per_kind)
        assert result.exposed_comm[rank] == pytest.approx(expected)


def test_cost_model_loads_measured_phase_costs(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"F": 1.5, "B": 3, "W": 1, "F&B": 4, "p2p": 0.1, "a2a_forward": 0.2}))
    cost = CostModel.load(path)
    assert (cost.forward, cost.backward, cost.weight, cost.I, cost.FB, cost.p2p, cost.a2a_forward) == \
        (1.5, 3.0, 1.0, 2.0, 4.0, 0.1, 0.2)
    with pytest.raises(ValueError, match="cost key \\('fwd'\\) is unknown"):
        CostModel.load({"fwd": 1})


def test_v3_layout_table():
    rows = {r["schedule"]: r for r in comparison(16, 20)}
    assert rows["dualpipe"]["microbatches"] == 32        # DualPipe needs >= 2 * pp
    assert "needs microbatches >= 32" in rows["dualpipe"]["note"]
    assert rows["dualpipev"]["devices"] == 8 and rows["dualpipev"]["microbatches"] == 20
    for name, row in rows.items():
        assert row["bubble"] == row["paper_bubble"] == _table_bubble(name, 16, CostModel())
    peaks = [rows[n]["peak_activations"] for n in ("1f1b", "zb1p", "dualpipe", "dualpipev")]
    assert peaks == [16, 16, 17, 17]


# Per-stage costs: pp=2, the last stage 1.25x (it also runs the head, the MTP block and the loss).
LAST_STAGE_HEAVIER = {1: {"F": 1.25, "B": 2.5, "W": 1.25}}


def test_per_stage_costs_1f1b_by_hand():
    # 1F1B, pp=2, 4 micro-batches, stage 0: F=1, B=2; stage 1: F=1.25, B=2.5; no p2p cost.
    # rank 0 runs F0 F1 B0 F2 B1 F3 B2 B3, rank 1 F0 B0 F1 B1 F2 B2 F3 B3:
    # rank 0: F0 [0, 1]  F1 [1, 2]  B0 [4.75, 6.75]  F2 [6.75, 7.75]  B1 [8.5, 10.5]
    #         F3 [10.5, 11.5]  B2 [12.25, 14.25]  B3 [16, 18]
    # rank 1: F0 [1, 2.25]  B0 [2.25, 4.75]  F1 [4.75, 6]  B1 [6, 8.5]  F2 [8.5, 9.75]
    #         B2 [9.75, 12.25]  F3 [12.25, 13.5]  B3 [13.5, 16]
    result = simulate(build("1f1b", 2, 4), _cost(1, 2, 1, per_stage=LAST_STAGE_HEAVIER))
    assert [(s.start, s.end) for s in result.timeline[0]] == [
        (0, 1), (1, 2), (4.75, 6.75), (6.75, 7.75), (8.5, 10.5), (10.5, 11.5), (12.25, 14.25), (16, 18)]
    assert [(s.start, s.end) for s in result.timeline[1]] == [
        (1, 2.25), (2.25, 4.75), (4.75, 6), (6, 8.5), (8.5, 9.75), (9.75, 12.25), (12.25, 13.5), (13.5, 16)]
    assert result.step_time == 18
    assert result.busy == [4 * (1 + 2), 4 * (1.25 + 2.5)]
    assert result.bubble == [6, 3]
    assert result.bubble_fraction == pytest.approx((6 + 3) / (2 * 18))


def test_per_stage_costs_price_each_chunk_and_pair_by_its_stages():
    # DualPipe pp=2: a pair costs pair_overlap x (F of its forward's stage + B of its backward's
    # stage), minus that stage's W when the backward is an I; I defaults to the stage's B - W.
    F, B, W = {0: 1.0, 1: 1.25}, {0: 2.0, 1: 2.5}, {0: 1.0, 1: 1.25}
    schedule = build("dualpipe", 2, 8)
    for overlap in (None, 0.8):
        result = simulate(schedule, _cost(1, 2, 1, per_stage=LAST_STAGE_HEAVIER, pair_overlap=overlap))
        for line in result.timeline:
            for slot in line:
                a = slot.action
                if a.kind == "F&B":
                    fwd, bwd = a.forward, a.backward
                    want = (overlap or 1.0) * (F[fwd.stage] + B[bwd.stage]) - (W[bwd.stage] if bwd.kind == "I" else 0)
                else:
                    want = {"F": F, "B": B, "W": W, "I": {s: B[s] - W[s] for s in B}}[a.kind][a.stage]
                assert slot.end - slot.start == pytest.approx(want), a


def test_uniform_per_stage_costs_change_nothing():
    # listing every stage with the uniform costs gives the uniform replay, F&B's overlap included
    cost = _cost(1, 2, 1, 2.5)
    for name, ranks in (("1f1b", 4), ("dualpipe", 4), ("dualpipev", 2)):
        schedule = build(name, ranks, 8)
        listed = _cost(1, 2, 1, 2.5, per_stage={s: {"F": 1, "B": 2, "W": 1} for s in range(schedule.n_stages)})
        plain, staged = simulate(schedule, cost), simulate(schedule, listed)
        assert staged.step_time == pytest.approx(plain.step_time)
        assert staged.bubble == pytest.approx(plain.bubble)


def test_a_heavier_last_stage_idles_1f1b_but_not_dualpipe_on_pp2():
    # 1F1B: rank 1 holds the last stage, rank 0 waits for it. DualPipe: each rank holds the last
    # stage of one direction, 4 of 8 micro-batches each way: busy 4(1 + 2) + 4(1.25 + 2.5) = 27
    # on both ranks, and the replay finds no idle time.
    cost = _cost(1, 2, 1, per_stage=LAST_STAGE_HEAVIER)
    one_f_one_b = simulate(build("1f1b", 2, 8), cost)
    dualpipe = simulate(build("dualpipe", 2, 8), cost)
    assert one_f_one_b.busy == [8 * 3, 8 * 3.75] and min(one_f_one_b.bubble) > 0
    assert dualpipe.busy == [27, 27] and dualpipe.step_time == 27


def test_per_stage_costs_refuse_unknown_keys_and_load_from_json(tmp_path):
    with pytest.raises(ValueError, match="pair_overlap"):
        CostModel(per_stage={1: {"F&B": 3.0}})
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"F": 1, "B": 2, "W": 1, "per_stage": {"1": {"F": 1.25}}, "pair_overlap": 0.9}))
    cost = CostModel.load(path)
    assert (cost.per_stage, cost.pair_overlap) == ({1: {"F": 1.25}}, 0.9)
    assert (cost.phase("F", 0), cost.phase("F", 1), cost.phase("I", 1)) == (1.0, 1.25, 1.0)


def test_posting_a_send_or_receive_takes_rank_time():
    # 1F1B pp=2, 2 micro-batches with its sends and receives, F=1, B=2, post=0.25, p2p=0, by hand:
    # rank 0: F0 [0, 1] send (1.25) F1 [1.25, 2.25] send (2.5) recv (2.75) B0 [4.75, 6.75] recv (7) B1 [8, 10]
    # rank 1: recv (0.25) F0 [1.25, 2.25] recv (2.5) B0 [2.5, 4.5] send (4.75) F1 [4.75, 5.75]
    #         B1 [5.75, 7.75] send (8)
    result = simulate(build("1f1b", 2, 2), _cost(1, 2, 1, post=0.25))
    assert [(s.start, s.end) for s in result.timeline[0]] == [(0, 1), (1.25, 2.25), (4.75, 6.75), (8, 10)]
    assert [(s.start, s.end) for s in result.timeline[1]] == [(1.25, 2.25), (2.5, 4.5), (4.75, 5.75), (5.75, 7.75)]
    assert result.step_time == 10 and result.bubble == [4, 4]
