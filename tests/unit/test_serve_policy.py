"""serve/policy.py (deadlines -> admission and budgets, the latency model), serve/autoscaling.py and serve/protocol.py
validation as pure functions over synthetic profiles and a synthetic clock: every decision depends on counts and
tables, never on this machine's speed. No Ray cluster, no model: milliseconds."""

import asyncio
import base64
import io
import math
import re

import pytest
from PIL import Image

from serve.autoscaling import OfferedRate, offered_demand_policy
from serve.policy import (
    EPS, LENGTH_MIN_SAMPLES, Choice, LatencyProfile, LengthModel, PolicyConfig, Slot, pareto_levels, achievable_ms, admission, alone_ms, apply_caps, capacity_rps,
    choose_budget, decode_ms, drain_ms, edge_finish_ms, levels, may_prefill, plan_deadline, play, predicted_step_ms, prefill_ms, share, simulate, step_ms,
    update_contention,
)  # fmt: skip
from serve.protocol import APIError, Limits, check_image_url, decode_data_url, host_allowed, parse_request, validate_request

GRID = [0.5, 0.625, 0.75, 0.875, 1.0]
U = 1000.0  # one synthetic cost unit (ms)


def units(B=2, overhead=0.0):
    """Every cost proportional to the budget, no batching discount: prefill(b) = decode(b, n) = b units."""
    return LatencyProfile(GRID, B, [b * U for b in GRID], [b * U for b in GRID], [b * U for b in GRID],
                          overhead_ms=overhead, source="config")  # fmt: skip


def batched():
    """The tiny model's shape: a step of 8 rows costs about twice a step of 1, budget 0.5 about half of 1.0."""
    return LatencyProfile(GRID, 8, [5, 6, 7, 8, 9], [1.5, 1.8, 2.0, 2.6, 2.8], [1.8, 2.5, 3.1, 4.8, 5.0], overhead_ms=3)


CFG = PolicyConfig(floor=0.5, ceiling=1.0, slo_ms=3.5 * U)


# ---------------------------------------------------------------------------------------------------------- latency model


def test_simulate_plays_the_engine_forward_by_hand():
    p = units(B=2)
    assert simulate(p, 0, [Slot(1.0, 2)]) == [2 * U]  # prefill 1 unit, then one decode step of 1 unit
    assert simulate(p, 0, [Slot(0.5, 2), Slot(0.5, 2)]) == [1.5 * U, 1.5 * U]  # two prefills, one shared step
    # a third waits for a row: both leave at 1.5, then its prefill (0.5) and its step (0.5)
    assert simulate(p, 0, [Slot(0.5, 2), Slot(0.5, 2), Slot(0.5, 2)]) == [1.5 * U, 1.5 * U, 2.5 * U]
    # a running row with 3 steps left beside a newcomer of 2 tokens: the engine's step decodes the row first (to 1),
    # then prefills the newcomer (to 1.5); a shared step costs the rows' mean (0.75, to 2.25), the row's last alone
    assert simulate(p, 10, [Slot(1.0, 3, running=True), Slot(0.5, 2)]) == [10 + 3.25 * U, 10 + 2.25 * U]
    assert simulate(p, 0, [Slot(1.0, 1)]) == [U]  # one token: its prefill gives it
    assert simulate(p, 0, [Slot(1.0, 2)], kappa=2.0) == [4 * U]  # contention scales engine compute


def test_rows_leave_one_by_one_each_after_its_own_last_step():
    p = units(B=2)
    # both rows decode together (one unit a step) until the shorter leaves at 2; the other takes its last step alone
    assert simulate(p, 0, [Slot(1.0, 2, running=True), Slot(1.0, 3, running=True)]) == [2 * U, 3 * U]


def test_a_running_row_with_nothing_left_is_finished_now():
    p = units(B=2)
    assert simulate(p, 5, [Slot(1.0, 0, running=True), Slot(1.0, 2)]) == [5, 5 + 2 * U]


def test_step_cost_is_a_straight_line_in_rows_and_the_mean_over_budgets():
    p = batched()
    assert decode_ms(p, 1.0, 1) == 2.8 and decode_ms(p, 1.0, 8) == 5.0 and decode_ms(p, 1.0, 20) == 5.0
    assert decode_ms(p, 1.0, 4.5) == pytest.approx(2.8 + (5.0 - 2.8) * 3.5 / 7)
    assert step_ms(p, [0.5, 1.0]) == pytest.approx((decode_ms(p, 0.5, 2) + decode_ms(p, 1.0, 2)) / 2)
    assert step_ms(p, []) == 0.0
    assert predicted_step_ms(p, [0.5, 1.0], [1.0]) == pytest.approx(2.8 + 5 + 9)


def test_a_batch_of_one_decodes_at_the_single_row_cost():
    """max_batch_size 1: every step has one row, whatever decode_ms_b says (there is no line from 1 to B rows)."""
    p = LatencyProfile([0.5, 1.0], 1, [1, 2], [3, 4], [30, 40])
    assert [decode_ms(p, b, n) for b in (0.5, 1.0) for n in (1, 2)] == [3, 3, 4, 4]
    # the second request waits for the only row: prefill 2 + 2 steps of 4, then its prefill 2 + 1 step of 4
    assert simulate(p, 0, [Slot(1.0, 3), Slot(1.0, 2)]) == [10, 16]


def test_two_rows_cost_the_profiles_full_batch_step():
    p = LatencyProfile([0.5, 1.0], 2, [1, 2], [3, 4], [5, 7])
    assert [decode_ms(p, 1.0, n) for n in (0, 1, 2, 3)] == [4, 4, 7, 7]  # the line's two ends, clipped beyond them


def test_a_budget_runs_as_the_highest_grid_level_not_above_it():
    p = batched()
    assert [p.index(b) for b in (0.3, 0.5, 0.7, 0.75 - EPS, 0.75 - 2 * EPS, 1.0, 1.2)] == [0, 0, 1, 2, 1, 4, 4]
    assert prefill_ms(p, 0.3) == 5 and decode_ms(p, 0.3, 1) == 1.5  # below the grid: the lowest level's costs


def test_profiles_are_checked_and_made_monotone():
    p = LatencyProfile(GRID, 8, [5, 4, 7, 8, 9], [1, 2, 1.5, 3, 3], [0.5, 3, 3, 4, 5])
    assert p.prefill_ms == [5, 5, 7, 8, 9] and p.decode_ms_1 == [1, 2, 2, 3, 3]
    assert p.decode_ms_b == [1, 3, 3, 4, 5]  # more rows never cost less than one
    with pytest.raises(ValueError, match="prefill_ms needs one value per budget"):
        LatencyProfile(GRID, 8, [1], [1] * 5, [1] * 5)
    with pytest.raises(ValueError, match="ascending"):
        LatencyProfile([1.0, 0.5], 8, [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="finite values >= 0"):
        LatencyProfile(GRID, 8, [1, 1, 1, 1, math.nan], [1] * 5, [1] * 5)
    with pytest.raises(ValueError, match="unknown keys \\['prefill_ms_1'\\]"):
        LatencyProfile.from_dict({**units().to_dict(), "prefill_ms_1": [1]})
    q = LatencyProfile.from_dict(units(overhead=7).to_dict())
    assert q.to_dict() == units(overhead=7).to_dict() and q.source == "config"
    assert LatencyProfile.from_dict(units().to_dict(), source="cache").source == "cache"


@pytest.mark.parametrize("kw, message", [
    (dict(budgets=[]), "profile budgets must be a non-empty ascending list"),
    (dict(max_batch_size=0), "profile.max_batch_size must be an integer >= 1, got 0"),
    (dict(max_batch_size=2.0), "profile.max_batch_size must be an integer >= 1, got 2.0"),
    (dict(decode_ms_1=[1, 1, -0.5, 1, 1]),
     "profile.decode_ms_1 must hold finite values >= 0, got [1.0, 1.0, -0.5, 1.0, 1.0]"),
    (dict(overhead_ms=-1), "profile.overhead_ms must be finite and >= 0, got -1"),
    (dict(overhead_ms=math.inf), "profile.overhead_ms must be finite and >= 0, got inf"),
])  # fmt: skip
def test_a_bad_profile_is_refused_naming_the_key(kw, message):
    table = dict(budgets=GRID, max_batch_size=8, prefill_ms=[1] * 5, decode_ms_1=[1] * 5, decode_ms_b=[1] * 5)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        LatencyProfile(**{**table, **kw})


def test_free_compute_and_a_single_row_are_a_valid_profile():
    p = LatencyProfile(GRID, 1, [0] * 5, [0] * 5, [0] * 5)
    assert p.max_batch_size == 1 and p.overhead_ms == 0.0
    assert p.prefill_ms == p.decode_ms_1 == p.decode_ms_b == [0.0] * 5


def test_a_profile_table_may_leave_out_the_overhead_and_the_source():
    table = {"budgets": [0.5, 1.0], "max_batch_size": 2, "prefill_ms": [1, 2], "decode_ms_1": [3, 4], "decode_ms_b": [5, 6]}
    p = LatencyProfile.from_dict(table)
    assert p.overhead_ms == 0.0 and p.source == "config"
    assert LatencyProfile.from_dict({**table, "source": "measured"}).source == "measured"  # a table keeps its own
    assert LatencyProfile.from_dict({**table, "source": "measured"}, source="cache").source == "cache"  # the caller's wins
    with pytest.raises(ValueError, match=re.escape("missing keys ['decode_ms_b']")):
        LatencyProfile.from_dict({k: v for k, v in table.items() if k != "decode_ms_b"})


def test_achievable_range_and_capacity_by_hand():
    p = units(B=2, overhead=100)
    assert alone_ms(p, 0.5, 2) == 100 + 0.5 * U + 0.5 * U
    assert achievable_ms(p, CFG, 3) == (100 + 1.5 * U, 100 + 3 * U)
    # B = 2 rows share each step: per request overhead + prefill + (T-1) * step / B
    assert capacity_rps(p, 1.0, 3) == pytest.approx(1000 / (100 + U + 2 * U / 2))
    assert capacity_rps(p, 0.5, 3) > capacity_rps(p, 1.0, 3)


def test_one_token_is_its_prefill_alone_without_a_decode_step():
    p = units(B=2, overhead=100)
    assert alone_ms(p, 1.0, 1) == 100 + U
    assert capacity_rps(p, 1.0, 1) == 1000 / (100 + U)


def test_alone_decodes_as_one_row_and_full_batches_as_b_rows():
    p = batched()
    assert alone_ms(p, 1.0, 3) == pytest.approx(3 + 9 + 2 * 2.8)
    assert capacity_rps(p, 1.0, 3) == pytest.approx(1000 / (3 + 9 + 2 * 5.0 / 8))


def test_capacity_of_a_free_request_is_unbounded_and_of_a_cheap_one_finite():
    assert capacity_rps(LatencyProfile([1.0], 1, [0], [0], [0]), 1.0, 32) == math.inf
    assert capacity_rps(LatencyProfile([1.0], 1, [0.5], [0], [0]), 1.0, 32) == 2000.0  # half a millisecond each


# ---------------------------------------------------------------------------------------------------------- budgets at join


def test_an_idle_replica_gives_the_ceiling_cold_start():
    """A fresh replica (no state at all) never starts lowered: alone, the ceiling meets the deadline."""
    c = choose_budget(units(), CFG, 0, [], Slot(0, 2, 3.5 * U), [])
    assert c == type(c)(1.0, True, 2 * U)


def test_a_burst_lowers_the_budgets_of_those_ahead_so_the_ones_behind_meet_their_deadlines():
    """Four requests of 2 tokens, B = 2, all due at 3.5 units (the integration test's scenario, in numbers)."""
    p, due = units(B=2), 3.5 * U
    first = choose_budget(p, CFG, 0, [], Slot(0, 2, due), [Slot(0.5, 2, due)] * 3)
    # at b: both joiners leave at 1.5 (b + 0.5), the last two 1.5 later: b + 0.5 <= 4/3 -> 0.75
    assert first.budget == 0.75 and first.feasible
    second = choose_budget(p, CFG, 0, [Slot(0.75, 2, due)], Slot(0, 2, due), [Slot(0.5, 2, due)] * 2)
    assert second.budget == 0.5
    # the burst is over (nothing ahead, nothing behind): the next request runs at full budget again
    assert choose_budget(p, CFG, 0, [], Slot(0, 2, due), []).budget == 1.0


def test_a_request_is_not_raised_at_the_cost_of_one_beside_it():
    p = units(B=2)
    running = Slot(0.5, 3, 2.2 * U, running=True)  # 3 steps left at 0.5: alone it ends at 1.5
    # with time to spare the newcomer waits for the row to finish (1.5), then runs at the ceiling: 2.5 and 3.5
    c = choose_budget(p, CFG, 0, [running], Slot(0, 2, 10 * U), [])
    assert c == Choice(1.0, True, 3.5 * U, now=False)
    # due at 2 it cannot wait: the row decodes (to 0.5), the newcomer's prefill at the floor (to 1) and a shared
    # step (to 1.5) leave the row its last step by 2.0; at 0.625 the gate would see the row miss 2.2
    c = choose_budget(p, CFG, 0, [running], Slot(0, 2, 2 * U), [])
    assert c == Choice(0.5, True, 1.5 * U, now=True)
    for b, due in ((1.0, 10 * U), (0.5, 2 * U)):
        assert simulate(p, 0, [running, Slot(b, 2, due)])[0] <= 2.2 * U


def test_the_gate_holds_a_prefill_back_only_for_a_row_it_would_make_late():
    p = units(B=2)
    # one row at 1.0 with 2 steps left: now it ends at 2. After a prefill at 0.5 of a request that stays on as a
    # row it ends at 0.5 + 2 * 0.75 (the steps cost the rows' mean) = 2; of a one-token request at 0.5 + 2 * 1 = 2.5
    assert may_prefill(p, 0, [(1.0, 2, 3 * U)], 0.5, 2) is True
    assert may_prefill(p, 0, [(1.0, 2, 2 * U)], 0.5, 2) is True  # exactly in time after it
    assert may_prefill(p, 0, [(1.0, 2, 2 * U)], 0.5, 1) is False  # in time now (2.0), late after it (2.5)
    assert may_prefill(p, 0, [(1.0, 2, 2.5 * U)], 0.5, 1) is True
    assert may_prefill(p, 0, [(1.0, 2, 2.5 * U)], 1.0, 2) is False  # at 1.0: 1 + 2 * 1 = 3
    assert may_prefill(p, 0, [(1.0, 2, 1.9 * U)], 1.0, 2) is True  # 2 > 1.9: late anyway, it holds nobody back
    assert may_prefill(p, 0, [(1.0, 2, None)], 0.5, 2) is True and may_prefill(p, 0, [], 1.0, 2) is True
    assert may_prefill(p, 0, [(1.0, 2, 2.5 * U)], 0.5, 1, kappa=2.0) is True  # late anyway at twice the cost


def test_a_row_past_its_planned_deadline_keeps_its_real_one():
    """policy.headroom: choices plan for an earlier deadline, and a row that slipped past it is still protected up to
    its real deadline (the fourth element); without one it holds nobody back, as any row late anyway."""
    p = units(B=2)
    # the row at 1.0 with 2 steps left ends at 2 now, at 2.5 after a one-token prefill at 0.5
    assert may_prefill(p, 0, [(1.0, 2, 1.9 * U)], 0.5, 1) is True  # late for its plan anyway
    assert may_prefill(p, 0, [(1.0, 2, 1.9 * U, 2.2 * U)], 0.5, 1) is False  # in time for its real deadline, not after
    assert may_prefill(p, 0, [(1.0, 2, 1.9 * U, 2.6 * U)], 0.5, 1) is True  # in time for it either way
    assert may_prefill(p, 0, [(1.0, 2, 2.2 * U, None)], 0.5, 1) is False  # no real one beyond the plan: the plan
    # in the play: the row is protected at its real deadline (2.2), so the newcomer waits for the row's steps
    row = Slot(1.0, 2, 1.9 * U, running=True, hard=2.2 * U)
    assert play(p, 0, [row, Slot(0.5, 1, 10 * U)])[1][1] == 2
    assert play(p, 0, [Slot(1.0, 2, 1.9 * U, running=True), Slot(0.5, 1, 10 * U)])[1][1] == 1


def test_the_planned_deadline_keeps_the_headroom_and_the_config_checks_it():
    assert plan_deadline(1000.0, 2400.0, 0.0) == 3400.0 and plan_deadline(1000.0, 2400.0, 0.25) == 2800.0
    assert plan_deadline(0.0, math.inf, 0.2) == math.inf
    assert PolicyConfig(headroom=0.5).check((0.5, 1.0)).headroom == 0.5
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=re.escape(f"policy.headroom must be in [0, 1), got {bad}")):
            PolicyConfig(headroom=bad).check((0.5, 1.0))


def test_under_overload_running_rows_keep_their_deadlines_while_newcomers_wait():
    """The failure the gate fixes: a row one token from done, B = 8, five requests arrive behind it. Without
    deadlines each is prefilled before the row's next step; with them the row steps first and the rest follow."""
    p = LatencyProfile(GRID, 8, [U] * 5, [0.2 * U] * 5, [0.4 * U] * 5, source="config")
    row, queue = Slot(1.0, 1, 1.0 * U, running=True), [Slot(1.0, 2, 20 * U) for _ in range(5)]
    assert simulate(p, 0, [Slot(1.0, 1, running=True)] + queue)[0] == 0.2 * U  # the decode comes first anyway
    row2 = Slot(1.0, 2, 1.0 * U, running=True)  # two tokens left: the second waits for prefills without the gate
    assert simulate(p, 0, [Slot(1.0, 2, running=True)] + queue)[0] == pytest.approx(5.2 * U + decode_ms(p, 1.0, 6))
    fin, steps = play(p, 0, [row2] + queue)
    assert fin[0] == pytest.approx(0.4 * U) and steps[1:] == [2] * 5  # two steps, then the five prefills
    assert play(p, 0, [row] + queue)[1][1:] == [1] * 5


def test_someone_late_anyway_does_not_hold_the_budget_down():
    p = units(B=2)
    doomed = Slot(0.5, 2, 0.1 * U)  # behind, and late whatever the newcomer does
    assert choose_budget(p, CFG, 0, [], Slot(0, 2, 3.5 * U), [doomed]).budget == 1.0


def test_an_expired_request_is_infeasible_at_the_floor():
    p = units(B=2)
    c = choose_budget(p, CFG, 5 * U, [], Slot(0, 2, 5.9 * U), [])  # 0.9 units left, the floor needs 1
    assert not c.feasible and c.budget == 0.5 and c.predicted == 6 * U
    assert choose_budget(p, CFG, 5 * U, [], Slot(0, 2, 6 * U), []).feasible  # exactly in time is in time


def test_finishing_exactly_at_the_deadline_or_within_the_tolerance_is_in_time():
    p = units()
    # alone at the ceiling a request of 2 tokens finishes at 2 units
    assert choose_budget(p, CFG, 0, [], Slot(0, 2, 2 * U), []) == Choice(1.0, True, 2 * U)
    assert choose_budget(p, CFG, 0, [], Slot(0, 2, 2 * U - EPS), []) == Choice(1.0, True, 2 * U)
    assert choose_budget(p, CFG, 0, [], Slot(0, 2, 2 * U - 2 * EPS), []) == Choice(0.875, True, 1.75 * U)
    # at the floor: feasible within the tolerance, refused a hair beyond it
    assert choose_budget(p, CFG, 5 * U, [], Slot(0, 2, 6 * U - EPS), []) == Choice(0.5, True, 6 * U)
    assert choose_budget(p, CFG, 5 * U, [], Slot(0, 2, 6 * U - 2 * EPS), []) == Choice(0.5, False, 6 * U)


def test_each_level_of_the_grid_is_chosen_when_it_is_the_highest_in_time():
    """Alone, 2 tokens at budget b finish at 2b units: a deadline of 2b units gets exactly b, every level included
    (the one just above the floor too), and the choice predicts that finish."""
    for b in GRID:
        assert choose_budget(units(), CFG, 0, [], Slot(0, 2, 2 * b * U), []) == Choice(b, True, 2 * b * U)


def test_one_behind_who_is_just_in_time_at_the_floor_keeps_the_budget_at_the_floor():
    p = units(B=2)
    # at budget b the newcomer and the one behind it both finish at 1.5 (b + 0.5): only the floor keeps it at 1.5
    for due in (1.5 * U, 1.5 * U - EPS):
        assert choose_budget(p, CFG, 0, [], Slot(0, 2, 10 * U), [Slot(0.5, 2, due)]) == Choice(0.5, True, 1.5 * U)
    # a hair later than the tolerance it is late anyway, and does not hold the newcomer down
    assert choose_budget(p, CFG, 0, [], Slot(0, 2, 10 * U), [Slot(0.5, 2, 1.5 * U - 2 * EPS)]).budget == 1.0


def test_contention_lowers_the_budget_to_what_meets_the_deadline_at_the_slower_speed():
    # steps twice as slow as profiled: the ceiling would take 4 units, 0.875 takes exactly the 3.5 there are
    assert choose_budget(units(), CFG, 0, [], Slot(0, 2, 3.5 * U), [], kappa=2.0) == Choice(0.875, True, 3.5 * U)


def test_budget_is_monotone_in_the_work_ahead_and_in_the_deadline():
    p = batched()
    cfg = PolicyConfig(slo_ms=200)
    by_queue = [choose_budget(p, cfg, 0, [Slot(1.0, 16, None, True)] * min(k, 8) + [Slot(0.5, 16)] * max(k - 8, 0),
                              Slot(0, 16, 200.0), []).budget for k in range(0, 30)]  # fmt: skip
    assert all(a >= b for a, b in zip(by_queue, by_queue[1:])) and by_queue[0] == 1.0 and by_queue[-1] == 0.5
    by_deadline = [choose_budget(p, cfg, 0, [Slot(1.0, 16, None, True)] * 4, Slot(0, 16, d), []).budget
                   for d in range(20, 400, 5)]  # fmt: skip
    assert all(a <= b for a, b in zip(by_deadline, by_deadline[1:])) and len(set(by_deadline)) >= 3


def test_floor_and_ceiling_bound_the_choice_and_caps_only_lower_it():
    p = units()
    assert levels(p, PolicyConfig(floor=0.625, ceiling=0.875)) == [0.625, 0.75, 0.875]
    static = PolicyConfig(floor=1.0, ceiling=1.0, slo_ms=100 * U)
    assert choose_budget(p, static, 0, [], Slot(0, 2, 100 * U), [Slot(1.0, 2, 100 * U)] * 10).budget == 1.0
    assert choose_budget(p, PolicyConfig(floor=0.625, ceiling=0.875), 0, [], Slot(0, 2, None), []).budget == 0.875
    assert apply_caps(1.0, 0.6) == 0.6 and apply_caps(0.5, 0.9) == 0.5 and apply_caps(0.75) == 0.75


def test_a_floor_or_ceiling_within_the_tolerance_of_a_level_keeps_it():
    p = units()
    assert levels(p, PolicyConfig(floor=0.625 + EPS, ceiling=0.875 - EPS)) == [0.625, 0.75, 0.875]
    assert levels(p, PolicyConfig(floor=0.625 + 2 * EPS, ceiling=0.875 - 2 * EPS)) == [0.75]
    assert levels(p, PolicyConfig(floor=0.55, ceiling=0.6)) == [0.55]  # no grid level inside: the floor itself


def test_levels_restrict_the_choice_to_the_budgets_given():
    """Alone, 2 tokens, deadline 1.6 units: every budget b <= 0.8 makes it (2b units). Over the whole grid that is
    0.75; with levels [0.5, 0.875, 1.0] (0.625 and 0.75 left out, say no more accurate than 0.5) it is 0.5."""
    p = units()
    assert choose_budget(p, CFG, 0, [], Slot(0, 2, 1.6 * U), []).budget == 0.75
    cfg = PolicyConfig(floor=0.5, ceiling=1.0, slo_ms=3.5 * U, levels=[0.5, 0.875, 1.0]).check((0.5, 1.0))
    assert levels(p, cfg) == [0.5, 0.875, 1.0]
    assert choose_budget(p, cfg, 0, [], Slot(0, 2, 1.6 * U), []).budget == 0.5
    assert choose_budget(p, cfg, 0, [], Slot(0, 2, 1.8 * U), []).budget == 0.875
    assert cfg.check_levels(GRID) is cfg


@pytest.mark.parametrize("levels_, message", [
    ([0.5, 0.7, 1.2], "policy.levels [1.2] lie outside [floor, ceiling] = [0.5, 1]"),
    ([0.75, 1.0], "must include the floor (0.5)"),
    ([0.5, 0.75], "must include the ceiling (1)"),
    ([], "must be a non-empty list of budgets or null"),
    ("0.5,1.0", "must be a non-empty list of budgets or null"),
    (0.5, "must be a non-empty list of budgets or null"),
    ([0.5, True], "must be a non-empty list of budgets or null"),  # a YAML `true` is not the budget 1.0
])  # fmt: skip
def test_levels_outside_floor_and_ceiling_or_without_them_are_refused_by_name(levels_, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PolicyConfig(floor=0.5, ceiling=1.0, levels=levels_).check((0.5, 1.0))


def test_a_level_off_the_models_grid_is_refused_by_name():
    cfg = PolicyConfig(floor=0.5, ceiling=1.0, levels=[0.5, 0.7, 1.0]).check((0.5, 1.0))
    with pytest.raises(ValueError, match=re.escape("policy.levels: 0.7 is not on the model's budget grid")):
        cfg.check_levels(GRID)


def test_the_pareto_levels_drop_a_budget_no_more_accurate_than_a_cheaper_one():
    # the smol checkpoint's accuracies (bench_serve_load capacity runs): 0.8 answers no better than 0.6
    assert pareto_levels({1.0: 0.328, 0.8: 0.2, 0.6: 0.205}) == [0.6, 1.0]
    assert pareto_levels({0.5: 0.1, 0.75: 0.1, 1.0: 0.3}) == [0.5, 1.0]  # a tie is no gain
    assert pareto_levels({0.5: 0.1, 0.75: 0.2, 1.0: 0.3}) == [0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="accuracy at budget 0.8 is nan"):
        pareto_levels({0.8: math.nan, 1.0: 0.3})


# ---------------------------------------------------------------------------------------------------------- edge admission


def test_share_splits_the_in_flight_requests_in_send_order():
    assert share([1, 2, 3, 4, 5], 1) == [1, 2, 3, 4, 5]
    assert share([1, 2, 3, 4, 5], 2) == [2, 4]  # replica 1 holds 2 and 4 (replica 0 holds three)
    assert share([1, 2, 3, 4], 2) == [1, 3] and share([], 3) == []


def test_edge_admission_refuses_what_even_the_floor_cannot_make_with_retry_after():
    p, due = units(B=2), 3.5 * U
    # the floor behind k requests of 2 tokens sent now (the edge credits no progress to them): each is prefilled alone
    # (0.5) when a row frees, two rows decode together (0.5 a step). k=2: both prefilled by 1, stepped out at 1.5, the
    # new one prefilled at 2 and done at 2.5; k=4: the second pair out at 3, the new one at 4
    finishes = [edge_finish_ms(p, CFG, 0, [2] * k, 1, 2) for k in range(7)]
    assert finishes == [U, 1.5 * U, 2.5 * U, 3 * U, 4 * U, 4.5 * U, 5.5 * U]
    # refused past 3.5 units; Retry-After = the excess in whole seconds, rounded up (0.5, 1 and 2 s)
    assert [admission(p, CFG, 0, due, [2] * k, 1, 2) for k in range(7)] == [None] * 4 + [1, 1, 2]
    assert admission(p, CFG, 0, 0.4 * U, [2] * 9, 1, 2) == math.ceil((edge_finish_ms(p, CFG, 0, [2] * 9, 1, 2) - 400) / 1000)
    assert admission(p, CFG, 0, due, [2] * 4, 2, 2) is None  # two replicas share them
    lenient = PolicyConfig(slo_ms=3.5 * U, reject=False)
    assert admission(p, lenient, 0, due, [2] * 50, 1, 2) is None  # reject=False: only the bounds refuse
    assert edge_finish_ms(units(B=2, overhead=250), CFG, 0, [], 1, 2) == U + 250
    # the first row frees when the first pair steps out: 1.5 units
    assert drain_ms(p, CFG, 0, [2] * 5, 1) == 1.5 * U and drain_ms(p, CFG, 0, [], 1) == 0.0


def test_retry_after_is_the_excess_over_the_deadline_rounded_up_to_whole_seconds():
    p = units(B=2)  # behind six requests of 2 tokens the floor finishes at 5.5 units
    excess = (EPS, 2 * EPS, 1, 1000, 1000.5, 2000)
    assert [admission(p, CFG, 0, 5.5 * U - e, [2] * 6, 1, 2) for e in excess] == [None, 1, 1, 1, 2, 2]


def test_contention_scales_the_edge_prediction_but_not_the_overhead():
    p = units(B=2)
    assert edge_finish_ms(units(B=2, overhead=250), CFG, 0, [], 1, 2, kappa=2.0) == 2 * U + 250
    assert drain_ms(p, CFG, 0, [2] * 5, 1, kappa=2.0) == 3 * U
    assert admission(p, CFG, 0, 3.5 * U, [2] * 3, 1, 2) is None  # the floor finishes at 3 units
    assert admission(p, CFG, 0, 3.5 * U, [2] * 3, 1, 2, kappa=2.0) == 3  # at 6 units: 2.5 s late


def test_drain_is_counted_from_now():
    assert drain_ms(units(B=2), CFG, 7 * U, [2] * 5, 1) == 1.5 * U


def test_one_token_requests_in_flight_are_prefilled_in_turn_and_done():
    p = units(B=2)
    # [2, 2] prefilled (0.5 each) and stepped out together at 1.5; the third's prefill (to 2) gives its one token;
    # then the new one: prefill to 2.5, a step to 3. No request in flight counts as done before its prefill
    assert edge_finish_ms(p, CFG, 0, [2, 2, 1], 1, 2) == 3 * U
    assert drain_ms(p, CFG, 0, [1, 2], 1) == 0.5 * U  # the one-token request is done with its prefill


def test_the_edge_credits_the_time_since_a_request_was_sent_and_no_more_than_it_has_overrun():
    p = units(B=2)
    sent = [(2, 0.0), (2, 0.0)]  # two requests of 2 tokens sent at 0: predicted out together at 1.5
    # at 1 the engine is 1 unit into them: the new one joins at 1.5 and is done at 2.5 (3.5 had they been sent at 1)
    assert edge_finish_ms(p, CFG, 1 * U, sent, 1, 2) == 2.5 * U
    assert edge_finish_ms(p, CFG, 1 * U, [2, 2], 1, 2) == 3.5 * U
    # at 5 they should long be done but are still in flight: the engine is behind by 3.5 units, so they are taken to
    # finish now and the new one a prefill and a step later; a row frees now (Retry-After 1 s)
    assert edge_finish_ms(p, CFG, 5 * U, sent, 1, 2) == 6 * U
    assert drain_ms(p, CFG, 5 * U, sent, 1) == 0.0
    # a request sent before the others starts the clock for the whole share
    assert edge_finish_ms(p, CFG, 1 * U, [(2, 0.0), 2], 1, 2) == 2.5 * U


def test_the_edge_plays_the_engines_gate_with_the_deadlines_it_set():
    p = units(B=2)
    sent = [(2, 0.0), (2, 0.0), (2, 0.0)]
    # without deadlines: the first two prefilled (to 1) and stepped out (1.5), the third prefilled (2), the new one (2.5)
    # and both stepped (3)
    assert edge_finish_ms(p, CFG, 0, sent, 1, 2) == 3 * U
    # the first is due at 1.2: the second's prefill would make it late (1.5), so it steps out alone first (1); the
    # second and third are prefilled (2), stepped out (2.5), and the new one follows alone: prefill 3, step 3.5
    due = [(2, 0.0, 1.2 * U), (2, 0.0, 10 * U), (2, 0.0, 10 * U)]
    assert edge_finish_ms(p, CFG, 0, due, 1, 2) == 3.5 * U


# ---------------------------------------------------------------------------------------------------------- contention


def test_the_contention_factor_does_not_follow_the_budget():
    """The old slowdown factor divided whole-batch wall time (fixed costs included) by generate time, so a lower budget
    read as more slowdown. Engine steps twice as slow as profiled read as 2 at every budget."""
    p = batched()
    for budgets in ([1.0] * 8, [0.5] * 8, [0.5, 1.0, 0.75]):
        window = []
        for _ in range(8):
            kappa = update_contention(window, 2 * predicted_step_ms(p, [], budgets), predicted_step_ms(p, [], budgets), CFG)
        assert kappa == pytest.approx(2.0)


def test_the_contention_factor_is_a_bounded_median_that_ignores_non_measurements():
    window = []
    assert update_contention(window, 0.0, 10.0, CFG) == 1.0 and window == []
    assert update_contention(window, math.inf, 10.0, CFG) == 1.0 and window == []
    assert update_contention(window, 1000.0, 1.0, CFG) == 10.0  # clipped to contention_max
    assert update_contention(window, 1.0, 1000.0, CFG) == pytest.approx((10 + 0.1) / 2)  # even window: the mean of two
    assert update_contention(window, 3.0, 1.0, CFG) == 3.0  # odd: the middle one
    for _ in range(20):
        update_contention(window, 1.0, 1.0, CFG)
    assert len(window) == CFG.contention_window and update_contention(window, 9.0, 1.0, CFG) == 1.0


def test_a_zero_prediction_is_not_a_measurement():
    window = []
    assert update_contention(window, 5.0, 0.0, CFG) == 1.0 and window == []


def test_the_contention_factor_is_the_middle_of_an_odd_window_and_the_mean_of_the_two_middles_of_an_even_one():
    window = []
    assert [update_contention(window, m, 1.0, CFG) for m in (5, 1, 4, 2, 3)] == [5, 3, 4, 3, 3]


def test_lengths_are_max_tokens_then_the_longest_seen_then_their_quantile_capped_by_max_tokens():
    m = LengthModel(PolicyConfig(length_quantile=0.9, length_window=100))
    assert m.typical() is None and m.expect(16) == 16  # nothing seen: the worst case
    for n in [2, 5] + [2] * (LENGTH_MIN_SAMPLES - 3):
        m.observe(n)
    assert m.typical() == 5 and m.expect(16) == 5 and m.expect(4) == 4  # too few for a quantile: the longest seen
    assert m.remaining(16, 1) == 4 and m.remaining(16, 5) == 11  # the longest that ran past it; past all: worst case
    m.observe(2)  # the 16th: the 0.9 quantile of fifteen 2s and one 5
    assert m.typical() == 2 and m.expect(16) == 2 and m.expect(1) == 1  # never above the request's own max_tokens
    assert m.remaining(16, 1) == 1  # quantile of the lengths past 1 (fifteen 2s and a 5): 2, less 1
    for n in range(1, 101):  # 1..100: the window keeps the last 100, so the 0.9 quantile is 90
        m.observe(n)
    assert m.typical() == 90 and m.expect(16) == 16 and m.expect(200) == 90
    for bad in (0, -3, 2.5, None):  # not a completion length: ignored
        m.observe(bad)
    assert len(m.seen) == 100 and m.typical() == 90


def test_a_running_request_has_at_least_one_token_left_until_its_max_tokens():
    m = LengthModel(PolicyConfig(length_window=16))
    for _ in range(16):
        m.observe(3)
    # past every length seen, the worst case: what max_tokens still allows
    assert [m.remaining(16, g) for g in (0, 1, 2, 3, 10, 15, 16)] == [3, 2, 1, 13, 6, 1, 0]
    assert m.remaining(2, 0) == 2  # capped by max_tokens
    assert LengthModel(PolicyConfig()).remaining(16, 4) == 12  # nothing seen yet: the worst case


def test_a_request_that_outran_the_prediction_is_predicted_from_the_lengths_that_ran_as_far():
    m = LengthModel(PolicyConfig(length_quantile=0.5, length_window=16))
    for n in [2] * 12 + [9, 12, 16, 16]:  # most answers are short, a few run long
        m.observe(n)
    assert m.expect(16) == 2 and m.remaining(16, 0) == 2 and m.remaining(16, 1) == 1
    # two tokens produced and still running: one of the long ones (median of 9, 12, 16, 16 is 12), not one step left
    assert m.remaining(16, 2) == 10
    assert m.remaining(16, 10) == 6  # the median of 12, 16, 16
    assert m.remaining(13, 10) == 3  # never beyond its own max_tokens


def test_a_request_with_nothing_ahead_is_predicted_at_one_token_until_lengths_are_known():
    m = LengthModel(PolicyConfig())
    assert m.expect(16, alone=True) == 1 and m.expect(16) == 16  # cold: the lone request teaches, the rest wait
    for _ in range(LENGTH_MIN_SAMPLES):
        m.observe(5)
    assert m.expect(16, alone=True) == 5 and m.expect(16) == 5
    assert LengthModel(PolicyConfig(length_quantile=None)).expect(16, alone=True) == 16  # the worst case, always


def test_length_quantile_none_keeps_the_worst_case():
    m = LengthModel(PolicyConfig(length_quantile=None))
    for _ in range(64):
        m.observe(1)
    assert m.typical() is None and m.expect(16) == 16 and m.remaining(16, 4) == 12


def test_policy_config_is_checked():
    for kw in (dict(floor=0.5 - 1e-10), dict(floor=1.0, ceiling=1.0), dict(contention_max=1.0), dict(contention_window=1),
               dict(target_utilization=1.0), dict(length_quantile=None), dict(length_quantile=1.0)):  # fmt: skip
        PolicyConfig(**kw).check((0.5, 1.0))
    for kw, words in ((dict(floor=0.9, ceiling=0.6), "floor <= ceiling"), (dict(ceiling=1.5), "ceiling=1.5"),
                      (dict(slo_ms=0), "slo_ms"), (dict(tokens=0), "tokens"), (dict(contention_max=0.9), "contention_max"),
                      (dict(contention_window=0), "contention_window"), (dict(target_utilization=0), "target_utilization"),
                      (dict(length_quantile=0), "length_quantile"), (dict(length_quantile=1.5), "length_quantile"),
                      (dict(length_window=0), "length_window")):  # fmt: skip
        with pytest.raises(ValueError, match=words):
            PolicyConfig(**kw).check((0.5, 1.0))


def test_policy_config_tolerance_edges_and_smallest_settings_are_valid():
    for kw in (dict(floor=0.5 - EPS), dict(ceiling=1.0 + EPS), dict(slo_ms=0.5, tokens=1), dict(target_utilization=0.01)):
        cfg = PolicyConfig(**kw)
        assert cfg.check((0.5, 1.0)) is cfg
    for kw in (dict(floor=0.5 - 2 * EPS), dict(ceiling=1.0 + 2 * EPS)):
        with pytest.raises(ValueError, match=re.escape("policy needs 0.5 <= floor <= ceiling <= 1")):
            PolicyConfig(**kw).check((0.5, 1.0))
    with pytest.raises(ValueError, match=re.escape("policy.target_utilization must be in (0, 1], got 1.5")):
        PolicyConfig(target_utilization=1.5).check((0.5, 1.0))


# ---------------------------------------------------------------------------------------------------------- autoscaling


def ctx(metrics, current=1, lo=1, hi=4):
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingContext

    dep = DeploymentID(name="AdaLlavaModel", app_name="adallava")
    return AutoscalingContext(
        deployment_id=dep, deployment_name="AdaLlavaModel", app_name="adallava", current_num_replicas=current,
        target_num_replicas=current, running_replicas=[], total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics={k: {ReplicaID(f"r{i}", dep): v for i, v in enumerate(vals)} for k, vals in metrics.items()},
        raw_metrics={}, capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0, config=None)  # fmt: skip


def test_autoscaling_sizes_for_the_offered_demand_at_full_budget():
    # every replica sees the ingress's totals: the offered rate is the max over replicas, not the sum
    assert offered_demand_policy(ctx({"offered_rps": [50, 48], "capacity_rps": [20, 20]}, current=2)) == (3, {})
    assert offered_demand_policy(ctx({"offered_rps": [40], "capacity_rps": [20]})) == (2, {})  # exactly 2 replicas
    assert offered_demand_policy(ctx({"offered_rps": [0], "capacity_rps": [20]}, current=3)) == (1, {})  # min
    assert offered_demand_policy(ctx({"offered_rps": [500], "capacity_rps": [20]})) == (4, {})  # max
    assert offered_demand_policy(ctx({}, current=2)) == (2, {})  # nothing reported yet: keep


def test_offered_rate_counts_the_ingress_totals_over_the_window():
    r = OfferedRate(window_s=5.0)
    assert r.rate(0.0) == 0.0
    for t in range(11):
        r.observe(float(t), 10 * t)  # 10 requests a second offered (refused ones included in the totals)
    r.observe(10.5, 95)  # an older total overtaken by a newer one: ignored
    assert r.rate(10.0) == pytest.approx((100 - 40) / 5)
    assert r.rate(100.0) == 0.0  # nothing seen for a whole window


# ---------------------------------------------------------------------------------------------------------- protocol


def png_bytes(size=(8, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def data_url(raw, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def err(fn, *a):
    with pytest.raises(APIError) as e:
        r = fn(*a)
        if asyncio.iscoroutine(r):
            asyncio.run(r)
    assert 400 <= e.value.status < 500
    body = e.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return e.value


def validate(obj, limits=None):
    req = parse_request(obj)

    async def loader(url, param):
        return decode_data_url(url, param, limits or Limits())

    return asyncio.run(validate_request(req, limits or Limits(), (0.5, 1.0), loader))


def msg(content, role="user"):
    return {"messages": [{"role": role, "content": content}]}


@pytest.mark.parametrize("obj, param, words", [
    ([1, 2], None, "JSON object"),
    ({}, "messages", "required"),
    ({"messages": []}, "messages", "at least 1"),
    (msg("hi", role="robot"), "messages.0.role", "unknown role"),
    (msg([{"type": "video", "url": "x"}]), "messages.0.content.0", "unknown content part"),
    (msg([{"type": "text"}]), "messages.0.content.0.text", "required"),
    (msg([{"type": "image_url", "image_url": {"url": 3}}]), "messages.0.content.0.image_url.url", "string"),
    (msg(5), "messages.0.content", "string"),
    ({**msg("hi"), "max_tokens": "8"}, "max_tokens", "integer"),
    ({**msg("hi"), "budget": "0.7"}, "budget", "number"),
    ({**msg("hi"), "budget": True}, "budget", "number"),
    ({**msg("hi"), "latency_ms": [100]}, "latency_ms", "number"),
    ({**msg("hi"), "stream": "yes"}, "stream", "boolean"),
])  # fmt: skip
def test_schema_errors_name_the_field(obj, param, words):
    e = err(parse_request, obj)
    assert e.param == param
    assert words in e.message


@pytest.mark.parametrize("extra, param", [
    ({"budget": 0.3}, "budget"), ({"budget": 1.5}, "budget"), ({"budget": float("nan")}, "budget"),
    ({"latency_ms": 0}, "latency_ms"), ({"latency_ms": -5}, "latency_ms"), ({"latency_ms": float("inf")}, "latency_ms"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 100000}, "max_tokens"), ({"temperature": 3}, "temperature"),
    ({"n": 2}, "n"),
])  # fmt: skip
def test_out_of_range_values_are_400_naming_the_range(extra, param):
    e = err(validate, {**msg("hi"), **extra})
    assert e.param == param and ("must be" in e.message)


def test_valid_request_keeps_caps_and_images():
    p = validate({**msg([{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]),
                  "budget": 0.75, "latency_ms": 250, "max_tokens": 5})  # fmt: skip
    assert p.budget_cap == 0.75 and p.latency_ms == 250 and p.max_tokens == 5 and p.temperature == 0.0
    assert len(p.images) == 1 and p.images[0].mode == "RGB"
    assert p.messages == [{"role": "user", "content": [{"type": "text", "text": "what?"}, {"type": "image"}]}]


def test_openai_fields_are_honoured_not_dropped():
    p = validate({**msg("hi"), "user": "u1", "seed": 3, "stream": True, "stream_options": {"include_usage": True},
                  "stop": "END", "frequency_penalty": 0})  # fmt: skip
    assert p.messages[0]["content"][0]["text"] == "hi"
    assert p.seed == 3 and p.include_usage and p.stop == ["END"] and p.user == "u1"


@pytest.mark.parametrize("url, code", [
    ("data:image/png;base64,@@@notbase64@@@", "invalid_base64"),
    ("data:image/png;base64," + base64.b64encode(b"just some text, not an image").decode(), "invalid_image"),
    ("data:image/png;base64," + base64.b64encode(png_bytes((64, 64))[:40]).decode(), "invalid_image"),
    ("data:image/png;base64,", "invalid_image"),
    ("data:text/plain;base64,aGVsbG8=", "invalid_image"),
    ("data:image/png,rawdata", "invalid_image_url"),
    ("notadataurl", "invalid_image_url"),
])  # fmt: skip
def test_bad_image_data_is_400(url, code):
    e = err(decode_data_url, url, "messages.0.content.0.image_url.url", Limits())
    assert e.code == code and e.param == "messages.0.content.0.image_url.url"


def test_corrupt_image_body_is_400():
    raw = bytearray(png_bytes((64, 64)))
    raw[60:80] = b"\x00" * 20  # damage the compressed data past the header
    e = err(decode_data_url, data_url(bytes(raw)), "p", Limits())
    assert e.code == "invalid_image"


def test_image_limits_bytes_pixels_and_count():
    big = png_bytes((300, 300))
    e = err(decode_data_url, data_url(big), "p", Limits(max_image_bytes=100))
    assert e.code == "image_too_large"
    e = err(decode_data_url, data_url(big), "p", Limits(max_image_pixels=300 * 300 - 1))
    assert e.code == "image_too_large" and "pixels" in e.message
    part = {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}
    e = err(validate, msg([part, part]), Limits(max_images=1))
    assert e.code == "too_many_images" and e.param == "messages.0.content.1"


@pytest.mark.parametrize("url, limits, words", [
    ("http://example.com/a.png", Limits(), "fetching image URLs is off"),
    ("file:///etc/passwd", Limits(fetch_images=True, allowed_image_hosts=["example.com"]), "scheme 'file'"),
    ("ftp://example.com/a.png", Limits(), "scheme 'ftp'"),
    ("https://evil.com/a.png", Limits(fetch_images=True, allowed_image_hosts=["example.com"]), "allow-list"),
    ("https://example.com.evil.com/a.png", Limits(fetch_images=True, allowed_image_hosts=["example.com"]), "allow-list"),
    ("https://u:p@example.com/a.png", Limits(fetch_images=True, allowed_image_hosts=["example.com"]), "credentials"),
])  # fmt: skip
def test_disallowed_urls_are_refused_without_contacting_them(url, limits, words):
    e = err(check_image_url, url, "p", limits)
    assert e.code == "url_not_allowed" and words in e.message


def test_allow_list_matching():
    allowed = ["images.example.com", ".cdn.org"]
    assert host_allowed("images.example.com", allowed) and host_allowed("IMAGES.example.com.", allowed)
    assert host_allowed("a.cdn.org", allowed) and host_allowed("cdn.org", allowed)
    assert not host_allowed("example.com", allowed) and not host_allowed("evilcdn.org", allowed)
    assert not host_allowed("images.example.com.evil", allowed) and not host_allowed("", allowed)
    ok = Limits(fetch_images=True, allowed_image_hosts=allowed)
    assert check_image_url("https://a.cdn.org/x.png", "p", ok) == "https://a.cdn.org/x.png"
