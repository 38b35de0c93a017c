"""The serving benchmark's pure parts: arrival schedule, cell metrics, effective accuracy, the feasibility bound,
SuperServe's two figures, the step run's recovery time, server args per variant, headline and targets (no Ray, no
clock)."""

import math

import numpy as np
import pytest

from bench import bench_serve_load as b


def rec(status=200, latency_ms=100.0, correct=True, budget=1.0, code=None, lag_ms=1.0, t_sched=0.0):
    return {"status": status, "latency_ms": latency_ms, "correct": correct if status == 200 else None,
            "budget": budget if status == 200 else None, "code": code, "lag_ms": lag_ms, "t_sched": t_sched}


# ---- arrivals
def test_schedule_is_seeded_sorted_and_inside_its_phases():
    s1 = b.arrival_schedule([(50.0, 20.0)], seed=3)
    assert s1 == b.arrival_schedule([(50.0, 20.0)], seed=3)
    assert s1 != b.arrival_schedule([(50.0, 20.0)], seed=4)
    assert s1 == sorted(s1) and 0 < s1[0] and s1[-1] < 50.0


def test_schedule_rate_follows_each_phase():
    # Poisson counts: mean rate * seconds, sd sqrt(mean); 5 sd either side
    s = b.arrival_schedule([(100.0, 10.0), (100.0, 100.0), (50.0, 0.0), (10.0, 5.0)], seed=0)
    first = sum(1 for t in s if t < 100)
    second = sum(1 for t in s if 100 <= t < 200)
    assert abs(first - 1000) < 5 * math.sqrt(1000)
    assert abs(second - 10000) < 5 * math.sqrt(10000)
    assert not [t for t in s if 200 <= t < 250]  # a zero-rate phase sends nothing
    assert all(t < 260 for t in s) and any(250 <= t for t in s)


def test_schedule_gaps_are_exponential():
    s = b.arrival_schedule([(2000.0, 5.0)], seed=1)
    gaps = np.diff([0.0] + s)
    assert abs(gaps.mean() - 0.2) < 0.01  # mean 1/rate; sd of the mean 0.2/sqrt(10000) = 0.002
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential: coefficient of variation 1


def test_schedule_refuses_a_negative_phase():
    with pytest.raises(ValueError, match="seconds >= 0 and rate >= 0"):
        b.arrival_schedule([(10.0, -1.0)], seed=0)


def test_cell_seed_is_shared_across_variants_and_differs_by_load_and_repeat():
    assert b.cell_seed(0, "load_aware", 2.0, 1) == b.cell_seed(0, "full_shed", 2.0, 1)
    seeds = {b.cell_seed(0, "x", load, rep) for load in (0.5, 1.0, 2.0) for rep in range(3)}
    assert len(seeds) == 9


# ---- metrics
def test_percentile_matches_numpy_and_empty_is_none():
    v = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (50, 95, 99):
        assert b.percentile(v, q) == pytest.approx(float(np.percentile(v, q)))
    assert b.percentile([], 50) is None


def test_summarize_cell_counts_every_outcome():
    records = [
        rec(latency_ms=100, correct=True, budget=1.0),  # correct, in SLO
        rec(latency_ms=1500, correct=True, budget=0.5),  # correct, late
        rec(latency_ms=200, correct=False, budget=0.5),  # wrong, in SLO
        rec(status=429, code="overloaded"),
        rec(status=429, code="deadline_exceeded"),
        rec(status=429, code="overloaded"),
        rec(status=0, code="unanswered", latency_ms=20000),
        rec(status=400, code="invalid_value"),
    ]
    s = b.summarize_cell(records, slo_ms=1000, duration_s=4.0)
    assert s["offered"] == 8 and s["offered_rps"] == 2.0 and s["served"] == 3 and s["served_rps"] == 0.75
    assert s["refused"] == 4 and s["unanswered"] == 1
    assert s["refused_by_code"] == {"429:overloaded": 2, "429:deadline_exceeded": 1, "400:invalid_value": 1}
    assert s["p50_ms"] == 200 and s["p95_ms"] == pytest.approx(float(np.percentile([100, 1500, 200], 95)))
    assert s["slo_attainment"] == 2 / 8
    assert s["mean_budget"] == pytest.approx(2 / 3)
    assert s["accuracy_served"] == pytest.approx(2 / 3)
    assert s["effective_accuracy"] == 1 / 8  # only the first: correct AND within the SLO, over all offered


def test_where_the_time_went_splits_the_client_latency_into_the_servers_account_and_the_rest():
    ok = [rec(latency_ms=1000.0), rec(latency_ms=3000.0), rec(latency_ms=500.0)]
    ok[0]["server_latency"] = {"total": 900.0, "queue": 100.0, "prefill": 500.0, "decode": 300.0}
    ok[1]["server_latency"] = {"total": 2000.0, "queue": 1500.0, "prefill": 400.0, "decode": 100.0,
                               "predicted": 1200.0, "later_prefills": 300.0}  # predicted 1200 ms: 800 ms overrun
    # the third answer carries no server account: it counts in no part
    w = b.where_the_time_went(ok)
    assert w["total"]["p50"] == pytest.approx(1450.0) and w["queue"]["p50"] == pytest.approx(800.0)
    assert w["predicted"]["p50"] == 1200.0 and w["overrun"] == {"p50": 800.0, "p95": 800.0}  # only where reported
    assert w["later_prefills"] == {"p50": 300.0, "p95": 300.0}
    assert w["outside"] == {"p50": pytest.approx(550.0), "p95": pytest.approx(float(np.percentile([100, 1000], 95)))}
    assert b.where_the_time_went([])["total"] == {"p50": None, "p95": None}
    assert "where_ms" in b.summarize_cell(ok, slo_ms=1000, duration_s=1.0)


def test_effective_accuracy_counts_refusals_and_late_answers_as_failures():
    assert b.effective_accuracy([rec(), rec(status=429)], 1000) == 0.5
    assert b.effective_accuracy([rec(latency_ms=1000.0), rec(latency_ms=1000.1)], 1000) == 0.5
    assert b.effective_accuracy([rec(correct=None)], 1000) == 0.0  # an unscored answer is not a correct one
    assert b.effective_accuracy([], 1000) is None


def test_spread_and_aggregate():
    sp = b.spread([3.0, None, 1.0, 2.0])
    assert sp == {"n": 3, "min": 1.0, "median": 2.0, "max": 3.0, "mean": 2.0, "sd": 1.0}
    assert b.spread([4.0])["sd"] is None and b.spread([None])["median"] is None
    agg = b.aggregate([{"p95_ms": 10.0, "effective_accuracy": 0.2}, {"p95_ms": 30.0, "effective_accuracy": 0.4}])
    assert agg["p95_ms"]["median"] == 20.0 and agg["effective_accuracy"]["max"] == 0.4
    assert set(agg) == set(b.SPREAD_KEYS)


# ---- feasibility bound
def test_bound_at_twice_capacity_is_the_floor_alone():
    # serving-review.md 2.5: C(0.5) = 1.25 C(1.0), acc 0.725 / 0.770, 2x load -> 0.625 x 0.725, 1.18x of full budget
    c1 = 37.7
    fb = b.feasibility_bound({1.0: c1, 0.5: 1.25 * c1}, {1.0: 0.770, 0.5: 0.725}, 2 * c1)
    assert fb["effective_accuracy"] == pytest.approx(0.625 * 0.725)
    assert fb["mix"] == {"0.5": pytest.approx(0.625)}
    assert fb["static"] == {"0.5": pytest.approx(0.625 * 0.725), "1.0": pytest.approx(0.385)}
    assert fb["ratio_to_best_static"] == 1.0  # the best static IS the floor: no policy beats it at 2x
    assert fb["effective_accuracy"] / fb["static"]["1.0"] == pytest.approx(1.177, abs=1e-3)


def test_bound_mixes_two_budgets_between_their_capacities():
    c1 = 10.0
    fb = b.feasibility_bound({1.0: c1, 0.5: 1.25 * c1}, {1.0: 0.77, 0.5: 0.725}, 1.1 * c1)
    x05 = (1 / 11 - 1 / 10) / (1 / 12.5 - 1 / 10)  # both constraints tight
    assert fb["mix"] == {"0.5": pytest.approx(x05), "1.0": pytest.approx(1 - x05)}
    assert fb["effective_accuracy"] == pytest.approx(x05 * 0.725 + (1 - x05) * 0.77)
    assert fb["effective_accuracy"] > max(fb["static"].values())


def test_bound_below_capacity_serves_everything_at_full():
    fb = b.feasibility_bound({1.0: 10.0, 0.5: 14.0}, {1.0: 0.8, 0.5: 0.6}, 5.0)
    assert fb["effective_accuracy"] == pytest.approx(0.8) and fb["mix"] == {"1.0": 1.0}


def test_bound_refuses_missing_inputs():
    with pytest.raises(ValueError, match="feasibility_bound needs"):
        b.feasibility_bound({1.0: 10.0}, {0.5: 0.7}, 5.0)


# ---- SuperServe figures
STATICS = [{"slo_attainment": 0.3, "accuracy_served": 0.77}, {"slo_attainment": 0.6, "accuracy_served": 0.72},
           {"slo_attainment": 0.05, "accuracy_served": 0.77}]  # fmt: skip


def test_superserve_figures_on_the_static_envelope():
    f = b.superserve_figures({"slo_attainment": 0.5, "accuracy_served": 0.75}, STATICS)
    # accuracy of the static envelope at attainment 0.5: the segment (0.3, 0.77)-(0.6, 0.72) at 0.5
    acc = 0.77 + (0.72 - 0.77) * (0.2 / 0.3)
    assert f["static_accuracy_at_that_attainment"] == pytest.approx(acc)
    assert f["accuracy_at_equal_slo_attainment"] == pytest.approx(0.75 - acc)
    # attainment of the envelope at accuracy 0.75: the same segment, read the other way: 0.42
    assert f["static_attainment_at_that_accuracy"] == pytest.approx(0.42)
    assert f["slo_attainment_at_equal_accuracy"] == pytest.approx(0.5 / 0.42)


def test_superserve_figures_when_no_static_reaches_the_point():
    f = b.superserve_figures({"slo_attainment": 0.9, "accuracy_served": 0.8}, STATICS)
    assert f["accuracy_at_equal_slo_attainment"] is None and f["slo_attainment_at_equal_accuracy"] is None
    f = b.superserve_figures({"slo_attainment": None, "accuracy_served": 0.8}, STATICS)
    assert f["static_accuracy_at_that_attainment"] is None


# ---- step run
def test_per_second_rows_and_recovery_time():
    recs = []
    for sec, budget in enumerate([1.0, 1.0, 0.5, 0.5, 0.6, 1.0, 0.97, 1.0]):
        recs += [rec(budget=budget, t_sched=sec + 0.1), rec(budget=budget, t_sched=sec + 0.6)]
    recs.append(rec(status=429, t_sched=3.5))
    rows = b.per_second(recs, 8.0)
    assert len(rows) == 8 and rows[3]["refused_429"] == 1 and rows[3]["offered"] == 3 and rows[3]["served"] == 2
    assert rows[4]["mean_budget"] == pytest.approx(0.6)
    assert b.recovery_time(rows, t_drop=4.0, ceiling=1.0) == 1.0  # 0.97 is within the 0.05 tolerance
    assert b.recovery_time(rows, t_drop=4.0, ceiling=1.0, tol=0.01) == 3.0  # the dip at t=6 resets the clock
    low = b.per_second([rec(budget=0.5, t_sched=t) for t in range(5)], 5.0)
    assert b.recovery_time(low, t_drop=2.0, ceiling=1.0) is None


def test_full_share_counts_seconds_at_full_budget_per_window():
    recs = []
    for sec, budget in enumerate([1.0, 0.8, None, 1.0, 0.97, 0.5]):
        if budget is not None:
            recs.append(rec(budget=budget, t_sched=sec + 0.2))
    rows = b.per_second(recs, 6.0)
    assert b.full_share(rows, 0, 3, ceiling=1.0) == (0.5, 2)  # the second without answers is left out
    assert b.full_share(rows, 3, 6, ceiling=1.0) == (pytest.approx(2 / 3), 3)  # 0.97 is within the tolerance
    assert b.full_share(rows, 3, 6, ceiling=1.0, tol=0.01) == (pytest.approx(1 / 3), 3)
    assert b.full_share(rows, 2, 3, ceiling=1.0) == (None, 0)


# ---- server args per variant
CFG = {"model", "max_batch_size", "min_replicas", "max_replicas", "initial_replicas", "num_cpus"}
POL = {"slo_ms", "floor", "ceiling", "reject", "tokens"}
OPTS = {"model": "tiny", "max_batch_size": 8, "replicas": 1, "num_cpus": 1.0, "server_slo_ms": 900.0,
        "max_tokens": 16, "max_queued_requests": 8, "profile_cache": "/tmp/p"}  # fmt: skip


def test_server_args_follow_the_contract_and_name_missing_keys():
    args, missing = b.server_args("min_budget", OPTS, CFG, POL, {"default_max_tokens"})
    assert args["policy"] == {"slo_ms": 900.0, "floor": 0.5, "ceiling": 0.5, "reject": True, "tokens": 16}
    assert args["limits"] == {"default_max_tokens": 16}
    assert "max_queued_requests" not in args and missing == ["max_queued_requests", "profile_cache"]
    args, missing = b.server_args("full_queue", OPTS, CFG | {"max_queued_requests", "profile_cache"},
                                  POL - {"tokens"}, set())  # fmt: skip
    assert missing == [] and args["max_queued_requests"] == 8 and args["profile_cache"] == "/tmp/p"
    assert args["policy"] == {"slo_ms": 900.0, "floor": 1.0, "ceiling": 1.0, "reject": False} and "limits" not in args
    args, _ = b.server_args({"floor": 0.75, "ceiling": 0.75, "reject": False}, OPTS, CFG, POL, set())
    assert args["policy"]["floor"] == 0.75
    # not given: the server's own default (the new server refuses max_queued_requests=None)
    args, missing = b.server_args("load_aware", {**OPTS, "max_queued_requests": None, "profile_cache": None},
                                  CFG | {"max_queued_requests", "profile_cache"}, POL, set())  # fmt: skip
    assert missing == [] and "max_queued_requests" not in args and "profile_cache" not in args
    # --headroom goes to every variant's policy; a server without it cannot express the run
    args, _ = b.server_args("full_shed", {**OPTS, "headroom": 0.2}, CFG, POL | {"headroom"}, set())
    assert args["policy"]["headroom"] == 0.2
    assert "headroom" not in b.server_args("full_shed", OPTS, CFG, POL, set())[0]["policy"]
    with pytest.raises(ValueError, match=r"lacks \['headroom'\]"):
        b.server_args("full_shed", {**OPTS, "headroom": 0.2}, CFG, POL, set())


def test_floor_sets_load_aware_lowest_and_min_budget_static_budget_only():
    v = b.variants_with_floor(0.6)
    assert v["load_aware"] == {"floor": 0.6, "ceiling": 1.0, "reject": True}
    assert v["min_budget"] == {"floor": 0.6, "ceiling": 0.6, "reject": True}
    assert v["full_queue"] == b.VARIANTS["full_queue"] and v["full_shed"] == b.VARIANTS["full_shed"]
    assert b.VARIANTS["load_aware"]["floor"] == 0.5 and b.VARIANTS["min_budget"]["ceiling"] == 0.5  # not mutated
    args, _ = b.server_args(v["min_budget"], OPTS, CFG, POL, set())
    assert args["policy"]["floor"] == args["policy"]["ceiling"] == 0.6
    assert b.build_parser().parse_args([]).floor == 0.5
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="--floor must be in"):
            b.variants_with_floor(bad)


def test_server_args_refuse_unknown_variants_and_servers_without_the_policy_keys():
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        b.server_args("fast", OPTS, CFG, POL, set())
    with pytest.raises(ValueError, match=r"sets floor, ceiling and reject \(and may set levels\)"):
        b.server_args({"floor": 0.5}, OPTS, CFG, POL, set())
    with pytest.raises(ValueError, match=r"lacks \['levels'\]"):  # a server without policy.levels
        b.server_args({"floor": 0.6, "ceiling": 1.0, "reject": True, "levels": [0.6, 1.0]}, OPTS, CFG, POL, set())


def test_load_aware_levels_are_the_pareto_front_of_the_measured_accuracies_or_the_whole_grid():
    v = b.variants_with_floor(0.6)
    info = b.choose_load_aware_levels(v["load_aware"], {1.0: 0.328, 0.8: 0.2, 0.6: 0.205}, "pareto")
    assert v["load_aware"] == {"floor": 0.6, "ceiling": 1.0, "reject": True, "levels": [0.6, 1.0]}
    assert info["levels"] == [0.6, 1.0] and info["accuracy"] == {"0.6": 0.205, "0.8": 0.2, "1.0": 0.328}
    args, _ = b.server_args(v["load_aware"], OPTS, CFG, POL | {"levels"}, set())
    assert args["policy"]["levels"] == [0.6, 1.0]
    # full budget no more accurate than 0.8: the ceiling comes down to 0.8 (the server requires it among the levels)
    v = b.variants_with_floor(0.6)
    b.choose_load_aware_levels(v["load_aware"], {1.0: 0.3, 0.8: 0.3, 0.6: 0.2}, "pareto")
    assert v["load_aware"]["levels"] == [0.6, 0.8] and v["load_aware"]["ceiling"] == 0.8
    assert b.choose_load_aware_levels(v["load_aware"], {}, "grid")["levels"] is None and "levels" not in v["load_aware"]
    with pytest.raises(ValueError, match="need the accuracy at the floor 0.6"):
        b.choose_load_aware_levels(b.variants_with_floor(0.6)["load_aware"], {1.0: 0.3, 0.5: 0.1}, "pareto")
    assert b.build_parser().parse_args([]).load_aware_levels == "pareto"
    with pytest.raises(ValueError, match=r"lacks \['reject'\]"):
        b.server_args("full_shed", OPTS, CFG, POL - {"reject"}, set())


def test_step_phases_are_base_twice_base_then_base_for_longer():
    assert b.step_phases(2.0, 30.0) == [(30.0, 2.0), (30.0, 4.0), (45.0, 2.0)]  # the issue's 1x -> 2x -> 1x
    assert b.step_phases(2.0, 30.0, 0.8) == [(30.0, 1.6), (30.0, 3.2), (45.0, 1.6)]
    assert b.build_parser().parse_args([]).step_base == 1.0
    for bad in (0.0, -1.0, None):
        with pytest.raises(ValueError, match="--step-base must be > 0"):
            b.step_phases(2.0, 30.0, bad)


def test_cores_are_parsed_and_overlap_or_missing_cores_refused():
    assert b.parse_cores("0-2,5") == [0, 1, 2, 5]
    b.check_cores([0], [1], {0, 1}, remote=False)
    with pytest.raises(SystemExit, match="overlap"):
        b.check_cores([0, 1], [1], {0, 1}, remote=False)
    with pytest.raises(SystemExit, match=r"needs cores \[0, 1\] but this machine offers \[0\]"):
        b.check_cores([0], [1], {0}, remote=False)
    b.check_cores([0], [0], {0}, remote=True)  # --url: the server is elsewhere, only the client's core matters


# ---- headline, targets, the file
def cells(la=0.3, fq=0.05, fs=0.2, mb=0.25, p95=800.0, la05=0.7, fq05=0.72):
    def c(ea, p):
        return {"spread": {"effective_accuracy": {"median": ea}, "p95_ms": {"median": p}}}

    return {"load_aware": {"2.0": c(la, p95), "0.5": c(la05, 100.0)}, "full_queue": {"2.0": c(fq, 9000.0),
            "0.5": c(fq05, 90.0)}, "full_shed": {"2.0": c(fs, 700.0)}, "min_budget": {"2.0": c(mb, 600.0)}}  # fmt: skip


def test_headline_has_exactly_the_issue_shape():
    h = b.assemble_headline("smol", 1000.0, cells(), provisional=False)
    assert h == {"preset": "smol", "slo_ms": 1000.0, "load": 2.0,
                 "effective_accuracy": {"load_aware": 0.3, "full_queue": 0.05, "full_shed": 0.2, "min_budget": 0.25},
                 "p95_ms_admitted": {"load_aware": 800.0, "full_queue": 9000.0, "full_shed": 700.0,
                                     "min_budget": 600.0}}  # fmt: skip
    assert "provisional" in b.assemble_headline("tiny", 1000.0, cells(), provisional=True)


def test_targets_met_and_missed():
    t = b.evaluate_targets(cells(), 1000.0, 4.0, stderr_full_05=0.02)
    assert [x["met"] for x in t] == [True, False, True, True]  # 0.3 < 1.3 x 0.25
    assert t[1]["ratio"] == pytest.approx(0.3 / 0.25) and t[1]["best_static"] == 0.25
    t = b.evaluate_targets(cells(la=0.4, p95=1200.0, la05=0.6), 1000.0, None, stderr_full_05=0.02)
    assert [x["met"] for x in t] == [False, True, False, False]
    assert b.evaluate_targets({}, 1000.0, "not run")[3]["met"] is None
    vacuous = b.evaluate_targets(cells(), 1000.0, 0.0, 0.02, step_exercised=False)[3]
    assert vacuous["met"] is None and "not exercised" in vacuous["note"]
    assert t[3]["target"].startswith("step 1x -> 2x -> 1x")
    sized = b.evaluate_targets(cells(), 1000.0, 4.0, 0.02, step_base=0.8)[3]
    assert sized["target"].startswith("step 0.8x -> 1.6x -> 0.8x") and sized["met"] is True
    zero = b.evaluate_targets(cells(la=0.0, fq=0.0, fs=0.0, mb=0.0, la05=0.0, fq05=0.0), 1000.0, 4.0, 0.0)
    assert [x["met"] for x in zero] == [True, None, None, True]  # 0 >= 1.3 x 0 is no evidence either way
    assert "undefined" in zero[1]["note"] and "says nothing" in zero[2]["note"]


def test_merge_keeps_other_presets_and_prefers_smol_for_the_headline():
    run_tiny = {"config": {"slo_ms": 1000.0}, "cells": cells(la=0.1)}
    doc = b.merge_results({"config": {"old": True}, "variants": {}}, "tiny", run_tiny)
    assert doc["previous_design"] == {"config": {"old": True}, "variants": {}}
    assert doc["headline"]["preset"] == "tiny" and "provisional" in doc["headline"]
    doc = b.merge_results(doc, "smol", {"config": {"slo_ms": 1500.0}, "cells": cells(la=0.5)})
    assert set(doc["presets"]) == {"tiny", "smol"}
    assert doc["headline"]["preset"] == "smol" and doc["headline"]["slo_ms"] == 1500.0
    assert doc["headline"]["effective_accuracy"]["load_aware"] == 0.5 and "provisional" not in doc["headline"]
    run_tiny2 = {"config": {"slo_ms": 900.0}, "cells": cells(la=0.2)}
    doc = b.merge_results(doc, "tiny", run_tiny2)  # a later tiny run does not take the headline from smol
    assert doc["headline"]["preset"] == "smol"
    assert doc["presets"]["tiny"] == run_tiny2 and doc["earlier_runs"] == {"tiny": [run_tiny]}  # kept, not lost


# ---- the load client against a stub server on loopback (records, not timing)
async def _stub_server(handler):
    """An aiohttp app on a free loopback port answering POST /v1/chat/completions with `handler`: (runner, url)."""
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


def test_open_loop_client_records_answers_refusals_and_unanswered():
    import asyncio
    import json

    from aiohttp import web

    release = None

    async def handler(request):
        kind = (await request.json())["messages"][0]["content"]
        if kind == "ok":
            return web.json_response({"choices": [{"message": {"content": "red"}}],
                                      "adallava": {"budget": 0.75, "latency_ms": {"total": 5.0},
                                                   "deadline_ms": 900.0}})  # fmt: skip
        if kind == "busy":
            return web.json_response({"error": {"code": "overloaded", "message": "busy"}}, status=429,
                                     headers={"Retry-After": "2"})  # fmt: skip
        await release.wait()  # never answers within the drain (released when the test ends)
        return web.json_response({})

    async def go():
        nonlocal release
        release = asyncio.Event()
        runner, url = await _stub_server(handler)
        bodies = [json.dumps({"messages": [{"role": "user", "content": k}]}).encode() for k in ("ok", "busy", "hang")]
        spec = {"url": url, "schedule": [0.0, 0.01, 0.02, 0.03], "drain_s": 0.5,
                "timeout_s": 10.0, "connections": 8}  # fmt: skip
        try:
            return await b._open_loop(spec, bodies)
        finally:
            release.set()
            await runner.cleanup()

    recs = asyncio.run(go())
    assert [r["i"] for r in recs] == [0, 1, 2, 0] and [r["t_sched"] for r in recs] == [0.0, 0.01, 0.02, 0.03]
    assert [r["status"] for r in recs] == [200, 429, 0, 200]
    assert recs[0]["budget"] == 0.75 and recs[0]["text"] == "red" and recs[0]["deadline_ms"] == 900.0
    assert recs[0]["server_latency"] == {"total": 5.0}
    assert recs[1]["code"] == "overloaded" and recs[1]["retry_after"] == "2"
    assert recs[2]["code"] == "unanswered"
    assert all(r["latency_ms"] >= 0 and r["lag_ms"] is not None for r in recs)
    assert all(r["send_ms"] is not None for r in recs)  # every request reached the wire
    assert any(r["connect_ms"] is not None for r in recs)  # the first one opened a connection (after the warm-up GET's)


def test_closed_loop_once_sends_every_question_exactly_once():
    import asyncio
    import json

    from aiohttp import web

    seen = []

    async def handler(request):
        q = (await request.json())["messages"][0]["content"]
        seen.append(q)
        await asyncio.sleep(0.01 * (int(q) % 3))  # uneven service times: workers finish out of step
        return web.json_response({"choices": [{"message": {"content": q}}], "adallava": {"budget": 0.6}})

    async def go():
        runner, url = await _stub_server(handler)
        bodies = [json.dumps({"messages": [{"role": "user", "content": str(k)}]}).encode() for k in range(7)]
        spec = {"url": url, "once": True, "seconds": 0, "concurrency": 3, "timeout_s": 10.0,
                "connections": 8}  # fmt: skip
        try:
            return await b._closed_loop(spec, bodies)
        finally:
            await runner.cleanup()

    recs = asyncio.run(go())
    assert sorted(r["i"] for r in recs) == list(range(7))  # all 7, none twice, although 7 is not a multiple of 3
    assert sorted(seen) == sorted(str(k) for k in range(7))
    assert all(r["status"] == 200 and r["text"] == str(r["i"]) for r in recs)


def test_each_preset_plots_to_its_own_file_and_smol_keeps_the_headline_name():
    from pathlib import Path

    out = Path("bench/results/serve_load.json")
    assert b.plot_path(out, "smol") == Path("bench/results/serve_load.png")
    assert b.plot_path(out, "tiny") == Path("bench/results/serve_load_tiny.png")
