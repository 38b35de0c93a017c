"""Overload through Ray Serve, deterministically: one replica of the tiny model with a latency profile given in config
whose costs are units of 1000 s (the real model answers in milliseconds, and the tightest decision here moves only
after 125 s of real time, so decisions depend on counts, never on this machine's speed or load), the engine held by the test-only pause (fault_injection) while requests queue, and the replica's
deadline clock moved by the test-only advance_clock. Checked: a fresh replica serves at full budget; a burst lowers
budgets before any 429; past the bound a 429 + Retry-After comes from the ingress without touching the model; an expired
request is refused at its turn, never computed; requests still in preprocessing count behind the one that joins;
afterwards the budget is full again at once; a newcomer whose prefill would make a running row miss its deadline waits a
step."""

import concurrent.futures as cf
import socket

import pytest

pytestmark = pytest.mark.integration

GRID = [0.5, 0.625, 0.75, 0.875, 1.0]
U = 1_000_000.0  # one cost unit (ms): prefill(b) = one decode step(b) = b units, whatever the batch
PROFILE = {"budgets": GRID, "max_batch_size": 2, "prefill_ms": [b * U for b in GRID],
           "decode_ms_1": [b * U for b in GRID], "decode_ms_b": [b * U for b in GRID], "overhead_ms": 0.0}  # fmt: skip
SLO = 3.5 * U


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unit_cost_server(app_name: str, **policy):
    """A local Ray + Serve with one replica of the tiny model on the unit-cost profile (B = 2, 2 queued, SLO 3.5
    units, floor 0.5, 2 tokens), the test hooks on and `policy` on top; yields its URL and the model's handle."""
    import ray
    from ray import serve

    from serve.app import build_app

    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model_name": "adallava-test", "max_batch_size": 2, "max_queued_requests": 2, "min_replicas": 1,
            "max_replicas": 1, "fault_injection": True, "profile": PROFILE,
            "policy": {"slo_ms": SLO, "floor": 0.5, "ceiling": 1.0, "reject": True, "tokens": 2, **policy},
            "limits": {"default_max_tokens": 2}}  # fmt: skip
    serve.run(build_app(args), name=app_name, route_prefix="/")
    try:
        yield {"url": f"http://127.0.0.1:{port}", "model": serve.get_deployment_handle("AdaLlavaModel",
                                                                                     app_name=app_name)}  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def server():
    yield from unit_cost_server("overload")


@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(base_url=server["url"], timeout=120) as c:
        yield c


def ask(url):
    import httpx

    with httpx.Client(base_url=url, timeout=600) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Describe it"}],
                                                 "max_tokens": 2})  # fmt: skip
        return r.status_code, r.json(), r.headers


def info(server):
    return server["model"].info.remote().result()


def wait_for(server, predicate, attempts=600):
    """Polls the replica's state until predicate(info) holds; a bounded number of polls."""
    import time

    for _ in range(attempts):
        state = info(server)
        if predicate(state):
            return state
        time.sleep(0.1)
    raise AssertionError(f"state not reached: {info(server)}")


def test_a_fresh_replica_serves_at_full_budget(server, http):
    status, body, _ = ask(server["url"])
    assert status == 200, body
    ada = body["adallava"]
    assert ada["budget"] == 1.0 and ada["budget_server"] == 1.0 and ada["deadline_ms"] == SLO
    assert set(ada["latency_ms"]) >= {"total", "queue", "prefill", "decode", "server", "predicted"}
    # the join predicted it on time: within its deadline, and no sooner than the profile's prefill at 1.0 (one unit)
    assert U <= ada["latency_ms"]["predicted"] <= SLO
    assert ada["latency_ms"]["later_prefills"] == 0  # alone: no other prefill ran between its own and its finish
    state = info(server)
    assert state["profile"]["source"] == "config" and state["contention"] == 1.0
    # the engine thread's own account: it stepped, and its busy time holds its steps and its joins
    thread = state["engine_thread_s"]
    assert thread["step"] > 0 and thread["join"] >= 0 and thread["busy"] >= thread["step"] + thread["join"] - 0.002


def test_a_burst_lowers_budgets_before_any_429_and_past_the_bound_429_comes_from_the_edge(server):
    """B = 2, 2 queued, 4 requests of 2 tokens due at 3.5 units, held until all four wait. The first two to take a row
    get 0.75 and 0.5 (serve.policy: the two behind them must still make 3.5 units), the last two, with nobody
    behind, full budget (0.75 stays the choice while less than 0.125 units, 125 s, pass between the burst's arrival
    and its join). A fifth request while four are in flight: 429 at the ingress, the model never sees it."""
    model = server["model"]
    before = info(server)["joined"]
    model.pause_engine.remote(True).result()
    with cf.ThreadPoolExecutor(4) as ex:
        try:  # inside the executor: a failure releases the engine before the executor waits for the burst
            burst = [ex.submit(ask, server["url"]) for _ in range(4)]
            wait_for(server, lambda s: s["load"]["waiting"] == 4)
            status, body, headers = ask(server["url"])
            assert status == 429 and body["error"]["code"] == "overloaded", body
            assert body["error"]["type"] == "rate_limit_error" and int(headers["retry-after"]) >= 1
            state = info(server)
            assert state["load"]["waiting"] == 4 and state["joined"] == before  # nothing reached the engine
            model.pause_engine.remote(False).result()
            results = [f.result() for f in burst]
        finally:
            model.pause_engine.remote(False).result()
    assert [s for s, _, _ in results] == [200] * 4, results
    assert sorted(b["adallava"]["budget"] for _, b, _ in results) == [0.5, 0.75, 1.0, 1.0]
    assert all(b["adallava"]["latency_ms"]["later_prefills"] >= 0 for _, b, _ in results)
    assert info(server)["joined"] == before + 4


def test_requests_still_in_preprocessing_count_behind_the_one_that_joins(server):
    """A waits for a row while three more are admitted but still in preprocessing (held by the test hook; four in
    flight is the edge's bound). B = 2, 2-token requests due at 3.5 units: alone (or with one or two behind) A would
    run at 1.0; with three behind it at the floor the edge admitted them at, 0.75 is the highest budget that still lets
    the last of them finish by 3.5 units, so A gets 0.75 (serve.policy.choose_budget)."""
    model = server["model"]
    model.pause_engine.remote(True).result()
    held = False
    with cf.ThreadPoolExecutor(4) as ex:
        try:
            first = ex.submit(ask, server["url"])
            wait_for(server, lambda s: s["load"]["waiting"] == 1)
            model.hold_preprocessing.remote(True).result()
            held = True
            rest = [ex.submit(ask, server["url"]) for _ in range(3)]
            wait_for(server, lambda s: s["preparing"] == 3)
            model.pause_engine.remote(False).result()
            status, body, _ = first.result()
            assert info(server)["preparing"] == 3  # A was answered while the three were still held
            model.hold_preprocessing.remote(False).result()
            held = False
            others = [f.result() for f in rest]
        finally:
            model.pause_engine.remote(False).result()
            if held:
                model.hold_preprocessing.remote(False).result()
    assert status == 200 and body["adallava"]["budget"] == 0.75, body
    assert [s for s, _, _ in others] == [200] * 3, others


def at_its_turn_after(server, units: float):
    """One request, admitted and queued while the engine is paused; the replica's clock moves `units` on before the
    engine takes it. Its (status, body, headers); the clock is moved back."""
    model = server["model"]
    model.pause_engine.remote(True).result()
    moved = False
    with cf.ThreadPoolExecutor(1) as ex:
        try:  # inside the executor: a failure releases the engine before the executor waits for the request
            late = ex.submit(ask, server["url"])
            wait_for(server, lambda s: s["load"]["waiting"] == 1)
            model.advance_clock.remote(units * U / 1000).result()
            moved = True
            model.pause_engine.remote(False).result()
            return late.result()
        finally:
            model.pause_engine.remote(False).result()
            if moved:
                model.advance_clock.remote(-units * U / 1000).result()


def test_an_expired_request_is_refused_at_its_turn_not_computed(server):
    state = info(server)
    before, refused = state["joined"], state["refused_deadline"]
    # admitted (alone, the floor needs at most 1 unit of its 3.5); by its turn 0.25 units are left: the floor is late
    # even at one token (its prefill, 0.5 units), the least a request produces and what a lone request is predicted
    # at while no lengths are known
    status, body, headers = at_its_turn_after(server, 3.25)
    assert status == 429 and body["error"]["code"] == "deadline_exceeded", body
    assert int(headers["retry-after"]) >= 250  # the floor would end at least 0.25 units (250 s) after the deadline
    state = info(server)
    assert state["joined"] == before and state["refused_deadline"] == refused + 1  # never computed
    # the queue is empty again: the next request runs at full budget at once (no state survives the refusal)
    status, body, _ = ask(server["url"])
    assert status == 200 and body["adallava"]["budget"] == 1.0


def ask_by(url, latency_units):
    import httpx

    with httpx.Client(base_url=url, timeout=600) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Describe it"}],
                                                 "max_tokens": 2, "latency_ms": latency_units * U})  # fmt: skip
        return r.status_code, r.json()


def test_a_newcomer_waits_a_step_rather_than_stall_a_row_due_soon(server):
    """A (due at 2 units) and B (the SLO, 3.5) wait, then the engine runs; both join before its next step. A cannot
    take 1.0 (prefill 1 + one step 1 = 2 units, and some milliseconds have passed since it was sent): 0.875, done at
    1.75. Prefilling B at once, at any budget down to the floor, would make A late (0.875 + 0.5 + a shared step of
    0.6875 > 2), so the engine's gate (serve.policy.may_prefill) holds B back for one step; without it B would have
    been prefilled at 1.0 and A answered late. B joins once A has stepped, with the time it then has: full budget."""
    model = server["model"]
    state = info(server)
    before, held = state["joined"], state["held"]
    model.pause_engine.remote(True).result()
    with cf.ThreadPoolExecutor(2) as ex:
        try:
            a = ex.submit(ask_by, server["url"], 2.0)
            wait_for(server, lambda s: s["load"]["waiting"] == 1)
            b = ex.submit(ask_by, server["url"], 3.5)
            wait_for(server, lambda s: s["load"]["waiting"] == 2)
            model.pause_engine.remote(False).result()
            (sa, ba), (sb, bb) = a.result(), b.result()
        finally:
            model.pause_engine.remote(False).result()
    assert (sa, sb) == (200, 200), (ba, bb)
    assert ba["adallava"]["budget"] == 0.875 and bb["adallava"]["budget"] == 1.0
    state = info(server)
    assert state["held"] == held + 1 and state["joined"] == before + 2


def test_the_replica_reports_its_capacity_at_full_budget_to_the_autoscaler(server):
    stats = server["model"].record_autoscaling_stats.remote().result()
    # 1000 / (overhead 0 + prefill 1 unit + (2 - 1) * step 1 unit / 2 rows), at policy.target_utilization 0.8
    assert stats["capacity_rps"] == pytest.approx(0.8 * 1000 / (1.5 * U))
    assert set(stats) == {"offered_rps", "capacity_rps"}

