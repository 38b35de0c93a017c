"""serve/policy.py as pure functions (monotone, hysteresis, caps, floor -> 429) and serve/protocol.py validation.
No Ray, no model: milliseconds."""

import asyncio
import base64
import io

import pytest
from PIL import Image

from serve.policy import (
    BudgetController, LatencyProfile, PolicyConfig, apply_caps, batch_ms, budget_for_latency, budget_for_load, levels,
    predicted_batch_ms, predicted_latency_ms, retry_after_s, slowdown_factor, update_slowdown,
)  # fmt: skip
from serve.protocol import APIError, Limits, check_image_url, decode_data_url, host_allowed, parse_request, validate_request

GRID = [0.5, 0.625, 0.75, 0.875, 1.0]


def profile(noisy=False):
    # batch of 8 costs about 2x a batch of 1; budget 0.5 about half of 1.0 (the tiny model's measured shape)
    dec1 = [1.5, 1.8, 2.0, 2.6, 2.8]
    if noisy:
        dec1 = [1.5, 1.9, 1.7, 2.6, 2.5]  # not monotone in budget: the profile must repair it
    return LatencyProfile(GRID, 8, [5, 6, 7, 8, 9], [12, 14, 18, 19, 24], dec1, [1.8, 2.5, 3.1, 4.8, 4.1])


CFG = PolicyConfig(floor=0.5, ceiling=1.0, slo_ms=400, tokens=32, smoothing_s=1.0, hysteresis=0.25)


def test_profile_is_made_monotone_in_budget():
    p = profile(noisy=True)
    for name in ("decode_ms_1", "decode_ms_b", "prefill_ms_b"):
        vals = getattr(p, name)
        assert vals == sorted(vals), name
    lat = [predicted_latency_ms(p, b, 20, 32) for b in GRID]
    assert lat == sorted(lat)


@pytest.mark.parametrize("noisy", [False, True])
def test_budget_for_load_is_monotone_and_spans_floor_to_ceiling(noisy):
    p = profile(noisy)
    loads = [0.5 * i for i in range(0, 200)]
    chosen = [budget_for_load(x, p, CFG) for x in loads]
    assert all(a >= b for a, b in zip(chosen, chosen[1:])), "more load must never give a higher budget"
    assert chosen[0] == 1.0 and chosen[-1] == 0.5
    assert len(set(chosen)) >= 3  # it really grades, not a switch
    assert set(chosen) <= set(GRID)


def test_predicted_latency_grows_with_load():
    p = profile()
    for b in GRID:
        lat = [predicted_latency_ms(p, b, x, 32) for x in range(0, 60)]
        assert all(x <= y for x, y in zip(lat, lat[1:]))


def test_floor_and_ceiling_bound_the_choice():
    p = profile()
    cfg = PolicyConfig(floor=0.625, ceiling=0.875, slo_ms=400)
    assert levels(p, cfg) == [0.625, 0.75, 0.875]
    assert budget_for_load(0, p, cfg) == 0.875
    assert budget_for_load(1000, p, cfg) == 0.625
    static = PolicyConfig(floor=1.0, ceiling=1.0, slo_ms=400)
    assert {budget_for_load(x, p, static) for x in (0, 10, 1000)} == {1.0}


def test_policy_config_rejects_bad_ranges():
    with pytest.raises(ValueError, match="floor <= ceiling"):
        PolicyConfig(floor=0.9, ceiling=0.6).check((0.5, 1.0))
    with pytest.raises(ValueError, match="floor <= ceiling"):
        PolicyConfig(floor=0.3).check((0.5, 1.0))
    with pytest.raises(ValueError, match="slo_ms"):
        PolicyConfig(slo_ms=0).check((0.5, 1.0))


def test_floor_that_cannot_keep_up_rejects_with_retry_after():
    p = profile()
    assert retry_after_s(1, p, CFG) is None
    # find the first load the floor cannot serve within the SLO
    over = next(x for x in range(1, 1000) if predicted_latency_ms(p, 0.5, x, CFG.tokens) > CFG.slo_ms)
    assert retry_after_s(over - 1, p, CFG) is None
    r = retry_after_s(over, p, CFG)
    assert isinstance(r, int) and r >= 1
    assert retry_after_s(10 * over, p, CFG) > r  # a longer queue asks clients to wait longer
    queueing = PolicyConfig(**{**CFG.__dict__, "reject": False})
    assert retry_after_s(10 * over, p, queueing) is None
    # while the floor still meets the SLO the server degrades instead of rejecting
    assert budget_for_load(over - 1, p, CFG) == 0.5


def test_caps_never_raise_the_budget():
    assert apply_caps(1.0, 0.6) == 0.6
    assert apply_caps(0.625, 0.9) == 0.625
    assert apply_caps(0.875, None, 0.75) == 0.75
    assert apply_caps(0.875, 0.8, 0.5) == 0.5
    assert apply_caps(0.75) == 0.75


def test_latency_target_maps_to_the_largest_budget_that_meets_it():
    p = profile()
    tight = predicted_latency_ms(p, 0.625, 1, 32) + 0.01
    assert budget_for_latency(tight, 1, p, CFG) == 0.625
    assert budget_for_latency(1e9, 1, p, CFG) == 1.0
    assert budget_for_latency(0.001, 1, p, CFG) == 0.5  # unreachable target: the floor (best effort)
    # the same target under more load buys less compute
    assert budget_for_latency(tight * 3, 40, p, CFG) <= budget_for_latency(tight * 3, 1, p, CFG)


def test_controller_smooths_a_spike_and_holds_inside_the_hysteresis_band():
    p = profile()
    c = BudgetController(p, CFG)
    c.observe(1, 0.0)
    assert c.decide() == 1.0
    c.observe(200, 0.01)  # a 10 ms spike barely moves the smoothed load
    assert c.decide() == 1.0
    t = 0.01
    for _ in range(50):  # sustained overload for 5 s: the budget falls to the floor
        t += 0.1
        c.observe(200, t)
    assert c.decide() == 0.5
    # find a load whose instantaneous choice is a middle level, and one slightly lower (inside the band)
    mid = next(x for x in range(1, 400) if budget_for_load(x, p, CFG) < 1.0)
    assert budget_for_load(mid * 0.9, p, CFG) >= budget_for_load(mid, p, CFG)
    for _ in range(100):
        t += 0.1
        c.observe(mid, t)
    held = c.decide()
    # coming up from the floor, the budget rises only to the band's level f((1 + h) * L), below f(L) here
    assert held == budget_for_load(mid * (1 + CFG.hysteresis), p, CFG) < budget_for_load(mid, p, CFG)
    # small wiggles around this load do not move the budget up and down
    seen = set()
    for i in range(100):
        t += 0.1
        c.observe(mid * (0.92 if i % 2 else 1.0), t)
        seen.add(c.decide())
    assert len(seen) == 1
    for _ in range(100):  # the load goes away: the budget comes back to the ceiling
        t += 0.1
        c.observe(0.5, t)
    assert c.decide() == 1.0


def test_controller_without_hysteresis_would_flap_where_ours_does_not():
    p = profile()
    edge = next(x / 10 for x in range(10, 4000) if budget_for_load(x / 10, p, CFG) < 1.0)
    loads = [edge * 1.02, edge * 0.98] * 30
    flap = [budget_for_load(x, p, CFG) for x in loads]
    assert len(set(flap)) == 2  # the bare policy flips at the threshold
    c = BudgetController(p, PolicyConfig(**{**CFG.__dict__, "smoothing_s": 0.01}))  # no smoothing: hysteresis only
    out = []
    for i, x in enumerate(loads):
        c.observe(x, i * 1.0)
        out.append(c.decide())
    assert len(set(out[1:])) == 1


def test_controller_is_monotone_in_load_from_the_same_state():
    p = profile()
    for start in (1, 20, 60):
        res = []
        for x in range(0, 200, 5):
            c = BudgetController(p, CFG)
            c.observe(start, 0.0)
            c.decide()
            c.observe(x, 10.0)
            res.append(c.decide())
        assert all(a >= b for a, b in zip(res, res[1:]))


# ---------------------------------------------------------------------------------------------------------- slowdown


def test_slowdown_factor_converges_to_a_steady_ratio():
    for ratio in (3.0, 0.7, 1.0):
        window = []
        seen = [update_slowdown(window, ratio * 100.0, 100.0, CFG) for _ in range(3 * CFG.slowdown_window)]
        assert seen[-1] == pytest.approx(ratio)
        assert len(window) == CFG.slowdown_window  # a sliding window, not an ever-growing history
        # it gets there monotonically from the start (no overshoot)
        assert all(abs(a - ratio) >= abs(b - ratio) - 1e-12 for a, b in zip(seen, seen[1:]))


def test_slowdown_factor_is_bounded_and_ignores_non_measurements():
    window = []
    for r in (1e6, 1e6, 1e6, 1e6, 1e6, 1e6, 1e6, 1e6, 1e6):
        f = update_slowdown(window, r, 1.0, CFG)
    assert f == CFG.slowdown_max and max(window) == CFG.slowdown_max
    for _ in range(20):
        f = update_slowdown(window, 1e-6, 1.0, CFG)
    assert f == CFG.slowdown_min
    before = list(window)
    for measured, predicted in ((0.0, 10.0), (10.0, 0.0), (float("nan"), 10.0), (float("inf"), 10.0), (-5, 10)):
        assert update_slowdown(window, measured, predicted, CFG) == CFG.slowdown_min
    assert window == before
    assert slowdown_factor([], CFG) == 1.0  # no batch yet: trust the profile


def test_one_slow_batch_cannot_move_the_factor_or_collapse_budgets():
    p = profile()
    c = BudgetController(p, CFG)
    for _ in range(CFG.slowdown_window):
        c.observe_batch(batch_ms(p, 1.0, 1, 8), [([1.0], 8)])  # exactly as profiled
    assert c.slowdown == pytest.approx(1.0)
    c.observe(1, 0.0)
    assert c.decide() == 1.0
    c.observe_batch(1e9, [([1.0], 8)])  # a 10^9 ms hiccup
    assert c.slowdown == pytest.approx(1.0)
    assert c.decide() == 1.0
    # ... but a sustained slowdown does move it, within about half a window of batches
    n = 0
    while c.slowdown < 4.0:
        c.observe_batch(4.0 * batch_ms(p, 1.0, 1, 8), [([1.0], 8)])
        n += 1
    assert n <= CFG.slowdown_window // 2 + 1


def test_slowdown_factor_is_monotone_in_the_observed_ratio():
    base = [1.2, 0.8, 2.0, 1.5]
    prev = None
    for r in [0.1, 0.5, 0.9, 1.0, 1.3, 2.5, 7.0, 20.0]:
        f = update_slowdown(list(base), r * 50.0, 50.0, CFG)
        assert prev is None or f >= prev
        prev = f


def test_policy_is_monotone_in_load_and_in_slowdown():
    p = profile()
    phis = [0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0]
    loads = [0.5 * i for i in range(0, 120)]
    table = [[budget_for_load(x, p, CFG, phi) for x in loads] for phi in phis]
    for row in table:  # in load, at each factor
        assert all(a >= b for a, b in zip(row, row[1:]))
    for col in zip(*table):  # in the factor, at each load
        assert all(a >= b for a, b in zip(col, col[1:]))
    # a slower machine lowers the budget at a load the profile alone would serve at full budget
    x = next(x for x in loads if budget_for_load(x, p, CFG, 3.0) < 1.0)
    assert budget_for_load(x, p, CFG, 1.0) == 1.0
    assert predicted_latency_ms(p, 0.75, 20, 32, 3.0) == pytest.approx(3.0 * predicted_latency_ms(p, 0.75, 20, 32))


def test_slowdown_makes_admission_refuse_earlier():
    p = profile()
    over = next(x for x in range(1, 1000) if retry_after_s(x, p, CFG) is not None)
    assert retry_after_s(over / 2, p, CFG, slowdown=3.0) is not None  # the queue already implies a miss at the floor
    assert retry_after_s(over - 1, p, CFG, slowdown=1.0) is None
    # and asks clients to wait for what the slower drain really needs
    assert retry_after_s(10 * over, p, CFG, slowdown=3.0) > retry_after_s(10 * over, p, CFG, slowdown=1.0)


def test_controller_learns_a_slowdown_and_lowers_budgets_then_recovers():
    p = profile()
    c = BudgetController(p, CFG)
    load = next(x for x in range(1, 200) if budget_for_load(x, p, CFG, 3.0) == 0.5)
    assert budget_for_load(load, p, CFG, 1.0) > 0.5
    t = 0.0
    for _ in range(20):
        t += 0.1
        c.observe(load, t)
    before = c.decide()
    assert before > 0.5
    for _ in range(CFG.slowdown_window):  # batches run 3x slower than profiled (contended cores)
        b = c.decide()
        c.observe_batch(3.0 * predicted_batch_ms(p, [b] * 8, 32), [([b] * 8, 32)])
    assert c.slowdown == pytest.approx(3.0)
    assert c.decide() == 0.5
    for _ in range(CFG.slowdown_window):  # the contention goes away: the factor and the budget come back
        b = c.decide()
        c.observe_batch(1.0 * predicted_batch_ms(p, [b] * 8, 32), [([b] * 8, 32)])
    assert c.slowdown == pytest.approx(1.0)
    assert c.decide() == before


def test_predicted_batch_cost_uses_the_largest_budget_and_sums_groups():
    p = profile()
    assert predicted_batch_ms(p, [0.5, 1.0, 0.75], 8) == batch_ms(p, 1.0, 3, 8)
    assert predicted_batch_ms(p, [], 8) == 0.0
    c = BudgetController(p, CFG)
    one = predicted_batch_ms(p, [1.0], 8) + predicted_batch_ms(p, [0.5, 0.5], 4)
    c.observe_batch(2.0 * one, [([1.0], 8), ([0.5, 0.5], 4)])
    assert c.ratios == [1.0] * (CFG.slowdown_window - 1) + [pytest.approx(2.0)] and c.batches_seen == 1


def test_a_cold_replica_trusts_its_profile_until_half_a_window_of_batches_disagrees():
    """A fresh controller starts with the window full of 1.0 (the module docstring's promise): one slow first batch
    (a warm-up or GC hiccup) moves neither the factor nor the budget at load 1; it takes more than half a window of
    slow batches."""
    p = profile()
    c = BudgetController(p, CFG)
    assert c.slowdown == 1.0 and c.ratios == [1.0] * CFG.slowdown_window
    c.observe(1, 0.0)
    assert c.decide() == 1.0
    assert c.observe_batch(1e9, [([1.0], 8)]) == 1.0  # the very first batch is 10^9 ms
    assert c.decide() == 1.0
    slow = [c.observe_batch(10.0 * batch_ms(p, 1.0, 1, 8), [([1.0], 8)]) for _ in range(CFG.slowdown_window)]
    half = CFG.slowdown_window // 2
    # counting the first one, half a window of slow batches ties the median (1 and 10 average), one more moves it
    assert slow[: half - 2] == [1.0] * (half - 2)
    assert slow[half - 2] == pytest.approx((1.0 + CFG.slowdown_max) / 2) and slow[half - 1] == CFG.slowdown_max
    assert c.decide() < 1.0


def test_slowdown_config_is_checked():
    with pytest.raises(ValueError, match="slowdown_min"):
        PolicyConfig(slowdown_min=0).check((0.5, 1.0))
    with pytest.raises(ValueError, match="slowdown_max"):
        PolicyConfig(slowdown_max=0.9).check((0.5, 1.0))
    with pytest.raises(ValueError, match="slowdown_window"):
        PolicyConfig(slowdown_window=0).check((0.5, 1.0))


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


def test_policy_config_edges_are_valid_settings_and_beyond_them_is_an_error():
    ok = [dict(floor=0.5 - 1e-9), dict(floor=0.5, ceiling=0.5), dict(floor=1.0, ceiling=1.0), dict(hysteresis=0.0),
          dict(slowdown_min=1.0), dict(slowdown_max=1.0), dict(slowdown_max=1.5), dict(slowdown_window=1)]  # fmt: skip
    for kw in ok:
        PolicyConfig(**kw).check((0.5, 1.0))
    with pytest.raises(ValueError, match="ceiling=1.5"):
        PolicyConfig(ceiling=1.5).check((0.5, 1.0))
    with pytest.raises(ValueError, match=r"policy.hysteresis must be >= 0, got -0.1"):
        PolicyConfig(hysteresis=-0.1).check((0.5, 1.0))


def test_a_batch_that_decoded_nothing_costs_its_prefill():
    p = profile()
    assert predicted_batch_ms(p, [1.0], 0) == batch_ms(p, 1.0, 1, 1) == p.prefill_ms_1[-1]


def test_a_zero_measurement_is_not_a_sample():
    window = []
    assert update_slowdown(window, 0.0, 10.0, CFG) == 1.0 and window == []


def test_retry_after_is_the_excess_in_whole_seconds():
    from dataclasses import replace

    p = profile()
    load = next(x for x in range(1, 10_000) if predicted_latency_ms(p, 0.5, x, CFG.tokens) > 5000)
    predicted = predicted_latency_ms(p, 0.5, load, CFG.tokens)
    assert retry_after_s(load, p, replace(CFG, slo_ms=predicted)) is None  # exactly at the limit: admitted
    assert retry_after_s(load, p, replace(CFG, slo_ms=predicted - 10.0)) == 1  # 10 ms over: wait a second
    assert retry_after_s(load, p, replace(CFG, slo_ms=predicted - 3000.5)) == 4  # 3000.5 ms over: 4 s


def test_every_batch_is_counted():
    p = profile()
    c = BudgetController(p, CFG)
    for _ in range(3):
        c.observe_batch(batch_ms(p, 1.0, 1, 8), [([1.0], 8)])
    assert c.batches_seen == 3


def test_load_is_an_exponential_moving_average_with_its_time_constant():
    from dataclasses import replace

    import math

    c = BudgetController(profile(), replace(CFG, smoothing_s=0.5))
    assert c.decide() == 1.0  # nothing observed yet: an idle replica, full budget
    c.observe(0, 100.0)
    assert c.observe(10, 100.5) == pytest.approx(10 * (1 - math.exp(-1)))  # one time constant later
    assert c.raw_load == 10.0


def test_the_hysteresis_band_uses_the_learned_slowdown_too():
    p = profile()
    c = BudgetController(p, CFG)
    for _ in range(CFG.slowdown_window):
        c.observe_batch(3.0 * batch_ms(p, 1.0, 1, 8), [([1.0], 8)])
    assert c.slowdown == pytest.approx(3.0)
    c.observe(1000, 0.0)
    assert c.decide() == 0.5
    load = next(x for x in range(1, 400) if budget_for_load(x, p, CFG, 3.0) > budget_for_load(1.25 * x, p, CFG, 3.0)
                and budget_for_load(1.25 * x, p, CFG, 1.0) > budget_for_load(1.25 * x, p, CFG, 3.0))  # fmt: skip
    c.observe(load, 1000.0)  # a thousand time constants later: the smoothed load is `load`
    assert c.decide() == budget_for_load(1.25 * load, p, CFG, 3.0)


def test_cost_model_by_hand():
    """batch_ms: the straight line between a batch of 1 and a full batch, prefill plus (tokens - 1) decode steps;
    predicted_latency_ms: (load / B) batches ahead when the queue holds more than one batch, never fewer than one."""
    p = LatencyProfile(budgets=[0.5, 1.0], max_batch_size=5, prefill_ms_1=[10.0, 20.0], prefill_ms_b=[30.0, 60.0],
                       decode_ms_1=[1.0, 2.0], decode_ms_b=[3.0, 6.0])  # fmt: skip
    assert batch_ms(p, 1.0, 1, 1) == 20.0 and batch_ms(p, 1.0, 1, 0) == 20.0
    assert batch_ms(p, 1.0, 1, 4) == 20.0 + 3 * 2.0
    assert batch_ms(p, 1.0, 5, 4) == 60.0 + 3 * 6.0
    assert batch_ms(p, 1.0, 3, 4) == pytest.approx(40.0 + 3 * 4.0)  # halfway between 1 and 5
    assert batch_ms(p, 0.5, 0.5, 2) == 10.0 + 1.0  # fewer than one request costs one
    assert batch_ms(p, 0.75, 9, 1) == 30.0  # a budget runs as its grid level; more than B is a full batch
    one = LatencyProfile(budgets=[1.0], max_batch_size=1, prefill_ms_1=[7.0], prefill_ms_b=[9.0], decode_ms_1=[1.0],
                         decode_ms_b=[2.0])  # fmt: skip
    assert batch_ms(one, 1.0, 1, 3) == 7.0 + 2 * 1.0  # B = 1: the batch-of-1 line
    assert predicted_latency_ms(p, 1.0, 0.5, 4) == batch_ms(p, 1.0, 1, 4)
    assert predicted_latency_ms(p, 1.0, 5, 4) == batch_ms(p, 1.0, 5, 4)
    assert predicted_latency_ms(p, 1.0, 15, 4, slowdown=2.0) == 2.0 * 3 * batch_ms(p, 1.0, 5, 4)


def test_profiles_are_checked_clipped_and_made_monotone():
    with pytest.raises(ValueError, match="non-empty ascending"):
        LatencyProfile(budgets=[1.0, 0.5], max_batch_size=2, prefill_ms_1=[1, 1], prefill_ms_b=[1, 1],
                       decode_ms_1=[1, 1], decode_ms_b=[1, 1])  # fmt: skip
    with pytest.raises(ValueError, match="non-empty ascending"):
        LatencyProfile(budgets=[], max_batch_size=2, prefill_ms_1=[], prefill_ms_b=[], decode_ms_1=[], decode_ms_b=[])
    with pytest.raises(ValueError, match="profile.decode_ms_b needs one value per budget"):
        LatencyProfile(budgets=[0.5], max_batch_size=2, prefill_ms_1=[1], prefill_ms_b=[1], decode_ms_1=[1],
                       decode_ms_b=[1, 2])  # fmt: skip
    p = LatencyProfile(budgets=[0.5, 0.75, 1.0], max_batch_size=2, prefill_ms_1=[0.5, -3.0, 0.2],
                       prefill_ms_b=[5.0, 4.0, 6.0], decode_ms_1=[1, 1, 1], decode_ms_b=[1, 1, 1])  # fmt: skip
    assert p.prefill_ms_1 == [0.5, 0.5, 0.5] and p.prefill_ms_b == [5.0, 5.0, 6.0]  # clipped at 0, then cummax
    assert [p.index(b) for b in (0.1, 0.5, 0.74, 0.75, 1.0)] == [0, 0, 0, 1, 2]


def test_slowdown_is_the_median_of_odd_and_even_windows():
    assert slowdown_factor([5.0, 1.0, 3.0, 2.0, 4.0], CFG) == 3.0
    assert slowdown_factor([1.0, 2.0, 3.0], CFG) == 2.0
    assert slowdown_factor([1.0, 2.0, 3.0, 7.0], CFG) == 2.5
