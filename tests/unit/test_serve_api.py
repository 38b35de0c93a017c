"""The HTTP edge without Ray: serve.ingress's app over a fake model backend. Hostile and unsupported input is a 4xx
with an OpenAI error body (never a 5xx), API key, CORS, body limit, /health, include_usage, errors mid-stream, and
stop sequences matched across token boundaries."""

import base64
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve.config import ServeConfig, make_config
from serve.ingress import OpenAIServer, create_app
from serve.protocol import StopText


def png(size=(8, 8), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, fmt)
    return buf.getvalue()


def image_part(raw, mime="image/png"):
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(raw).decode()}}


# a replica's latency profile (serve.policy.LatencyProfile): milliseconds, far inside the default 2 s SLO
PROFILE = {"budgets": [0.5, 0.75, 1.0], "max_batch_size": 8, "prefill_ms": [5, 7, 9], "decode_ms_1": [1, 1.5, 2],
           "decode_ms_b": [2, 3, 4], "overhead_ms": 1}


def done(job, text="a b c"):
    return {"type": "done", "text": text, "finish_reason": "length", "prompt_tokens": 7, "completion_tokens": 3,
            "adallava": {"budget": 1.0, "latency_ms": {"total": 1.0}, "engine_steps": 3}}  # fmt: skip


class FakeBackend:
    """The model deployment's four coroutines; `stream_script` lists the events after "admitted" (an Exception
    instance in it is raised there)."""

    def __init__(self, stream_script=None, ping=None):
        self.jobs = []
        self.stream_script = stream_script
        self.ping_impl = ping

    async def info(self):
        return {"budget_range": [0.5, 1.0], "max_context": 2048, "profile": PROFILE, "load": {"replicas": 1}}

    async def generate(self, job):
        self.jobs.append(job)
        return done(job)

    def stream(self, job):
        self.jobs.append(job)
        script = self.stream_script or [{"type": "delta", "text": "a b"}, {"type": "delta", "text": " c"}, done(job)]

        async def gen():
            yield {"type": "admitted"}
            for ev in script:
                if isinstance(ev, Exception):
                    raise ev
                yield ev

        return gen()

    async def ping(self):
        if self.ping_impl is not None:
            return await self.ping_impl()
        return "replica-1"


def make_client(backend=None, **cfg):
    limits = cfg.pop("limits", {})
    config = make_config({"model_name": "m", **cfg, "limits": {"max_body_bytes": 100_000,
                                                               "max_image_pixels": 1000 * 1000, **limits}})
    backend = backend or FakeBackend()
    return TestClient(create_app(OpenAIServer(backend, config))), backend


def chat(content="hi", **extra):
    return {"messages": [{"role": "user", "content": content}], **extra}


def events(text):
    return [e[len("data: "):] for e in text.split("\n\n") if e]


# ---------------------------------------------------------------------------------------------------------- hostile

DEEP = b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
HUGE_INT = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}"
SURROGATE = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
SURROGATE_PART = b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}'
SURROGATE_MODEL = b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}'
SURROGATE_STOP = b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}'
BIG = 10**400

HOSTILE = [
    ("json nested 5000 deep", DEEP, 400, "invalid_json"),
    ("integer of 5000 digits", HUGE_INT, 400, "invalid_json"),
    ("400-digit budget", chat(budget=BIG), 400, "invalid_value"),
    ("400-digit temperature", chat(temperature=BIG), 400, "invalid_value"),
    ("400-digit negative top_p", chat(top_p=-BIG), 400, "invalid_value"),
    ("400-digit latency_ms", chat(latency_ms=BIG), 400, "invalid_value"),
    ("400-digit max_tokens", chat(max_tokens=BIG), 400, "invalid_value"),
    ("400-digit seed", chat(seed=BIG), 400, "invalid_value"),
    ("400-digit n", chat(n=BIG), 400, "invalid_value"),
    ("lone surrogate in content", SURROGATE, 400, "invalid_unicode"),
    ("lone surrogate in a text part", SURROGATE_PART, 400, "invalid_unicode"),
    ("lone surrogate as model", SURROGATE_MODEL, 404, "model_not_found"),
    ("lone surrogate in stop", SURROGATE_STOP, 400, "invalid_unicode"),
    ("invalid utf-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid_json"),
    ("very wide image", chat([image_part(png((2000, 2)))]), 400, "image_aspect_ratio"),
    ("very tall image", chat([image_part(png((2, 900)))]), 400, "image_aspect_ratio"),
    ("image format not served", chat([image_part(png((8, 8), "TIFF"), "image/tiff")]), 400, "invalid_image"),
    ("thousands of messages", {"messages": [{"role": "user", "content": ""}] * 3000}, 400, "too_many_messages"),
    ("thousands of parts", chat([{"type": "text", "text": ""}] * 3000), 400, "too_many_messages"),
    ("body over the limit", chat("x" * 200_000), 413, "payload_too_large"),
    ("NaN budget", b'{"messages": [{"role": "user", "content": "hi"}], "budget": NaN}', 400, "invalid_value"),
    ("Infinity temperature", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', 400,
     "invalid_value"),
    ("body not an object", b'"hello"', 400, "invalid_json"),
    ("empty body", b"", 400, "invalid_json"),
]


@pytest.mark.parametrize("name, body, status, code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_a_4xx_with_an_openai_error_body(name, body, status, code):
    client, backend = make_client()
    kw = {"content": body} if isinstance(body, bytes) else {"content": json.dumps(body).encode()}
    r = client.post("/v1/chat/completions", headers={"content-type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    assert len(r.content) < 2000  # the client's value is never echoed whole
    assert not backend.jobs  # nothing reached the model
    assert client.post("/v1/chat/completions", json=chat()).status_code == 200  # and the next one is served


def test_a_chunked_body_is_cut_off_at_the_limit_while_reading():
    client, _ = make_client()
    sent = []

    def chunks():
        for _ in range(50):  # 50 x 10 kB, no Content-Length; the limit is 100 kB
            sent.append(1)
            yield b" " * 10_000

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("error", [MemoryError("x"), OverflowError("x"), NotImplementedError("x"), ValueError("x"),
                                   OSError("x"), SyntaxError("x"), TypeError("x"), IndexError("x")])  # fmt: skip
def test_every_pillow_error_type_is_a_400(monkeypatch, error):
    from PIL import ImageFile

    def boom(self):
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    client, _ = make_client()
    r = client.post("/v1/chat/completions", json=chat([image_part(png())]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"
    assert type(error).__name__ in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------------- semantics

UNSUPPORTED = [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"), ("logprobs", True),
    ("top_logprobs", 3), ("frequency_penalty", 0.5), ("presence_penalty", -1), ("logit_bias", {"1": 5}),
    ("response_format", {"type": "json_object"}), ("audio", {"voice": "x"}), ("modalities", ["text", "audio"]),
    ("store", True), ("reasoning_effort", "low"), ("functions", [{"name": "f"}]), ("best_of", 2), ("n", 2),
    ("service_tier", "flex"), ("web_search_options", {}), ("prediction", {"type": "content", "content": "x"}),
    ("no_such_field", 1), ("max_completion_tokens", -1),
]  # fmt: skip


@pytest.mark.parametrize("name, value", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_parameters_are_refused_by_name(name, value):
    client, _ = make_client()
    r = client.post("/v1/chat/completions", json=chat(**{name: value}))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == name and name in r.json()["error"]["message"]


@pytest.mark.parametrize("message, param", [
    ({"role": "tool", "content": "x", "tool_call_id": "1"}, "messages.0.role"),
    ({"role": "user", "content": "x", "name": "bob"}, "messages.0.name"),
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "messages.0.content.0"),
    ({"role": "user", "content": [{**image_part(png()), "image_url": {"url": "data:,", "detail": "high"}}]},
     "messages.0.content.0.image_url.detail"),
])  # fmt: skip
def test_unsupported_message_fields_are_refused_by_name(message, param):
    client, _ = make_client()
    r = client.post("/v1/chat/completions", json={"messages": [message]})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_supported_parameters_reach_the_model():
    client, backend = make_client()
    body = chat(max_completion_tokens=5, stop=["\n", "END"], seed=42, temperature=0.7, user="u-1",
                messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
                frequency_penalty=0, logprobs=False, response_format={"type": "text"})  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    job = backend.jobs[-1]
    assert job.max_tokens == 5 and job.stop == ["\n", "END"] and job.seed == 42 and job.temperature == 0.7
    assert job.messages[0]["role"] == "system"
    assert r.json()["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_tokens"), ({"stop": ["a"] * 5}, "stop"),
    ({"stop": ""}, "stop"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
])  # fmt: skip
def test_inconsistent_parameters_are_400(extra, param):
    client, _ = make_client()
    r = client.post("/v1/chat/completions", json=chat(**extra))
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_unknown_model_is_404_model_not_found():
    client, _ = make_client()
    for r in (client.post("/v1/chat/completions", json=chat(model="gpt-9")), client.get("/v1/models/gpt-9")):
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.post("/v1/chat/completions", json=chat(model="m")).status_code == 200


def test_stream_with_include_usage_ends_with_a_usage_chunk():
    client, _ = make_client()
    r = client.post("/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True}))
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    usage = json.loads(evs[-2])
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 7, "completion_tokens": 3,
                                                         "total_tokens": 10}  # fmt: skip
    final = json.loads(evs[-3])
    assert final["choices"][0]["finish_reason"] == "length"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in evs[:-2]) == "a b c"
    plain = client.post("/v1/chat/completions", json=chat(stream=True))
    assert all("usage" not in json.loads(e) for e in events(plain.text)[:-1])


@pytest.mark.parametrize("failure", [
    {"type": "error", "status": 500, "body": {"error": {"message": "boom", "type": "server_error", "param": None,
                                                         "code": "internal_error"}}},
    RuntimeError("replica died"),
])  # fmt: skip
def test_an_error_after_streaming_began_is_an_error_event_then_done(failure):
    client, _ = make_client(FakeBackend(stream_script=[{"type": "delta", "text": "a"}, failure]))
    r = client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    err = json.loads(evs[-2])["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert json.loads(evs[1])["choices"][0]["delta"]["content"] == "a"


def test_a_stream_refused_at_its_turn_is_a_429_not_a_200_stream():
    """The replica answers "admitted", then refuses the request when its turn comes (deadline_exceeded): the status
    is sent with the first real event, so the client sees the 429 and its Retry-After."""
    refusal = {"type": "error", "status": 429, "headers": {"Retry-After": "7"},
               "body": {"error": {"message": "deadline exceeded", "type": "rate_limit_error", "param": None,
                                  "code": "deadline_exceeded"}}}  # fmt: skip
    client, _ = make_client(FakeBackend(stream_script=[refusal]))
    r = client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["code"] == "deadline_exceeded"


# ---------------------------------------------------------------------------------------------------------- operations


def test_api_key_from_config_and_environment(monkeypatch):
    client, _ = make_client(api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = client.post("/v1/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models", headers=headers).status_code == 401
    ok = {"Authorization": "Bearer s3cret"}
    assert client.post("/v1/chat/completions", json=chat(), headers=ok).status_code == 200
    assert client.get("/v1/models", headers=ok).json()["data"][0]["id"] == "m"
    assert client.get("/health").status_code == 200  # probes need no key
    monkeypatch.setenv("ADALLAVA_API_KEY", "from-env")
    client, _ = make_client()
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    monkeypatch.delenv("ADALLAVA_API_KEY")
    assert make_client()[0].get("/v1/models").status_code == 200  # no key anywhere: open


class InfoBackend(FakeBackend):
    async def info(self):
        return {"model_name": "m", "budget_range": [0.5, 1.0], "grid": [0.5, 0.75, 1.0], "max_context": 2048,
                "num_layers": 4, "num_prefix_layers": 2, "granularity": "head", "token_selection": "none",
                "profile": PROFILE, "replica": "not for the page"}  # fmt: skip


def test_playground_is_open_and_its_info_route_needs_the_key():
    """Issue 14: the page holds no secret (open even with a key configured); /v1/adallava/info is an API route."""
    client, _ = make_client(InfoBackend(), api_key="s3cret")
    for path in ("/", "/playground", "/playground/app.js"):
        assert client.get(path).status_code == 200, path
    assert "<title>AdaLLaVA playground</title>" in client.get("/").text
    r = client.get("/v1/adallava/info")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.get("/v1/adallava/info", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.json() == {"model_name": "m", "budget_range": [0.5, 1.0],
                                                 "grid": [0.5, 0.75, 1.0], "num_layers": 4, "num_prefix_layers": 2,
                                                 "granularity": "head", "token_selection": "none"}  # fmt: skip


def test_attention_option_reaches_the_model_and_is_refused_without_one_image():
    client, backend = make_client()
    img = image_part(png())
    r = client.post("/v1/chat/completions", json=chat([img, {"type": "text", "text": "?"}],
                                                      adallava={"attention": True}))  # fmt: skip
    assert r.status_code == 200, r.text
    assert backend.jobs[-1].attention is True
    assert client.post("/v1/chat/completions", json=chat([img])).status_code == 200
    assert backend.jobs[-1].attention is False
    n = len(backend.jobs)
    r = client.post("/v1/chat/completions", json=chat("no image", adallava={"attention": True}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "adallava.attention"
    r = client.post("/v1/chat/completions", json=chat([img], adallava={"attention": True, "heads": True}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "adallava.heads"
    assert r.json()["error"]["code"] == "unknown_field"
    assert len(backend.jobs) == n  # refused requests never reach the model


def test_cors_is_off_by_default_and_follows_the_config():
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    client, _ = make_client()
    assert "access-control-allow-origin" not in client.options("/v1/chat/completions", headers=preflight).headers
    client, _ = make_client(cors_allow_origins=["https://app.example"])
    r = client.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    other = client.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_health_is_unhealthy_when_no_model_replica_answers():
    import asyncio

    async def dead():
        raise RuntimeError("no replica")

    async def hung():
        await asyncio.sleep(30)

    assert make_client()[0].get("/health").json() == {"status": "ok", "replica": "replica-1"}
    for ping in (dead, hung):
        client, _ = make_client(FakeBackend(ping=ping), health_timeout_s=0.2)
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "unhealthy"


def test_config_knows_every_new_key():
    cfg = make_config({"api_key": "k", "cors_allow_origins": ["a"], "limits.max_image_aspect": 10})
    assert isinstance(cfg, ServeConfig) and cfg.limits.max_image_aspect == 10
    with pytest.raises(ValueError, match="unknown config key"):
        make_config({"batch_wait_timeout_s": 0.01})


# ---------------------------------------------------------------------------------------------------------- stop


def feed(stops, pieces):
    st, text, out, stopped = StopText(stops), "", "", False
    for piece in pieces:
        text += piece
        delta, stopped = st.update(text)
        out += delta
        if stopped:
            break
    if not stopped:
        out += st.update(text, final=True)[0]
    return out, stopped, st.text


def test_stop_sequences_match_across_token_boundaries():
    assert feed(["END"], ["Hel", "lo E", "N", "D more"]) == ("Hello ", True, "Hello ")
    assert feed(["\n\n", "b"], ["a", "\n", "\nb"]) == ("a", True, "a")  # the earliest of two
    assert feed(["xyz"], ["abc", "xy"]) == ("abcxy", False, "abcxy")  # a prefix at the end is released at the end
    assert feed([], ["abc"]) == ("abc", False, "abc")
    st = StopText(["zz"])
    assert st.update("abz") == ("ab", False)  # "z" held: it may start the stop sequence
    assert st.update("abzq") == ("z", False)
    st = StopText([])
    assert st.update("ab\ufffd") == ("ab", False)  # an incomplete UTF-8 character waits for its next byte
    assert st.update("abé") == ("é", False)
