"""policy.headroom through Ray Serve, deterministically (the unit-cost profile of test_serve_overload.py: costs in units
of 1000 s, the engine held by the test-only pause, the replica's clock moved by advance_clock): choices plan for
arrival + (1 - headroom) x the deadline. With headroom 0.5 and an SLO of 3.5 units they plan for 1.75: two 2-token
requests that would run at 1.0 and below without it get 0.625 and 0.5; a request whose real deadline the floor could
still meet but whose planned one it cannot is refused at its turn, and the message says it is the plan that it
misses."""

import concurrent.futures as cf

import pytest

from tests.integration.test_serve_overload import SLO, ask, at_its_turn_after, info, unit_cost_server, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server():
    yield from unit_cost_server("headroom", headroom=0.5)


def test_budgets_are_chosen_for_the_planned_deadline(server):
    """Two 2-token requests waiting together: without headroom the first would get 1.0 (test_serve_overload's
    numbers: it ends at 2.25 of 3.5 units); planning for 1.75 units gives 0.625 (ends at 1.69) and the second 0.5."""
    model = server["model"]
    model.pause_engine.remote(True).result()
    with cf.ThreadPoolExecutor(2) as ex:
        try:
            both = [ex.submit(ask, server["url"]) for _ in range(2)]
            wait_for(server, lambda s: s["load"]["waiting"] == 2)
            model.pause_engine.remote(False).result()
            results = [f.result() for f in both]
        finally:
            model.pause_engine.remote(False).result()
    assert [s for s, _, _ in results] == [200, 200], results
    assert sorted(b["adallava"]["budget"] for _, b, _ in results) == [0.5, 0.625]
    assert all(b["adallava"]["deadline_ms"] == SLO for _, b, _ in results)  # the real deadline, as the client's


def test_a_request_that_can_meet_only_its_real_deadline_is_refused_at_its_turn(server):
    """Alone (one token predicted while no lengths are known), the floor's prefill takes 0.5 units. With the clock
    moved 1.5 units on, 2 units are left before its real deadline but 0.25 before the planned one: refused, not run."""
    before = info(server)["joined"]
    status, body, headers = at_its_turn_after(server, 1.5)
    assert status == 429 and body["error"]["code"] == "deadline_exceeded", body
    message = body["error"]["message"]
    assert "after the 1750000 ms it plans for (its 3500000 ms deadline less the headroom 0.5)" in message
    assert int(headers["retry-after"]) >= 250 and info(server)["joined"] == before
