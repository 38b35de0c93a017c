"""Serving under load: budgets that fall with load against static baselines, measured as a clean experiment.

    python -m bench.bench_serve_load --model models:/adallava-smol/1           # the headline run (60 s x 3 repeats)
    python -m bench.bench_serve_load --model tiny --cell-s 4 --repeats 1 --loads 0.5 2 --out /tmp/smoke.json  # smoke
    python -m bench.bench_serve_load --url http://server:8000 --variant full_shed --capacities 1.0=30 0.5=40
                                                                              # client only, against a running server

What it does, in order (every step is printed, everything lands in the JSON):
1. Starts its own local Ray cluster on loopback (127.0.0.1, a free port) and the Serve app (serve.app.build_app),
   pinned with sched_setaffinity to the server cores (`--server-cores`, default 0; every Ray process inherits it). The
   load client is a separate process started with `taskset -c <--client-cores>` (default 1), so the client never
   shares a core with the server. Fewer cores than server + client need is an error, not a silent overlap. With
   `--url` nothing is started: the client targets a running server (on another machine, say) that runs one
   `--variant`, and the full-budget capacity comes from `--capacities` instead of being measured.
2. Capacity per budget: for each static budget b in `--budgets` (floor = ceiling = b, queueing, no 429), a
   saturating closed loop (`--capacity-concurrency` requests always in flight, default 2 x max_batch_size) for
   `--capacity-warmup-s` + `--capacity-s`; C(b) = answers per second in the measured window (its two halves are
   reported as a stability check: "stable" when within 20% of each other); then, on the same deployment, every one of
   the `--num-questions` is sent once (closed loop) and acc(b) = the accuracy over all of them, so every budget is
   scored on the same questions (the window's own answers are whichever questions its loop reached, further down the
   list at a faster budget; kept as accuracy_window; `--no-accuracy-pass` uses them instead).
3. The feasibility bound (serving-review.md 2.5, without the "shedding is free" shortcut left implicit): a policy
   serves a fraction x_b of the offered requests at budget b (and refuses the rest); serving at b costs 1/C(b) seconds
   of the replica per request, so at offered rate lam: maximise sum_b x_b acc(b) subject to sum_b x_b <= 1 and
   sum_b x_b lam / C(b) <= 1. The optimum of this linear program lies on a vertex: one budget alone
   (x_b = min(1, C(b)/lam)) or two budgets with both constraints tight; `feasibility_bound` enumerates them. It is an
   upper bound on effective accuracy at that load for ANY policy (refusals cost nothing there, the SLO is always met),
   so a load-aware figure below the static one is a policy miss only if the bound leaves room above it.
4. Cells: variants load_aware / full_queue / full_shed / min_budget (the contract's definitions, VARIANTS below) x load
   multiples `--loads` of C(1.0) x `--repeats`, in a seeded random order per repeat, each on a freshly deployed app.
   Open-loop Poisson arrivals from a fixed seed per (variant, load, repeat) cell; the first `--warmup-s` seconds of
   arrivals are sent but not counted; each request's latency is timed from its SCHEDULED arrival (no coordinated
   omission), and the client records its own lag (headers actually sent minus scheduled) so a late client shows.
   Requests still unanswered `--drain-s` after the last arrival count as failures ("unanswered").
5. Step run on load_aware: 1x -> 2x -> 1x (`--step-phase-s` each), per-second offered/served/429s/budget/latency, and
   the recovery time: seconds from the drop back to 1x until the per-second mean budget of served answers reaches
   ceiling - 0.05 and stays there to the end of the run (target: 10 s; undecided when budgets never fell in the 2x
   phase, since then nothing had to recover). Beside it, the share of seconds at full budget in each phase
   (`full_share`): 1x is C(1.0), so Poisson bursts lower budgets now and then before the step as well.
   `--step-base 0.8` runs it as 0.8x -> 1.6x -> 0.8x instead: the load the autoscaler sizes a replica for
   (policy.target_utilization), where a recovery shows apart from a saturated replica's bursts.

Metrics per cell (`summarize_cell`): offered, served, refused by code, unanswered, p50/p95/p99 of admitted (served)
requests, SLO attainment = answers (200) within the SLO / offered, mean budget of served answers, accuracy of served
answers (adallava.data.score_answer, the scoring pipelines.evaluate uses), effective accuracy = answers both correct and
within the SLO / offered (refusals and unanswered count as failures), client lag = when the client handed the request
to its HTTP stack minus the scheduled arrival (a cell whose p99 lag passes a tenth of the SLO is flagged
client_lagged), send_ms = headers on the wire minus scheduled and connect_ms = new TCP connections' set-up (both hold
the server's accept delay too), os.getloadavg() before and after the cell, and the model replica's counters
(`engine`: requests joined, refused at their turn, steps the first in line was held back by the prefill gate).

SuperServe's two figures (`superserve_figures`), per load multiple, from the median over repeats of each cell:
- the static frontier at that load is the upper envelope of the static variants' points (SLO attainment s, served
  accuracy a) plus the straight segments between them (serving a mix of two static configurations);
- accuracy at equal SLO attainment = a(load_aware) - A_static(s(load_aware)), where A_static(s) is the best static
  accuracy at attainment >= s on that envelope (None when no static point reaches s: load-aware dominates outright);
- SLO attainment at equal accuracy = s(load_aware) / S_static(a(load_aware)), where S_static(a) is the best static
  attainment at accuracy >= a on that envelope (None when no static point is that accurate).

Output: bench/results/serve_load.json (`--out`): {"presets": {<preset>: run}, "headline": ...}; a run holds config,
machine, capacities, feasibility, cells (every repeat + spread), step, superserve, targets. The headline comes from
the smol preset's run when the file has one, else the tiny one (marked "provisional"). A PNG beside it, a table on
stdout. Targets (issue 11, benchmark targets, not tests): at 2x, load_aware p95 of admitted <= SLO and effective
accuracy >= 1.3 x the best static variant; at 0.5x load_aware effective accuracy within 2 standard errors of
full_queue; step recovery <= 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # the contract (prompts/contract11.md)
    "load_aware": {"floor": 0.5, "ceiling": 1.0, "reject": True},
    "full_queue": {"floor": 1.0, "ceiling": 1.0, "reject": False},
    "full_shed": {"floor": 1.0, "ceiling": 1.0, "reject": True},
    "min_budget": {"floor": 0.5, "ceiling": 0.5, "reject": True},
}
STATIC = ("full_queue", "full_shed", "min_budget")


def variants_with_floor(floor: float) -> dict:
    """VARIANTS with the floor budget set: load_aware's lowest budget and min_budget's static one (`--floor`). An
    operator sets it to the lowest budget the checkpoint is useful at (its accuracy per budget, measured offline)."""
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"--floor must be in (0, 1], got {floor}")
    out = {k: dict(v) for k, v in VARIANTS.items()}
    out["load_aware"]["floor"] = floor
    out["min_budget"].update(floor=floor, ceiling=floor)
    return out
DEFAULT_OUT = "bench/results/serve_load.json"


# ---------------------------------------------------------------- pure parts (unit-tested, no Ray, no clock)
def arrival_schedule(phases, seed: int) -> list[float]:
    """Open-loop Poisson arrival offsets (seconds from the start) for phases [(seconds, requests per second)], from
    one seeded generator: same phases and seed, same schedule. Inter-arrival gaps are exponential within a phase;
    a phase change restarts the draw at the boundary (memoryless, so this is still Poisson at the new rate)."""
    rng = random.Random(seed)
    out, t0 = [], 0.0
    for seconds, rate in phases:
        if seconds < 0 or rate < 0:
            raise ValueError(f"phase needs seconds >= 0 and rate >= 0, got ({seconds}, {rate})")
        t = t0
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= t0 + seconds:
                break
            out.append(t)
        t0 += seconds
    return out


def cell_seed(seed: int, variant: str, load: float, repeat: int) -> int:
    """A fixed seed per cell, independent of the order cells run in (the same cell always sees the same arrivals;
    different variants at one load and repeat see the same arrivals too, so they are compared on equal input)."""
    return seed * 1_000_003 + int(round(load * 1000)) * 101 + repeat


def percentile(values, q: float):
    """Linear-interpolated percentile (numpy's default) of a list; None for an empty list."""
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize_cell(records, slo_ms: float, duration_s: float) -> dict:
    """records: one dict per counted arrival: status (int HTTP status, 0 = unanswered), code (error code or None),
    latency_ms (from the scheduled arrival), budget (served only), correct (bool or None when not scorable),
    lag_ms (client lag, may be None), send_ms and connect_ms (may be absent). See the module doc for each metric."""
    n = len(records)
    ok = [r for r in records if r["status"] == 200]
    lat = [r["latency_ms"] for r in ok]
    refused: dict[str, int] = {}
    for r in records:
        if r["status"] not in (200, 0):
            key = f"{r['status']}:{r.get('code') or 'none'}"
            refused[key] = refused.get(key, 0) + 1
    in_slo = [r for r in ok if r["latency_ms"] <= slo_ms]
    scored = [r for r in ok if r.get("correct") is not None]
    lags = [r["lag_ms"] for r in records if r.get("lag_ms") is not None]
    sends = [r["send_ms"] for r in records if r.get("send_ms") is not None]
    connects = [r["connect_ms"] for r in records if r.get("connect_ms") is not None]
    return {
        "offered": n, "offered_rps": n / duration_s if duration_s > 0 else None, "served": len(ok),
        "served_rps": len(ok) / duration_s if duration_s > 0 else None,
        "refused": sum(refused.values()), "refused_by_code": refused,
        "unanswered": sum(1 for r in records if r["status"] == 0),
        "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "p99_ms": percentile(lat, 99),
        "slo_attainment": len(in_slo) / n if n else None,
        "mean_budget": statistics.fmean(r["budget"] for r in ok if r.get("budget") is not None)
        if any(r.get("budget") is not None for r in ok) else None,
        "accuracy_served": sum(bool(r["correct"]) for r in scored) / len(scored) if scored else None,
        "effective_accuracy": effective_accuracy(records, slo_ms),
        "client_lag_ms": {"p50": percentile(lags, 50), "p99": percentile(lags, 99), "max": max(lags) if lags else None},
        "send_ms": {"p50": percentile(sends, 50), "p99": percentile(sends, 99)},
        "new_connections": len(connects),
        "connect_ms": {"p50": percentile(connects, 50), "p99": percentile(connects, 99)},
        "where_ms": where_the_time_went(ok),
    }  # fmt: skip


def where_the_time_went(ok) -> dict:
    """Where admitted requests spent their time (p50 / p95 over the cell's answers): the server's own account
    (adallava.latency_ms: total from the ingress's arrival, queue = arrival to taking a row, prefill, decode) and
    outside = the client's latency (from the scheduled arrival) minus the server's total: connection, proxy, the hop to
    the ingress and the way back, where no server clock runs. An admission that predicts well keeps queue + prefill +
    decode within the deadline; a large outside share is time the server cannot see. predicted = the total the
    replica's join predicted from the work present then (where the server reports it) and overrun = total -
    predicted per answer: the prefills of requests that joined later (the gate allows them up to the deadline; the
    server reports them as later_prefills) plus the latency model's error."""
    parts: dict[str, list[float]] = {k: [] for k in ("total", "queue", "prefill", "decode", "outside", "predicted",
                                                     "overrun", "later_prefills")}  # fmt: skip
    for r in ok:
        sl = r.get("server_latency") or {}
        for k in ("total", "queue", "prefill", "decode", "predicted", "later_prefills"):
            if isinstance(sl.get(k), (int, float)):
                parts[k].append(float(sl[k]))
        if isinstance(sl.get("total"), (int, float)) and r.get("latency_ms") is not None:
            parts["outside"].append(r["latency_ms"] - float(sl["total"]))
        if isinstance(sl.get("total"), (int, float)) and isinstance(sl.get("predicted"), (int, float)):
            parts["overrun"].append(float(sl["total"]) - float(sl["predicted"]))
    return {k: {"p50": percentile(v, 50), "p95": percentile(v, 95)} for k, v in parts.items()}


def effective_accuracy(records, slo_ms: float):
    """Answers that are both correct and within the SLO, over ALL offered requests (refused and unanswered ones count
    as failures; an unscored answer counts as not correct). None for no requests."""
    if not records:
        return None
    good = sum(1 for r in records if r["status"] == 200 and r.get("correct") and r["latency_ms"] <= slo_ms)
    return good / len(records)


def spread(values) -> dict:
    """min / median / max / mean / sd over repeats (None values dropped; sd is None below two values)."""
    v = [x for x in values if x is not None]
    if not v:
        return {"n": 0, "min": None, "median": None, "max": None, "mean": None, "sd": None}
    return {"n": len(v), "min": min(v), "median": statistics.median(v), "max": max(v), "mean": statistics.fmean(v),
            "sd": statistics.stdev(v) if len(v) > 1 else None}  # fmt: skip


SPREAD_KEYS = ("offered_rps", "served_rps", "refused", "p50_ms", "p95_ms", "p99_ms", "slo_attainment", "mean_budget",
               "accuracy_served", "effective_accuracy")  # fmt: skip


def aggregate(repeats: list[dict]) -> dict:
    """{metric: spread over the repeats' summaries} for the metrics in SPREAD_KEYS."""
    return {k: spread([r.get(k) for r in repeats]) for k in SPREAD_KEYS}


def feasibility_bound(capacities: dict, accuracies: dict, load_rps: float) -> dict:
    """The linear program of the module doc. capacities {budget: req/s}, accuracies {budget: accuracy}, offered rate.
    Returns {"effective_accuracy": best value, "mix": {budget: fraction of offered served at it},
    "static": {budget: value with that budget alone}, "best_static": max of those, "ratio_to_best_static"}."""
    bs = sorted(b for b in capacities if b in accuracies and capacities[b] and capacities[b] > 0)
    if not bs or load_rps <= 0:
        raise ValueError(f"feasibility_bound needs capacities and accuracies for the same budgets and a load > 0; "
                         f"got capacities {capacities}, accuracies {accuracies}, load {load_rps}")  # fmt: skip
    static = {b: min(1.0, capacities[b] / load_rps) * accuracies[b] for b in bs}
    best_b = max(static, key=static.get)
    best, mix = static[best_b], {best_b: min(1.0, capacities[best_b] / load_rps)}
    for i, bi in enumerate(bs):
        for bj in bs[i + 1 :]:
            ci, cj = 1.0 / capacities[bi], 1.0 / capacities[bj]  # replica seconds per request
            if math.isclose(ci, cj):
                continue
            # x_i + x_j = 1 and x_i ci + x_j cj = 1 / lam
            xi = (1.0 / load_rps - cj) / (ci - cj)
            xj = 1.0 - xi
            if -1e-12 <= xi <= 1 + 1e-12 and -1e-12 <= xj <= 1 + 1e-12:
                val = xi * accuracies[bi] + xj * accuracies[bj]
                if val > best + 1e-12:
                    best, mix = val, {bi: xi, bj: xj}
    best_static = max(static.values())
    return {"load_rps": load_rps, "effective_accuracy": best, "mix": {str(k): v for k, v in mix.items()},
            "static": {str(k): v for k, v in static.items()}, "best_static": best_static,
            "ratio_to_best_static": best / best_static if best_static > 0 else None}  # fmt: skip


def _envelope(points, x: float, xkey: str, ykey: str):
    """max y reachable at x' >= x on the upper envelope of points and segments between them (None if no point has
    x' >= x)."""
    pts = [p for p in points if p.get(xkey) is not None and p.get(ykey) is not None]
    best = None
    for p in pts:
        if p[xkey] >= x:
            best = p[ykey] if best is None else max(best, p[ykey])
    for p in pts:
        for q in pts:
            if p[xkey] < x <= q[xkey]:
                y = p[ykey] + (q[ykey] - p[ykey]) * (x - p[xkey]) / (q[xkey] - p[xkey])
                best = y if best is None else max(best, y)
    return best


def superserve_figures(adaptive: dict, statics: list[dict]) -> dict:
    """adaptive and each static: {"slo_attainment": s, "accuracy_served": a} at one load. See the module doc."""
    s, a = adaptive.get("slo_attainment"), adaptive.get("accuracy_served")
    out = {"accuracy_at_equal_slo_attainment": None, "slo_attainment_at_equal_accuracy": None,
           "static_accuracy_at_that_attainment": None, "static_attainment_at_that_accuracy": None}  # fmt: skip
    if s is None or a is None:
        return out
    acc_static = _envelope(statics, s, "slo_attainment", "accuracy_served")
    att_static = _envelope(statics, a, "accuracy_served", "slo_attainment")
    out["static_accuracy_at_that_attainment"] = acc_static
    out["static_attainment_at_that_accuracy"] = att_static
    if acc_static is not None:
        out["accuracy_at_equal_slo_attainment"] = a - acc_static
    if att_static is not None and att_static > 0:
        out["slo_attainment_at_equal_accuracy"] = s / att_static
    return out


def per_second(records, t_end: float) -> list[dict]:
    """records of a step run (t_sched in seconds from its start) -> one row per second of scheduled arrival."""
    rows = []
    for sec in range(int(math.ceil(t_end))):
        win = [r for r in records if sec <= r["t_sched"] < sec + 1]
        ok = [r for r in win if r["status"] == 200]
        budgets = [r["budget"] for r in ok if r.get("budget") is not None]
        rows.append({"t": sec, "offered": len(win), "served": len(ok),
                     "refused_429": sum(1 for r in win if r["status"] == 429),
                     "unanswered": sum(1 for r in win if r["status"] == 0),
                     "mean_budget": statistics.fmean(budgets) if budgets else None,
                     "p95_ms": percentile([r["latency_ms"] for r in ok], 95)})  # fmt: skip
    return rows


def recovery_time(rows, t_drop: float, ceiling: float, tol: float = 0.05):
    """Seconds from t_drop until the per-second mean budget reaches ceiling - tol and stays there (seconds without a
    served answer neither break nor make the run) to the last row; None when it never does."""
    after = [r for r in rows if r["t"] >= t_drop and r["mean_budget"] is not None]
    if not after:
        return None
    start = None
    for r in after:
        if r["mean_budget"] >= ceiling - tol:
            start = r["t"] if start is None else start
        else:
            start = None
    return None if start is None else start - t_drop


def full_share(rows, start: float, end: float, ceiling: float, tol: float = 0.05):
    """Share of the seconds in [start, end) with served answers whose mean budget is >= ceiling - tol, and how many
    such seconds there were: (share, seconds), share None when no second in the window served anything. Read beside
    the recovery time: at 1x = C(1.0) Poisson bursts lower budgets now and then before the step too, so the 1x phase
    before the 2x one is the level the one after it can return to."""
    served = [r for r in rows if start <= r["t"] < end and r["mean_budget"] is not None]
    if not served:
        return None, 0
    return sum(1 for r in served if r["mean_budget"] >= ceiling - tol) / len(served), len(served)


def server_args(variant, opts: dict, config_fields: set, policy_fields: set, limits_fields: set):
    """The build_app args of one variant (a VARIANTS name, or a {floor, ceiling, reject} dict for the capacity runs),
    from the keys this server's ServeConfig has: returns (args, unsupported), unsupported naming the contract keys
    the running serve/ lacks (they are left out, and said so in the JSON)."""
    if isinstance(variant, str) and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    chosen = VARIANTS[variant] if isinstance(variant, str) else variant
    if not {"floor", "ceiling", "reject"} <= set(chosen) <= {"floor", "ceiling", "reject", "levels"}:
        raise ValueError(f"a variant sets floor, ceiling and reject (and may set levels); got {sorted(chosen)}")
    args = {"model": opts["model"], "max_batch_size": opts["max_batch_size"], "min_replicas": opts["replicas"],
            "max_replicas": opts.get("max_replicas", opts["replicas"]), "initial_replicas": opts["replicas"],
            "num_cpus": opts["num_cpus"]}  # fmt: skip
    policy = {"slo_ms": opts["server_slo_ms"], **chosen}
    if opts.get("headroom") is not None:  # None: the server's own default
        policy["headroom"] = opts["headroom"]
    unsupported = []
    if "tokens" in policy_fields:
        policy["tokens"] = opts["max_tokens"]
    for key in ("max_queued_requests", "profile_cache"):
        if key not in config_fields:
            unsupported.append(key)
        elif opts.get(key) is not None:  # None: the server's own default
            args[key] = opts[key]
    missing_policy = [k for k in policy if k not in policy_fields]
    if missing_policy:
        raise ValueError(f"this server's PolicyConfig lacks {missing_policy}: the variants cannot be expressed")
    args["policy"] = policy
    if "default_max_tokens" in limits_fields:
        args["limits"] = {"default_max_tokens": opts["max_tokens"]}
    return args, unsupported


def choose_load_aware_levels(variant: dict, accuracies: dict, mode: str) -> dict:
    """load_aware's budgets (`policy.levels`), set in `variant` in place. mode "grid": every grid step in [floor,
    ceiling] (the server's default); "pareto": the measured budgets in [floor, ceiling] on the accuracy / budget
    Pareto front (serve.policy.pareto_levels), the ceiling lowered to the most accurate one, so load_aware never
    spends compute on a budget that answers no better than a cheaper one. Every variant is measured on the same
    capacity runs' answers: the static variants are single levels of the same table."""
    from serve.policy import pareto_levels

    if mode == "grid":
        variant.pop("levels", None)
        return {"mode": "grid", "levels": None, "note": f"every grid step in [{variant['floor']:g}, "
                f"{variant['ceiling']:g}]"}  # fmt: skip
    if mode != "pareto":
        raise ValueError(f"unknown --load-aware-levels {mode!r}; known: grid, pareto")
    inside = {b: acc for b, acc in accuracies.items() if variant["floor"] - 1e-9 <= b <= variant["ceiling"] + 1e-9}
    if not any(abs(b - variant["floor"]) < 1e-9 for b in inside):
        raise ValueError(f"pareto levels need the accuracy at the floor {variant['floor']:g}; measured: "
                         f"{sorted(accuracies)}")  # fmt: skip
    lv = pareto_levels(inside)
    variant.update(levels=lv, ceiling=max(lv))
    return {"mode": "pareto", "levels": lv, "accuracy": {str(b): inside[b] for b in sorted(inside)},
            "note": f"{lv}, the Pareto front of the measured accuracies "
                    + ", ".join(f"{b:g}: {inside[b]:.3f}" for b in sorted(inside))}  # fmt: skip


def assemble_headline(preset: str, slo_ms: float, cells: dict, provisional: bool) -> dict:
    """The `headline` object: medians over repeats at load 2.0. cells: {variant: {"2.0": {"spread": {...}}}}."""
    h = {"preset": preset, "slo_ms": slo_ms, "load": 2.0, "effective_accuracy": {}, "p95_ms_admitted": {}}
    for v in VARIANTS:
        sp = cells.get(v, {}).get("2.0", {}).get("spread", {})
        h["effective_accuracy"][v] = sp.get("effective_accuracy", {}).get("median")
        h["p95_ms_admitted"][v] = sp.get("p95_ms", {}).get("median")
    if provisional:
        h["provisional"] = f"{preset} preset, until the trained smol checkpoint has been run"
    return h


def evaluate_targets(cells: dict, slo_ms: float, recovery_s, stderr_full_05=None, step_exercised: bool = True,
                     step_base: float = 1.0):  # fmt: skip
    """Issue 11's benchmark targets with measured values (medians over repeats) and met / missed / undecided (None).
    step_exercised False: budgets never fell in the step's high phase, so a recovery time says nothing. step_base:
    the step's low load (--step-base), named in its target."""

    def med(v, load, key):
        return cells.get(v, {}).get(load, {}).get("spread", {}).get(key, {}).get("median")

    out = []
    p95 = med("load_aware", "2.0", "p95_ms")
    out.append({"target": "2x: p95 of admitted requests within the SLO (load_aware)", "measured_ms": p95,
                "bound_ms": slo_ms, "met": None if p95 is None else p95 <= slo_ms})  # fmt: skip
    la = med("load_aware", "2.0", "effective_accuracy")
    statics = {v: med(v, "2.0", "effective_accuracy") for v in STATIC}
    known = [x for x in statics.values() if x is not None]
    best = max(known) if known else None
    ratio = None if la is None or not best else la / best
    t = {"target": "2x: effective accuracy >= 1.3 x the best static variant", "measured": la, "best_static": best,
         "static": statics, "ratio": ratio, "met": None if la is None or not best else (la >= 1.3 * best)}
    if best == 0:
        t["note"] = "no static variant answers correctly at 2x (a random-init model?): the ratio is undefined"
    out.append(t)
    la05, full05 = med("load_aware", "0.5", "effective_accuracy"), med("full_queue", "0.5", "effective_accuracy")
    tol = 2 * stderr_full_05 if stderr_full_05 is not None else 0.0
    t = {"target": "0.5x: load_aware effective accuracy equals full budget (within 2 standard errors)",
         "measured": la05, "full_queue": full05, "tolerance": tol,
         "met": None if la05 is None or not full05 else la05 >= full05 - tol}
    if full05 == 0:
        t["note"] = "full budget answers nothing correctly at 0.5x (a random-init model?): equality says nothing"
    out.append(t)
    met = None if recovery_s == "not run" or not step_exercised else (recovery_s is not None and recovery_s <= 10)
    low, high = f"{step_base:g}x", f"{2 * step_base:g}x"
    t = {"target": f"step {low} -> {high} -> {low}: budgets back to full within 10 s", "measured_s": recovery_s,
         "bound_s": 10.0, "met": met}
    if not step_exercised:
        t["note"] = f"budgets never fell during the {high} phase: the recovery was not exercised"
    out.append(t)
    return out


def plot_path(out: Path, preset: str) -> Path:
    """Where a run's plot goes: beside the JSON with its name for the smol preset (the headline's), with the preset's
    name added for any other, so a tiny run beside it does not overwrite the headline's plot."""
    return out.with_suffix(".png") if preset == "smol" else out.with_name(f"{out.stem}_{preset}.png")


def merge_results(existing: dict | None, preset: str, run: dict) -> dict:
    """The JSON file holds one run per preset; the headline is the smol run's, else a provisional one (tiny's or the
    only preset's). A file in the previous design's shape (no "presets") is kept under "previous_design", and a run
    this one replaces under "earlier_runs"[preset] (oldest first), so a rerun after a fix can be read beside the one
    that showed the defect."""
    doc = dict(existing or {})
    if doc and "presets" not in doc:
        doc = {"previous_design": doc}
    presets = doc.setdefault("presets", {})
    if preset in presets:
        doc.setdefault("earlier_runs", {}).setdefault(preset, []).append(presets[preset])
    presets[preset] = run
    lead = "smol" if "smol" in doc["presets"] else ("tiny" if "tiny" in doc["presets"] else preset)
    r = doc["presets"][lead]
    doc["headline"] = assemble_headline(lead, r["config"]["slo_ms"], r["cells"], provisional=lead != "smol")
    return doc


# ---------------------------------------------------------------- the load client (its own process, own core)
def _client_main(spec_path: str, out_path: str):
    spec = json.loads(Path(spec_path).read_text())
    bodies = [json.dumps(b).encode() for b in json.loads(Path(spec["bodies"]).read_text())]
    records = asyncio.run(_closed_loop(spec, bodies) if spec["mode"] == "closed" else _open_loop(spec, bodies))
    Path(out_path).write_text(json.dumps(records))


def _record_response(rec, status, headers, payload):
    rec["status"] = status
    if status == 200:
        rec["text"] = payload["choices"][0]["message"]["content"]
        ada = payload.get("adallava", {})
        rec["budget"] = ada.get("budget")
        rec["server_latency"] = ada.get("latency_ms")
        rec["deadline_ms"] = ada.get("deadline_ms")
        rec["completion_tokens"] = (payload.get("usage") or {}).get("completion_tokens")
        rec["tokens_predicted"] = ada.get("tokens_predicted")
    else:
        err = payload.get("error", {}) if isinstance(payload, dict) else {}
        rec["code"] = err.get("code")
        rec["retry_after"] = headers.get("Retry-After")


async def _post(session, url, body, rec):
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"},
                                trace_request_ctx={"rec": rec}) as resp:  # fmt: skip
            try:
                payload = await resp.json(content_type=None)
            except Exception:  # noqa: BLE001 - a non-JSON body is recorded as such
                payload = {"error": {"code": "non_json_body"}}
            _record_response(rec, resp.status, resp.headers, payload)
    except Exception as e:  # noqa: BLE001 - a client-side failure is a failed request, recorded with its reason
        rec["status"], rec["code"] = 0, f"client:{type(e).__name__}"
    rec["t_done"] = time.perf_counter()


def _session(spec):
    import aiohttp

    def stamp(key):
        async def hook(_session, ctx, _params):
            if ctx.trace_request_ctx:
                ctx.trace_request_ctx["rec"][key] = time.perf_counter()

        return hook

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(stamp("t_sent"))
    trace.on_connection_create_start.append(stamp("t_conn0"))  # a new TCP connection (none idle in the pool)
    trace.on_connection_create_end.append(stamp("t_conn1"))
    conn = aiohttp.TCPConnector(limit=spec["connections"], force_close=False)
    return aiohttp.ClientSession(connector=conn, trace_configs=[trace],
                                 timeout=aiohttp.ClientTimeout(total=spec["timeout_s"]))  # fmt: skip


async def _warm(session, url):
    """One cheap GET before the clock starts: the client's one-off costs (lazy imports, the first connection) are not
    the server's latency nor the schedule's lag. Its answer does not matter (a stub may well 404)."""
    try:
        async with session.get(url.rstrip("/") + "/v1/models") as resp:
            await resp.read()
    except Exception:  # noqa: BLE001 - a failure here shows again, counted, in the measured requests
        pass


async def _open_loop(spec, bodies):
    url = spec["url"].rstrip("/") + "/v1/chat/completions"
    schedule = spec["schedule"]
    recs, tasks = [], []
    async with _session(spec) as session:
        await _warm(session, spec["url"])
        t0 = time.perf_counter() + 0.2
        for k, t in enumerate(schedule):
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = {"i": k % len(bodies), "t_sched": t, "t_abs": t0 + t, "t_task": time.perf_counter()}
            recs.append(rec)
            tasks.append(asyncio.create_task(_post(session, url, bodies[rec["i"]], rec)))
        deadline = t0 + (schedule[-1] if schedule else 0) + spec["drain_s"]
        pending = [t for t in tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.perf_counter()))
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    out = []
    for r in recs:
        unanswered = "t_done" not in r or r.get("status") is None
        t_end = r.get("t_done", deadline)
        # lag: the client's own delay, from the scheduled arrival to when it handed the request to its HTTP stack;
        # send_ms: to its headers on the wire, which also holds a new connection's set-up (connect_ms): a server too
        # starved to accept connections shows there, and is the server's latency, not the client's lag
        connect = (r["t_conn1"] - r["t_conn0"]) * 1000 if "t_conn1" in r and "t_conn0" in r else None
        out.append({**{k: v for k, v in r.items() if not k.startswith("t_") or k == "t_sched"},
                    "status": 0 if unanswered else r["status"],
                    "code": r.get("code") or ("unanswered" if unanswered else None),
                    "latency_ms": (t_end - r["t_abs"]) * 1000, "lag_ms": (r["t_task"] - r["t_abs"]) * 1000,
                    "send_ms": (r["t_sent"] - r["t_abs"]) * 1000 if "t_sent" in r else None,
                    "connect_ms": connect})
    return out


async def _closed_loop(spec, bodies):
    url = spec["url"].rstrip("/") + "/v1/chat/completions"
    recs = []
    async with _session(spec) as session:
        await _warm(session, spec["url"])
        t0 = time.perf_counter()
        stop = t0 + spec["seconds"]

        once = iter(range(len(bodies))) if spec.get("once") else None  # every question exactly once, then stop

        async def worker(w):
            k = w
            while True:
                if once is not None:
                    k = next(once, None)
                    if k is None:
                        return
                elif time.perf_counter() >= stop:
                    return
                rec = {"i": k % len(bodies), "t_start": time.perf_counter() - t0}
                await _post(session, url, bodies[rec["i"]], rec)
                rec["t_end"] = rec.pop("t_done") - t0
                rec["latency_ms"] = (rec["t_end"] - rec["t_start"]) * 1000
                rec.pop("t_sent", None)
                recs.append(rec)
                k += spec["concurrency"]

        await asyncio.gather(*(worker(w) for w in range(spec["concurrency"])))
    return recs


# ---------------------------------------------------------------- orchestration (Ray, processes, clock)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_cores(text: str) -> list[int]:
    """"0", "0,1", "0-3" -> sorted core ids."""
    out = set()
    for part in str(text).split(","):
        if "-" in part:
            a, b = part.split("-")
            out.update(range(int(a), int(b) + 1))
        elif part.strip():
            out.add(int(part))
    return sorted(out)


def check_cores(server: list[int], client: list[int], available: set, remote: bool) -> None:
    """Refuse overlapping or unavailable cores, naming them (the client must never share the server's cores)."""
    need = set(client) | (set() if remote else set(server))
    if not client or (not remote and not server):
        raise SystemExit("bench_serve_load: --server-cores and --client-cores must each name at least one core")
    if not remote and set(server) & set(client):
        raise SystemExit(f"bench_serve_load: server cores {server} and client cores {client} overlap; the client "
                         f"must run on its own core (or on another machine: --url)")  # fmt: skip
    if not need <= available:
        raise SystemExit(f"bench_serve_load: needs cores {sorted(need)} but this machine offers {sorted(available)} "
                         f"(server {server}, client {client}): too few cores for a clean run")  # fmt: skip


def load_items(n: int, seed: int, max_tokens: int, data_dir: str):
    """(request bodies, gold answers) from the bundled test split (images as data: URLs), the questions
    pipelines.evaluate scores."""
    from adallava.data import generate_bundled

    paths = generate_bundled(data_dir, seed=seed, num_train=0, num_validation=0, num_test=n, progress=False)
    recs = json.loads(Path(paths["test"]).read_text())
    root = Path(paths["test"]).parent
    bodies, golds = [], []
    for r in recs[:n]:
        q = r["conversations"][0]["value"].replace("<image>", "").strip()
        content = [{"type": "text", "text": q}]
        if r.get("image"):
            img = root / r["image"] if (root / r["image"]).exists() else root / "images" / r["image"]
            url = "data:image/png;base64," + base64.b64encode(img.read_bytes()).decode()
            content = [{"type": "image_url", "image_url": {"url": url}}] + content
        bodies.append({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "temperature": 0})  # fmt: skip
        golds.append(r.get("answer") or r["conversations"][1]["value"])
    return bodies, golds


class Bench:
    def __init__(self, a):
        self.a = a
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_serve_load_"))
        self.bodies, self.golds = load_items(a.num_questions, a.seed, a.max_tokens, str(self.tmp / "data"))
        (self.tmp / "bodies.json").write_text(json.dumps(self.bodies))
        from adallava.data import score_answer  # the scoring pipelines.evaluate uses

        self.score = score_answer
        self.url = a.url
        self.unsupported: list[str] = []
        self.runtime_env, self.model = None, a.model
        self.variants_def = variants_with_floor(a.floor)
        if not a.url:
            from registry import default_tracking_uri, is_registry_uri, pinned_uri

            if is_registry_uri(a.model):  # pinned now; the replicas download that version (as python -m serve does)
                uri = a.tracking_uri or default_tracking_uri()
                self.model = pinned_uri(a.model, uri)
                self.runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri}}

    # -- server
    def start_server(self):
        os.sched_setaffinity(0, self.a.server_cores)  # Ray's processes are children: they inherit the mask
        import ray
        from ray import serve

        port = _free_port()
        ray.init(address="local", num_cpus=len(self.a.server_cores), include_dashboard=False,
                 _node_ip_address="127.0.0.1", runtime_env=self.runtime_env)  # fmt: skip
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        self.url = f"http://127.0.0.1:{port}"

    def deploy(self, variant, max_replicas: int | None = None):
        from dataclasses import fields

        from ray import serve

        from serve.app import build_app
        from serve.config import ServeConfig
        from serve.policy import PolicyConfig

        try:
            from serve.protocol import Limits

            limits_fields = {f.name for f in fields(Limits)}
        except ImportError:
            limits_fields = set()
        opts = {"model": self.model, "max_batch_size": self.a.max_batch_size, "replicas": self.a.replicas,
                "max_replicas": max_replicas or self.a.replicas,
                "num_cpus": len(self.a.server_cores) / (max_replicas or self.a.replicas),
                "server_slo_ms": self.a.server_slo_ms or self.a.slo_ms, "max_tokens": self.a.max_tokens,
                "max_queued_requests": self.a.max_queued_requests, "profile_cache": self.a.profile_cache,
                "headroom": self.a.headroom}  # fmt: skip
        if isinstance(variant, str):  # a variant name: its definition with this run's --floor
            variant = self.variants_def[variant]
        args, self.unsupported = server_args(variant, opts, {f.name for f in fields(ServeConfig)},
                                             {f.name for f in fields(PolicyConfig)}, limits_fields)  # fmt: skip
        try:
            serve.delete("adallava")
        except Exception:  # noqa: BLE001 - nothing deployed yet
            pass
        serve.run(build_app(args), name="adallava", route_prefix="/")
        return args

    def engine_counters(self) -> dict:
        """The model replica's own counters since this deployment started (warm-up arrivals included): requests
        handed to the engine, refused at their turn (deadline passed), steps the first in line was held back by the
        prefill gate, the engine thread's seconds (busy, in engine steps, choosing joins: busy - step is time the
        latency model does not see) and the contention factor now. With several replicas this is one of them (the
        router picks), and says which."""
        from ray import serve

        info = serve.get_deployment_handle("AdaLlavaModel", app_name="adallava").info.remote().result()
        return {k: info.get(k) for k in ("replica", "joined", "refused_deadline", "held", "engine_thread_s",
                                         "contention")}  # fmt: skip

    def stop_server(self):
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()

    # -- client
    def client(self, spec: dict) -> list[dict]:
        spec = {"url": self.url, "bodies": str(self.tmp / "bodies.json"), "connections": self.a.connections,
                **spec}  # fmt: skip
        sp, out = self.tmp / "spec.json", self.tmp / "records.json"
        sp.write_text(json.dumps(spec))
        out.unlink(missing_ok=True)
        cmd = ["taskset", "-c", ",".join(map(str, self.a.client_cores)), sys.executable, "-m", "bench.bench_serve_load",
               "--client-worker", str(sp), str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
        recs = json.loads(out.read_text())
        for r in recs:
            r["correct"] = bool(self.score(r["text"], self.golds[r["i"]])) if r.get("status") == 200 else None
        return recs

    def capacity(self, budget: float) -> dict:
        a = self.a
        self.deploy({"floor": budget, "ceiling": budget, "reject": False})  # static budget b, queueing, no 429
        total = a.capacity_warmup_s + a.capacity_s
        recs = self.client({"mode": "closed", "seconds": total, "concurrency": a.capacity_concurrency,
                            "timeout_s": max(60.0, 20 * a.slo_ms / 1000)})  # fmt: skip
        win = [r for r in recs if r["status"] == 200 and a.capacity_warmup_s <= r["t_end"] < total]
        half = a.capacity_warmup_s + a.capacity_s / 2
        first = sum(1 for r in win if r["t_end"] < half) / (a.capacity_s / 2)
        second = sum(1 for r in win if r["t_end"] >= half) / (a.capacity_s / 2)
        budgets = [r["budget"] for r in win if r.get("budget") is not None]
        out = {"budget": budget, "rps": len(win) / a.capacity_s, "rps_first_half": first, "rps_second_half": second,
               # the two halves of the window within 20% of each other; else the figure is not a steady state
               "stable": abs(first - second) <= 0.2 * max(first, second, 1e-9),
               "accuracy_window": sum(r["correct"] for r in win) / len(win) if win else None, "answers": len(win),
               "errors": sum(1 for r in recs if r["status"] != 200), "concurrency": a.capacity_concurrency,
               "p50_ms": percentile([r["latency_ms"] for r in win], 50),
               "mean_budget_seen": statistics.fmean(budgets) if budgets else None,
               "loadavg_end": os.getloadavg()}  # fmt: skip
        out.update(self.accuracy_pass() if a.accuracy_pass else {"accuracy": out["accuracy_window"],
                                                                  "accuracy_of": "the window's answers"})
        return out

    def accuracy_pass(self) -> dict:
        """acc(b) on the same questions at every budget: each of the --num-questions sent once to the deployment
        the capacity window just measured (closed loop, queueing, no 429). The window's own answers are whichever
        questions its closed loop reached, and a faster budget reaches further down the list, so comparing their
        accuracies across budgets would compare different questions."""
        recs = self.client({"mode": "closed", "once": True, "seconds": 0, "concurrency": self.a.capacity_concurrency,
                            "timeout_s": max(60.0, 20 * self.a.slo_ms / 1000)})  # fmt: skip
        ok = [r for r in recs if r["status"] == 200]
        if len(ok) != len(self.bodies):
            codes = sorted({str(r.get("code") or r["status"]) for r in recs if r["status"] != 200})
            raise SystemExit(f"bench_serve_load: the accuracy pass answered {len(ok)} of {len(self.bodies)} "
                             f"questions (failures: {', '.join(codes)}); acc(b) would not cover every question")
        return {"accuracy": sum(r["correct"] for r in ok) / len(ok), "accuracy_of": f"all {len(ok)} questions",
                "accuracy_pass_s": max(r["t_end"] for r in ok)}  # fmt: skip

    def open_cell(self, phases, seed: int) -> tuple[list[dict], list[float]]:
        schedule = arrival_schedule(phases, seed)
        recs = self.client({"mode": "open", "schedule": schedule, "drain_s": self.a.drain_s,
                            "timeout_s": sum(s for s, _ in phases) + self.a.drain_s + 5})  # fmt: skip
        return recs, schedule


def build_parser():
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass  # the description (this module's docstring: what is measured and how) keeps its lines; defaults shown

    p = argparse.ArgumentParser(prog="python -m bench.bench_serve_load", description=__doc__,
                                formatter_class=Formatter)  # fmt: skip
    p.add_argument("--model", default="tiny", help="checkpoint dir, models:/<name>/<version> URI, or 'tiny'")
    p.add_argument("--preset", default=None, help="name the run is filed under in the JSON (default: from --model: "
                   "'tiny', 'smol' when the model names smol, else the folder name)")
    p.add_argument("--tracking-uri", default=None, help="MLflow registry for models:/ URIs (default: the project's)")
    p.add_argument("--slo-ms", type=float, default=1000.0, help="end-to-end SLO the client measures against")
    p.add_argument("--server-slo-ms", type=float, default=None, help="policy.slo_ms given to the server (default: "
                   "--slo-ms; the contract's server deadlines count from ingress arrival)")
    p.add_argument("--headroom", type=float, default=None, help="policy.headroom given to the server for every "
                   "variant: the fraction of each deadline its choices keep in reserve (default: the server's, 0)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--replicas", type=int, default=1, help="model replicas in the cells (fixed: min = max)")
    p.add_argument("--step-max-replicas", type=int, default=None, help="let the step run autoscale up to this many "
                   "(default: --replicas; on 2 cores a second replica adds no CPU)")
    p.add_argument("--max-queued-requests", type=int, default=None, help="ServeConfig.max_queued_requests (default: "
                   "the server's; passed only when this serve/ has the field)")
    p.add_argument("--profile-cache", default=None, help="ServeConfig.profile_cache (passed only when it exists)")
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="multiples of C(1.0)")
    p.add_argument("--floor", type=float, default=0.5, help="the floor budget: load_aware's lowest budget and "
                   "min_budget's static one (set it to the lowest budget the checkpoint is useful at)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--variant", default=None, choices=list(VARIANTS), help="with --url: the variant that server runs")
    p.add_argument("--cell-s", type=float, default=60.0, help="measured seconds per cell")
    p.add_argument("--warmup-s", type=float, default=10.0, help="arrivals sent but not counted at a cell's start")
    p.add_argument("--drain-s", type=float, default=10.0, help="wait this long after the last arrival; later answers "
                   "count as unanswered (failures)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5], help="static budgets whose capacity is "
                   "measured (1.0 required: loads are multiples of C(1.0))")
    p.add_argument("--capacity-s", type=float, default=30.0)
    p.add_argument("--capacity-warmup-s", type=float, default=10.0)
    p.add_argument("--capacity-concurrency", type=int, default=None, help="closed-loop requests in flight (default "
                   "2 x max batch size: a full batch running, one forming)")
    p.add_argument("--capacities", nargs="+", default=None, metavar="B=RPS", help="with --url: known C(b), e.g. "
                   "1.0=30 0.5=40 (capacity is then not measured)")
    p.add_argument("--accuracies", nargs="+", default=None, metavar="B=ACC", help="with --url: acc(b) for the bound")
    p.add_argument("--accuracy-pass", action=argparse.BooleanOptionalAction, default=True, help="after each "
                   "capacity window, send every question once at that budget: acc(b) (the bound, the Pareto levels) "
                   "then covers the same questions at every budget; --no-accuracy-pass uses the window's answers")
    p.add_argument("--step-phase-s", type=float, default=30.0, help="seconds per phase of the 1x -> 2x -> 1x step "
                   "(the last phase runs 1.5x as long); 0 skips the step run")
    p.add_argument("--step-base", type=float, default=1.0, help="the step's low load as a multiple of C(1.0) (its "
                   "high phase is twice it): 1.0 is the issue's 1x -> 2x -> 1x; 0.8 (policy.target_utilization) is "
                   "the load the autoscaler sizes a replica for")
    p.add_argument("--server-cores", default="0", help="cores the Ray cluster and Serve app are pinned to")
    p.add_argument("--client-cores", default="1", help="cores the load client is pinned to (taskset)")
    p.add_argument("--url", default=None, help="target a running server instead of starting one (client only)")
    p.add_argument("--connections", type=int, default=512, help="client connection pool bound (aiohttp)")
    p.add_argument("--num-questions", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON path (the PNG goes beside it); runs of other presets "
                   "already in the file are kept")
    p.add_argument("--load-aware-levels", choices=("pareto", "grid"), default="pareto",
                   help="the budgets load_aware picks from (policy.levels): pareto = the --budgets on the Pareto "
                   "front of the accuracies the capacity runs measure (a budget no more accurate than a cheaper one "
                   "is left out); grid = every step of the model's grid in [floor, 1.0]")
    p.add_argument("--records", default=None, help="also write every counted request of every cell (client timings "
                   "and what the server reported: budget, latency_ms parts, tokens predicted and produced) to this "
                   "JSON Lines file, one line per request tagged with its variant, load and repeat")
    p.add_argument("--client-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return p


def _pairs(items, what):
    try:
        return {float(k): float(v) for k, v in (s.split("=") for s in items or [])}
    except ValueError:
        raise SystemExit(f"bench_serve_load: {what} take B=VALUE pairs, got {items}") from None


def preset_name(model: str) -> str:
    if model == "tiny":
        return "tiny"
    low = model.lower()
    for name in ("smol", "tiny", "llava7b"):
        if name in low:
            return name
    return Path(model.rstrip("/")).name or model


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.client_worker:
        return _client_main(*a.client_worker)
    for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                 "HF_DATASETS_OFFLINE": "1"}.items():  # fmt: skip
        os.environ.setdefault(k, v)
    a.server_cores, a.client_cores = parse_cores(a.server_cores), parse_cores(a.client_cores)
    check_cores(a.server_cores, a.client_cores, os.sched_getaffinity(0), remote=a.url is not None)
    if 1.0 not in a.budgets:
        raise SystemExit("bench_serve_load: --budgets must include 1.0 (loads are multiples of C(1.0))")
    if a.load_aware_levels == "pareto" and not a.url and not any(abs(b - a.floor) < 1e-9 for b in a.budgets):
        raise SystemExit(f"bench_serve_load: --load-aware-levels pareto needs the floor's accuracy: --budgets "
                         f"{a.budgets} must include --floor {a.floor} (or give --load-aware-levels grid)")  # fmt: skip
    a.capacity_concurrency = a.capacity_concurrency or 2 * a.max_batch_size
    try:
        variants_with_floor(a.floor)
        step_phases(1.0, a.step_phase_s, a.step_base)
    except ValueError as e:
        raise SystemExit(f"bench_serve_load: {e}") from None
    if a.url and not (a.variant and a.capacities):
        raise SystemExit("bench_serve_load: --url needs --variant (what that server runs) and --capacities (its C(b))")
    if a.url and 1.0 not in _pairs(a.capacities, "--capacities"):
        raise SystemExit("bench_serve_load: --capacities must give 1.0=<req/s> (loads are multiples of C(1.0))")
    preset = a.preset or preset_name(a.model)
    bench = Bench(a)
    run = {"config": {**{k: v for k, v in vars(a).items() if k != "client_worker"}, "model_resolved": bench.model,
                      "preset": preset, "variants_def": bench.variants_def},
           "machine": {"cpu_count": os.cpu_count(), "server_cores": a.server_cores, "client_cores": a.client_cores,
                       "note": "CPU only; shared with other jobs: read loadavg beside each figure",
                       "loadavg_start": os.getloadavg()}}  # fmt: skip
    t_start = time.time()
    try:
        if not a.url:
            bench.start_server()
        run.update(measure(bench, a))
    finally:
        if not a.url:
            bench.stop_server()
        shutil.rmtree(bench.tmp, ignore_errors=True)  # the bundled questions, request bodies, client records
    run["config"]["unsupported_by_this_server"] = bench.unsupported
    run["config"]["server"] = ("external (--url)" if a.url else
                               "local: serve.app.build_app; keys this serve/ lacks are listed in "
                               "unsupported_by_this_server and were not passed")  # fmt: skip
    run["wall_s"] = time.time() - t_start
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.is_file() else None
    doc = merge_results(existing, preset, run)
    out.write_text(json.dumps(doc, indent=1))
    png = plot_path(out, preset)
    plot(run, png)
    print_table(run)
    print(f"headline: {json.dumps(doc['headline'])}")
    print(f"wrote {out} and {png}")
    return 0


def measure(bench: Bench, a) -> dict:
    res = {"capacities": {}, "cells": {}, "step": None}
    if a.url:
        caps, accs = _pairs(a.capacities, "--capacities"), _pairs(a.accuracies, "--accuracies")
        res["capacities"] = {str(b): {"budget": b, "rps": c, "accuracy": accs.get(b), "given": True}
                             for b, c in caps.items()}  # fmt: skip
        variants = [a.variant]
    else:
        for b in sorted(a.budgets, reverse=True):
            c = bench.capacity(b)
            res["capacities"][str(b)] = c
            unstable = "" if c["stable"] else ": NOT STABLE, lengthen --capacity-s"
            print(f"capacity at budget {b:.2f}: {c['rps']:.2f} req/s (halves {c['rps_first_half']:.2f} / "
                  f"{c['rps_second_half']:.2f}{unstable}), accuracy {c['accuracy']}, load avg "
                  f"{c['loadavg_end'][0]:.2f}", flush=True)  # fmt: skip
        variants = a.variants
    caps = {float(k): v["rps"] for k, v in res["capacities"].items()}
    accs = {float(k): v["accuracy"] for k, v in res["capacities"].items() if v.get("accuracy") is not None}
    c_full = caps[1.0]
    if not c_full > 0:
        raise SystemExit(f"bench_serve_load: full-budget capacity is {c_full} req/s (the server answered nothing: "
                         f"{res['capacities']['1.0'].get('errors')} errors); no load multiples can be set")  # fmt: skip
    if not a.url:
        res["load_aware_levels"] = choose_load_aware_levels(bench.variants_def["load_aware"], accs,
                                                            a.load_aware_levels)  # fmt: skip
        print(f"load_aware picks from: {res['load_aware_levels']['note']}", flush=True)
    res["feasibility"] = {}
    if len(accs) == len(caps):
        for load in a.loads:
            fb = feasibility_bound(caps, accs, load * c_full)
            res["feasibility"][str(load)] = fb
            print(f"feasibility bound at {load}x ({load * c_full:.1f} req/s): effective accuracy <= "
                  f"{fb['effective_accuracy']:.3f} (best static {fb['best_static']:.3f}, ratio "
                  f"{fb['ratio_to_best_static'] or float('nan'):.2f}; mix {fb['mix']})", flush=True)  # fmt: skip
    else:
        res["feasibility"] = {"note": "accuracy per budget unknown (give --accuracies with --url): no bound"}
    reps: dict = {v: {str(float(x)): [] for x in a.loads} for v in variants}
    for rep in range(a.repeats):
        order = [(v, x) for v in variants for x in a.loads]
        random.Random(a.seed * 7919 + rep).shuffle(order)
        for v, load in order:
            if not a.url:
                bench.deploy(v)
            rate = load * c_full
            load_before = os.getloadavg()
            recs, _ = bench.open_cell([(a.warmup_s + a.cell_s, rate)], cell_seed(a.seed, v, load, rep))
            counted = [r for r in recs if r["t_sched"] >= a.warmup_s]
            s = summarize_cell(counted, a.slo_ms, a.cell_s)
            if not a.url:
                s["engine"] = bench.engine_counters()
            lag99 = s["client_lag_ms"]["p99"]
            s.update({"repeat": rep, "rate_rps": rate, "loadavg": os.getloadavg(), "loadavg_before": load_before,
                      # the client fell behind its schedule by more than a tenth of the SLO: latencies stay honest
                      # (timed from the schedule) but the offered process was not quite Poisson; say so
                      "client_lagged": lag99 is not None and lag99 > 0.1 * a.slo_ms,
                      "codes_seen": sorted({str(r.get("code")) for r in counted if r["status"] != 200})})  # fmt: skip
            reps[v][str(float(load))].append(s)
            if a.records:
                with open(a.records, "a") as f:
                    for r in counted:
                        f.write(json.dumps({"variant": v, "load": load, "repeat": rep, **r}) + "\n")
            print(f"  rep {rep} {v:11s} {load:>4}x  offered {s['offered']:4d} served {s['served']:4d} refused "
                  f"{s['refused']:4d} unans {s['unanswered']:3d}  p95 {_f(s['p95_ms'], 0)}  "
                  f"SLO {_f(s['slo_attainment'])}"
                  f"  budget {_f(s['mean_budget'], 2)}  eff.acc {_f(s['effective_accuracy'])}  lag p99 "
                  f"{_f(s['client_lag_ms']['p99'], 1)} ms{' (client lagged)' if s['client_lagged'] else ''}  load "
                  f"{s['loadavg'][0]:.2f}"
                  + (f"  held {s['engine']['held']}" if s.get("engine") else ""), flush=True)  # fmt: skip
    for v, by in reps.items():
        res["cells"][v] = {x: {"repeats": rs, "spread": aggregate(rs)} for x, rs in by.items()}
    res["superserve"] = {}
    for load in a.loads:
        key = str(float(load))

        def pt(v):
            sp = res["cells"].get(v, {}).get(key, {}).get("spread", {})
            return {"slo_attainment": sp.get("slo_attainment", {}).get("median"),
                    "accuracy_served": sp.get("accuracy_served", {}).get("median")}  # fmt: skip

        if "load_aware" in res["cells"]:
            res["superserve"][key] = superserve_figures(pt("load_aware"), [pt(v) for v in STATIC if v in res["cells"]])
    recovery = "not run"
    if a.step_phase_s > 0 and not a.url:
        bench.deploy("load_aware", max_replicas=a.step_max_replicas or a.replicas)
        ph = a.step_phase_s
        phases = step_phases(c_full, ph, a.step_base)
        recs, _ = bench.open_cell(phases, a.seed + 424242)
        rows = per_second(recs, 3.5 * ph)
        ceiling = bench.variants_def["load_aware"]["ceiling"]
        recovery = recovery_time(rows, 2 * ph, ceiling)
        exercised = any(r["mean_budget"] is not None and r["mean_budget"] < ceiling - 0.05
                        for r in rows if ph <= r["t"] < 2 * ph)  # fmt: skip
        windows = {"1x_before": (0, ph), "2x": (ph, 2 * ph), "1x_after": (2 * ph, 3.5 * ph),
                   "1x_after_from_10s": (2 * ph + 10, 3.5 * ph)}
        shares = {}
        for name, (lo, hi) in windows.items():
            share, n = full_share(rows, lo, hi, ceiling)
            shares[name] = {"share": share, "seconds_with_answers": n}
        res["step"] = {"base": a.step_base, "phases": phases, "per_second": rows, "recovery_s": recovery,
                       "loadavg": os.getloadavg(), "budgets_fell_in_2x": exercised, "full_budget_share": shares,
                       "engine": bench.engine_counters(),
                       "definition": "per-second mean budget of served answers (by scheduled arrival) >= ceiling - "
                                     "0.05 from then on"}  # fmt: skip
        low, high = f"{a.step_base:g}x", f"{2 * a.step_base:g}x"
        print(f"step {low} -> {high} -> {low}: budgets back to full {recovery if recovery is not None else 'never'} s "
              f"after the drop (target 10 s)", flush=True)  # fmt: skip
        print("  seconds at full budget (mean budget >= ceiling - 0.05, of seconds with answers): "
              + ", ".join(f"{k} {_f(v['share'], 2)} of {v['seconds_with_answers']}" for k, v in shares.items()),
              flush=True)  # fmt: skip
    se = None
    fq = res["cells"].get("full_queue", {}).get("0.5", {}).get("spread", {})
    p = fq.get("effective_accuracy", {}).get("median")
    n = statistics.fmean(r["offered"] for r in res["cells"]["full_queue"]["0.5"]["repeats"]) if fq else None
    if p is not None and n:
        se = math.sqrt(p * (1 - p) / n)
    res["targets"] = evaluate_targets(res["cells"], a.slo_ms, recovery, se,
                                      step_exercised=res["step"] is None or res["step"]["budgets_fell_in_2x"],
                                      step_base=a.step_base)  # fmt: skip
    return res


def step_phases(c_full: float, phase_s: float, base: float = 1.0) -> list[tuple[float, float]]:
    """The step run's (seconds, req/s) phases: base x C(1.0), twice that, then base x C(1.0) again for 1.5 phases.
    base 1.0 is the issue's 1x -> 2x -> 1x; base policy.target_utilization (0.8) is the load the autoscaler sizes a
    replica for, where a recovery shows apart from the Poisson bursts of a replica run at its full capacity."""
    if not (isinstance(base, (int, float)) and base > 0):
        raise ValueError(f"--step-base must be > 0 (a multiple of C(1.0)), got {base!r}")
    return [(phase_s, base * c_full), (phase_s, 2 * base * c_full), (1.5 * phase_s, base * c_full)]


def _f(x, nd=3):
    return "   -" if x is None else f"{x:.{nd}f}"


def print_table(run):
    slo = run["config"]["slo_ms"]
    print(f"\n{run['config']['preset']} ({run['config']['model_resolved']}), SLO {slo:.0f} ms, C(b): " +
          ", ".join(f"{b}: {c['rps']:.2f} req/s" for b, c in run["capacities"].items()))  # fmt: skip
    hdr = (f"{'variant':11s} {'load':>4s} {'offered/s':>9s} {'served/s':>8s} {'429':>5s} {'p50':>6s} {'p95':>6s} "
           f"{'p99':>6s} {'SLO':>5s} {'budget':>6s} {'acc':>5s} {'eff.acc min / median / max':>22s} {'lag p99':>7s} "
           f"{'loadavg':>7s}")
    print(hdr + "   (ms; medians over repeats; lag p99 = the client's worst repeat, ms)")
    for v, by in run["cells"].items():
        for x, c in by.items():
            sp = c["spread"]

            def m(k, nd=0):
                return _f(sp[k]["median"], nd)

            ea = sp["effective_accuracy"]
            lav = statistics.fmean(r["loadavg"][0] for r in c["repeats"])
            lags = [r["client_lag_ms"]["p99"] for r in c["repeats"] if r["client_lag_ms"]["p99"] is not None]
            print(f"{v:11s} {float(x):>4.1f} {m('offered_rps', 1):>9s} {m('served_rps', 1):>8s} {m('refused'):>5s} "
                  f"{m('p50_ms'):>6s} {m('p95_ms'):>6s} {m('p99_ms'):>6s} {m('slo_attainment', 2):>5s} "
                  f"{m('mean_budget', 2):>6s} {m('accuracy_served', 2):>5s} "
                  f"{_f(ea['min']):>6s} {_f(ea['median']):>6s} {_f(ea['max']):>6s}   "
                  f"{_f(max(lags, default=None), 0):>7s} "
                  f"{lav:>7.2f}")  # fmt: skip
    for load, f in run.get("superserve", {}).items():
        print(f"SuperServe at {load}x: accuracy at equal SLO attainment {_f(f['accuracy_at_equal_slo_attainment'])}, "
              f"SLO attainment at equal accuracy {_f(f['slo_attainment_at_equal_accuracy'], 2)}x")
    for t in run["targets"]:
        state = {True: "met", False: "MISSED", None: "undecided"}[t["met"]]
        vals = {k: v for k, v in t.items() if k not in ("target", "met", "static")}
        print(f"target: {t['target']}: {state} {json.dumps(vals, default=lambda o: round(o, 3))}")


def plot(run, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    for v, by in run["cells"].items():
        xs = sorted(by, key=float)
        for i, (key, label) in enumerate((("effective_accuracy", "effective accuracy"),
                                          ("p95_ms", "p95 of admitted (ms)"))):  # fmt: skip
            med = [by[x]["spread"][key]["median"] for x in xs]
            lo = [by[x]["spread"][key]["min"] for x in xs]
            hi = [by[x]["spread"][key]["max"] for x in xs]
            pts = [(float(x), m, l_, h) for x, m, l_, h in zip(xs, med, lo, hi) if m is not None]
            if pts:
                X, M, L, H = zip(*pts)
                ax[i].errorbar(X, M, yerr=[[m - l_ for m, l_ in zip(M, L)], [h - m for m, h in zip(M, H)]],
                               fmt="o-", capsize=3, label=v)  # fmt: skip
            ax[i].set(xlabel="load (x full-budget capacity C(1.0))", ylabel=label)
    for load, fb in run.get("feasibility", {}).items():
        if isinstance(fb, dict) and "effective_accuracy" in fb:
            ax[0].plot([float(load)], [fb["effective_accuracy"]], "k_", ms=14)
    ax[0].set_title("effective accuracy (min/median/max; - = feasibility bound)", fontsize=9)
    ax[1].axhline(run["config"]["slo_ms"], ls="--", c="k", lw=0.8)
    ax[1].set_yscale("log")
    ax[0].legend(fontsize=7)
    step = run.get("step")
    if step:
        rows = [r for r in step["per_second"] if r["mean_budget"] is not None]
        ax[2].plot([r["t"] for r in rows], [r["mean_budget"] for r in rows], "o-", ms=3, label="mean budget")
        ax2 = ax[2].twinx()
        ax2.bar([r["t"] for r in step["per_second"]], [r["refused_429"] for r in step["per_second"]], color="r",
                alpha=0.3, label="429/s")  # fmt: skip
        ax2.set_ylabel("429 per second")
        ph = step["phases"][0][0]
        for t in (ph, 2 * ph):
            ax[2].axvline(t, ls=":", c="k")
        ax[2].set(xlabel="time (s): 1x -> 2x -> 1x", ylabel="budget",
                  title=f"step run (recovery {step['recovery_s']} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
