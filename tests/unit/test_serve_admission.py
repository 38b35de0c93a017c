"""Admission at the edge (serve/ingress.py) without Ray: OpenAIServer over a fake model backend that holds requests
until the test lets them go, a synthetic profile whose costs are units of seconds, and a counting image loader.
Decisions depend on counts (requests in flight), never on this machine's speed."""

import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image
from ray.serve.exceptions import BackPressureError

from serve.config import make_config
from serve.ingress import OpenAIServer, create_app

GRID = [0.5, 0.75, 1.0]
U = 100_000.0  # one cost unit: 100 s, so the milliseconds this test really takes never change a decision
PROFILE = {"budgets": GRID, "max_batch_size": 2, "prefill_ms": [b * U for b in GRID],
           "decode_ms_1": [b * U for b in GRID], "decode_ms_b": [b * U for b in GRID], "overhead_ms": 0.0}  # fmt: skip


def png():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def with_image(**extra):
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png()}},
                                                      {"type": "text", "text": "?"}]}], "max_tokens": 2, **extra}


class HeldBackend:
    """The model deployment: each request waits until `release` is set; counts what reaches it, and at most how
    many it held at once."""

    def __init__(self, replicas=1, raise_on_call=None):
        self.release = asyncio.Event()
        self.jobs, self.held, self.max_held = [], 0, 0
        self.replicas, self.raise_on_call = replicas, raise_on_call
        self.steps = 2  # engine steps per answer (2 tokens to max_tokens; one more when an EOS ends it)

    async def info(self):
        return {"budget_range": [0.5, 1.0], "max_context": 2048, "profile": PROFILE,
                "load": {"replicas": self.replicas, "contention": 1.0}}  # fmt: skip

    async def generate(self, job):
        if self.raise_on_call is not None:
            raise self.raise_on_call
        self.jobs.append(job)
        self.held += 1
        self.max_held = max(self.max_held, self.held)
        try:
            await self.release.wait()
        finally:
            self.held -= 1
        return {"type": "done", "text": "ok", "finish_reason": "length", "prompt_tokens": 3, "completion_tokens": 2,
                "adallava": {"budget": 1.0, "latency_ms": {"total": 1.0}, "deadline_ms": job.deadline_ms,
                             "engine_steps": self.steps, "load": {"replicas": self.replicas, "contention": 1.0}}}  # fmt: skip

    async def ping(self):
        return "r"


def server(backend, **cfg):
    config = make_config({"model_name": "m", "max_batch_size": 2, "max_queued_requests": 2,
                          "policy": {"slo_ms": 3.5 * U}, **cfg})  # fmt: skip
    srv = OpenAIServer(backend, config)
    decoded = []

    async def counting_loader(url, param):  # what the ingress decodes, counted
        decoded.append(param)
        return Image.new("RGB", (8, 8))

    srv._load_image = counting_loader
    return srv, decoded


async def until(predicate, attempts=500):
    """Wait on state, with a bound on attempts (each yields to the event loop)."""
    for _ in range(attempts):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("state not reached")


def run(coro):
    return asyncio.run(coro)


def test_past_the_floor_429_comes_without_decoding_the_image():
    """B = 2, SLO 3.75 units, 2 tokens each, no lengths known yet: the first request (nothing ahead of it) is predicted
    at one token, the rest at two. Behind k in flight the floor finishes at 1, 1.5, 2.5, 3, 3.5, then 4.5 units
    (serve.policy's numbers: each prefilled in turn, two rows stepping together), so with room for 8 in flight the
    sixth request is refused, and its image never decoded; once the queue drains the same request is admitted again."""

    async def main():
        backend = HeldBackend()
        srv, decoded = server(backend, max_queued_requests=6, policy={"slo_ms": 3.75 * U})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(srv)), base_url="http://t") as c:
            held = [asyncio.create_task(c.post("/v1/chat/completions", json=with_image())) for _ in range(5)]
            await until(lambda: len(backend.jobs) == 5)
            assert len(decoded) == 5
            r = await c.post("/v1/chat/completions", json=with_image())
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "overloaded" and r.json()["error"]["type"] == "rate_limit_error"
            # the excess (4.5 - 3.75 units = 75 s) in whole seconds, rounded up; the time since its arrival counts too
            # (milliseconds here, a few seconds on a machine under heavy load)
            assert 75 <= int(r.headers["retry-after"]) <= 80
            assert len(decoded) == 5 and len(backend.jobs) == 5  # refused before its image, never sent to the model
            backend.release.set()
            assert [x.status_code for x in await asyncio.gather(*held)] == [200] * 5
            r = await c.post("/v1/chat/completions", json=with_image())
            assert r.status_code == 200 and len(decoded) == 6 and srv.inflight == {}
            # every request counted as offered, the refused one included, and stamped on the jobs
            assert srv.offered == 7 and backend.jobs[-1].offered == 7

    run(main())


@pytest.mark.parametrize("quantile", [0.9, None])
@pytest.mark.parametrize("seen", [1, 16])
def test_admission_predicts_the_lengths_completions_have_had_not_max_tokens(quantile, seen):
    """SLO 3.5 units, floor 0.5, one request in flight: a max_tokens=8 request behind it predicts 1 + 0.5 + 7 x 0.5 =
    4.5 units at its worst case (refused), 1 + 0.5 = 1.5 once completions of 2 tokens have been seen (admitted): after
    one (the longest seen, before a quantile can be taken) as after 16. length_quantile None keeps the worst case."""
    from serve.policy import LENGTH_MIN_SAMPLES

    assert seen == 1 or seen == LENGTH_MIN_SAMPLES

    async def main():
        backend = HeldBackend()
        srv, decoded = server(backend, policy={"slo_ms": 3.5 * U, "length_quantile": quantile})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(srv)), base_url="http://t") as c:
            held = asyncio.create_task(c.post("/v1/chat/completions", json=with_image()))
            await until(lambda: len(backend.jobs) == 1)
            r = await c.post("/v1/chat/completions", json=with_image(max_tokens=8))
            assert r.status_code == 429 and len(decoded) == 1, r.text
            backend.release.set()  # every request now completes at once, with 2 tokens
            assert (await held).status_code == 200
            for _ in range(seen - 1):
                assert (await c.post("/v1/chat/completions", json=with_image())).status_code == 200
            assert len(srv.lengths.seen) == seen
            backend.release = asyncio.Event()  # hold again: one in flight, then the long one behind it
            held = asyncio.create_task(c.post("/v1/chat/completions", json=with_image()))
            await until(lambda: len(backend.jobs) == seen + 1)
            long = asyncio.create_task(c.post("/v1/chat/completions", json=with_image(max_tokens=8)))
            if quantile:
                await until(lambda: len(backend.jobs) == seen + 2)  # admitted, reached the model
                assert not long.done()
            else:
                assert (await long).status_code == 429
            backend.release.set()
            assert (await held).status_code == 200 and (await long).status_code == (200 if quantile else 429)
            assert srv.inflight == {}

    run(main())


def test_the_ingress_learns_the_engine_steps_an_answer_took_not_its_completion_tokens():
    """An answer ended by EOS has 2 completion tokens and took 3 engine steps (the EOS is one); the latency model
    plays engine steps, so 3 is what the edge predicts once enough answers were seen."""
    from serve.policy import LENGTH_MIN_SAMPLES

    async def main():
        backend = HeldBackend()
        backend.steps = 3
        backend.release.set()
        srv, _ = server(backend)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(srv)), base_url="http://t") as c:
            for _ in range(LENGTH_MIN_SAMPLES):
                r = await c.post("/v1/chat/completions", json=with_image(max_tokens=8))
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert srv.lengths.typical() == 3 and srv.lengths.expect(8) == 3

    run(main())


def test_in_flight_plus_queued_never_exceeds_the_bound():
    """reject=False (the full_queue variant): no prediction refuses, only the bound replicas * (B + Q) = 4."""

    async def main():
        backend = HeldBackend()
        srv, decoded = server(backend, policy={"slo_ms": 3.5 * U, "reject": False})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(srv)), base_url="http://t") as c:
            tasks = [asyncio.create_task(c.post("/v1/chat/completions", json=with_image())) for _ in range(10)]
            await until(lambda: len(backend.jobs) == 4 and sum(t.done() for t in tasks) == 6)
            refused = [t.result() for t in tasks if t.done()]
            assert all(r.status_code == 429 and r.json()["error"]["code"] == "overloaded" for r in refused)
            assert all("the bound is 4" in r.json()["error"]["message"] for r in refused)
            assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
            assert len(decoded) == 4 and len(srv.inflight) == 4
            backend.release.set()
            results = await asyncio.gather(*tasks)
            assert sorted(r.status_code for r in results) == [200] * 4 + [429] * 6
            assert backend.max_held == 4 and srv.inflight == {}

    run(main())


def test_the_bound_grows_with_the_replicas_the_responses_report():
    async def main():
        backend = HeldBackend(replicas=2)
        srv, _ = server(backend, policy={"slo_ms": 3.5 * U, "reject": False})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(srv)), base_url="http://t") as c:
            tasks = [asyncio.create_task(c.post("/v1/chat/completions", json=with_image())) for _ in range(10)]
            await until(lambda: len(backend.jobs) == 8 and sum(t.done() for t in tasks) == 2)
            backend.release.set()
            await asyncio.gather(*tasks)
            assert backend.max_held == 8

    run(main())


def test_every_serve_queue_is_bounded_and_the_handle_never_refuses_what_the_ingress_admitted():
    """Serve's own bounds as build_app sets them. Every request waits in the ingress's handle queue while Serve's
    router picks a replica, even when one has room, so a handle bound below what the ingress admits refused part of a
    burst on a busy machine (a burst of 4 with room for 4 lost one): the handle holds max_replicas x (B + Q)."""
    from serve.app import build_app

    app = build_app({"model_name": "m", "max_batch_size": 2, "max_queued_requests": 3, "max_replicas": 3})
    ingress = app._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    assert model.name == "AdaLlavaModel" and ingress.name == "Ingress"
    assert model.max_ongoing_requests == 2 + 3 + 2  # B + Q, + 2 for the info()/ping() control calls
    assert model.max_queued_requests == 3 * (2 + 3)
    assert ingress.max_ongoing_requests == ingress.max_queued_requests == 2 * 3 * (2 + 3) + 16


def test_a_latency_target_below_what_the_model_reaches_is_a_400_naming_the_range():
    async def main():
        backend = HeldBackend()
        backend.release.set()
        srv, decoded = server(backend)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(srv)), base_url="http://t") as c:
            # alone, 2 tokens: 1 unit at the floor (100000 ms), 2 units at the ceiling
            r = await c.post("/v1/chat/completions", json=with_image(latency_ms=99_999))
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "latency_ms" and err["code"] == "latency_unreachable"
            assert "achievable range is 100000 ms (budget 0.5, alone) to 200000 ms (budget 1, alone)" in err["message"]
            assert decoded == [] and backend.jobs == []
            # reachable: admitted, and it tightens the deadline (min with the SLO)
            r = await c.post("/v1/chat/completions", json=with_image(latency_ms=150_000))
            assert r.status_code == 200 and r.json()["adallava"]["deadline_ms"] == 150_000
            r = await c.post("/v1/chat/completions", json=with_image(latency_ms=3_000_000))
            assert r.status_code == 200 and r.json()["adallava"]["deadline_ms"] == 3.5 * U

    run(main())


@pytest.mark.parametrize("stream", [False, True])
def test_back_pressure_from_the_handle_is_a_429_with_retry_after(stream):
    async def main():
        backend = HeldBackend(raise_on_call=BackPressureError(num_queued_requests=2, max_queued_requests=2,
                                                              status_code=429, retry_after_s=2.5))  # fmt: skip
        if stream:
            def stream_call(job):
                async def gen():
                    raise backend.raise_on_call
                    yield  # noqa: unreachable - makes this an async generator

                return gen()

            backend.stream = stream_call
        srv, _ = server(backend)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(srv)), base_url="http://t") as c:
            r = await c.post("/v1/chat/completions", json=with_image(stream=stream))
            assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
            assert r.headers["retry-after"] == "3" and srv.inflight == {}

    run(main())


# ---------------------------------------------------------------------------------------------------------- profile cache


class FakeReplica:
    """What AdaLlavaModel's profile methods read: config, grid, torch, the model's config; measuring is counted."""

    def __init__(self, tmp_path, **cfg):
        import torch

        from serve.replica import AdaLlavaModel

        self.cfg = make_config({"profile_cache": str(tmp_path), "max_batch_size": 2, **cfg})
        self.grid, self.torch, self.measured = GRID, torch, 0
        self.model = type("M", (), {"config": type("C", (), {"to_dict": lambda _: {"layers": 4, "_name_or_path": "x"}})()})()
        cls = AdaLlavaModel.func_or_class
        self._profile_path = cls._profile_path.__get__(self)
        self.load = cls._load_profile.__get__(self)

    def _measure_profile(self):
        from serve.policy import LatencyProfile

        self.measured += 1
        return LatencyProfile.from_dict(PROFILE, source="measured")


def test_a_profile_is_measured_once_per_hardware_kind_and_then_read_from_the_cache(tmp_path):
    first = FakeReplica(tmp_path)
    assert first.load().source == "measured" and first.measured == 1
    again = FakeReplica(tmp_path)  # a replica starting later (say, under load) reuses the quiet measurement
    p = again.load()
    assert p.source == "cache" and again.measured == 0 and p.prefill_ms == PROFILE["prefill_ms"]
    other = FakeReplica(tmp_path, torch_threads=2)  # another hardware kind: its own file, measured
    assert other._profile_path() != first._profile_path() and other.load().source == "measured"
    first._profile_path().write_text("{not json")  # a damaged cache is measured again, not trusted
    assert FakeReplica(tmp_path).load().source == "measured"


def test_a_profile_in_config_is_used_as_is_and_must_match_the_model(tmp_path):
    r = FakeReplica(tmp_path, profile=PROFILE)
    assert r.load().source == "config" and r.measured == 0
    with pytest.raises(ValueError, match="must be the model's budget grid"):
        FakeReplica(tmp_path, profile={**PROFILE, "budgets": [0.5, 0.6, 1.0]}).load()
    with pytest.raises(ValueError, match="must be max_batch_size 4"):
        FakeReplica(tmp_path, profile=PROFILE, max_batch_size=4).load()
