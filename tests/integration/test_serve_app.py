"""The Serve application end to end on a local Ray cluster (loopback): the official openai client, continuous batching
(a short request beside a long one leaves after its own steps; the long one's answer is the one it gets alone), stop
sequences, usage in the stream, seeded sampling, every bad-input class (4xx, OpenAI-style body, and the well-formed
requests sent beside them all answered), and a replica that fails its health check being replaced. One app for the
whole module, with an SLO no request here can miss: overload and budgets are tested deterministically in
test_serve_overload.py."""

import concurrent.futures as cf
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from serve_images import data_url, png

pytestmark = pytest.mark.integration

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Images(BaseHTTPRequestHandler):
    """A loopback image host for the allow-list path (nothing outside this machine is contacted)."""

    def do_GET(self):
        if self.path == "/slow.png":
            time.sleep(3)
        body = {"/ok.png": png(), "/slow.png": png(), "/big.png": os.urandom(300_000), "/text.png": b"hello"}.get(
            self.path
        )
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray
    from ray import serve

    from serve.app import build_app

    images = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model_name": "adallava-test", "max_batch_size": 4, "min_replicas": 2, "max_replicas": 2,
        "health_check_period_s": 1.0, "health_check_timeout_s": 10.0, "fault_injection": True, "profile_tokens": 4,
        "profile_cache": str(tmp_path_factory.mktemp("profiles")),
        "policy": {"slo_ms": 600_000, "tokens": 8},  # nothing here depends on the machine's speed
        "limits": {"default_max_tokens": 8, "max_images": 1, "max_image_bytes": 200_000, "max_image_pixels": 512 * 512,
                   "fetch_images": True, "allowed_image_hosts": ["127.0.0.1"], "fetch_timeout_s": 1.0},
    }  # fmt: skip
    serve.run(build_app(args), name="adallava", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "images": f"http://127.0.0.1:{images.server_address[1]}"}
    serve.shutdown()
    ray.shutdown()
    images.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(base_url=server["url"], timeout=60) as c:
        yield c


# ---------------------------------------------------------------------------------------------------------- openai


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == ["adallava-test"]
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["replica"]


def test_text_completion_with_openai_client(client):
    r = client.chat.completions.create(model="adallava-test", messages=[{"role": "user", "content": "What is this?"}],
                                       max_tokens=6)  # fmt: skip
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert 1 <= r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 0
    ada = r.model_extra["adallava"]
    assert ada["flops"] > 0 and len(ada["execution_plan"]) == 8
    assert sum(ada["execution_plan"]) == pytest.approx(8 * ada["budget"])  # the plan runs the reported budget
    assert ada["latency_ms"]["total"] > 0 and ada["load"]["source"] == "load_board" and ada["load"]["replicas"] == 2
    assert ada["budget"] == 1.0 and ada["deadline_ms"] == 600_000  # idle, far from its deadline: full budget
    assert ada["load"]["contention"] > 0  # the replica's contention factor, measured on engine steps


def test_latency_target_tightens_the_deadline_and_an_unreachable_one_is_a_400(client, http):
    r = client.chat.completions.create(model="adallava-test", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, extra_body={"latency_ms": 300_000})  # fmt: skip
    ada = r.model_extra["adallava"]
    assert ada["deadline_ms"] == 300_000 and ada["latency_ms_target"] == 300_000
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                                 "latency_ms": 0.001})  # fmt: skip
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "latency_ms" and err["code"] == "latency_unreachable" and "achievable range is" in err["message"]


def test_sse_wire_format(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                 "stream": True})  # fmt: skip
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_fetch_from_an_allow_listed_host(http, server):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": server["images"] + "/ok.png"}}, {"type": "text", "text": "?"}]}],
        "max_tokens": 2})  # fmt: skip
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------------------- bad input


def chat(content, **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def image(url):
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]


def corrupt_png():
    raw = bytearray(png((64, 64)))
    raw[60:90] = b"\x00" * 30
    return bytes(raw)


BAD = [
    ("malformed json", b'{"messages": [', 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, "invalid_json"),
    ("missing messages", {"max_tokens": 2}, 400, "missing_field"),
    ("messages wrong type", {"messages": "hello"}, 400, "invalid_type"),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_type"),
    ("unknown part type", chat([{"type": "audio", "data": "x"}]), 400, "invalid_type"),
    ("max_tokens wrong type", chat("hi", max_tokens="many"), 400, "invalid_type"),
    ("bad base64", chat(image("data:image/png;base64,%%%%")), 400, "invalid_base64"),
    ("non-image bytes", chat(image(data_url(b"plain text, not a picture"))), 400, "invalid_image"),
    ("truncated image", chat(image(data_url(png((64, 64))[:50]))), 400, "invalid_image"),
    ("corrupt image", chat(image(data_url(corrupt_png()))), 400, "invalid_image"),
    ("image too many bytes", chat(image(data_url(os.urandom(250_000)))), 400, "image_too_large"),
    ("image too many pixels", chat(image(data_url(png((600, 600))))), 400, "image_too_large"),
    ("too many images", chat(image(data_url(png())) + image(data_url(png()))), 400, "too_many_images"),
    ("budget below range", chat("hi", budget=0.2), 400, "invalid_value"),
    ("budget above range", chat("hi", budget=1.2), 400, "invalid_value"),
    ("budget not a number", chat("hi", budget="fast"), 400, "invalid_type"),
    ("budget NaN", b'{"messages": [{"role": "user", "content": "hi"}], "budget": NaN}', 400, "invalid_value"),
    ("latency not positive", chat("hi", latency_ms=-1), 400, "invalid_value"),
    ("latency not a number", chat("hi", latency_ms="soon"), 400, "invalid_type"),
    ("file scheme", chat(image("file:///etc/passwd")), 400, "url_not_allowed"),
    ("host not allowed", chat(image("http://localhost:1/a.png")), 400, "url_not_allowed"),
    ("unknown model", {**chat("hi"), "model": "gpt-9"}, 404, "model_not_found"),
    ("json nested 5000 deep", b'{"messages": [], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "invalid_json"),
    ("integer of 5000 digits", b'{"messages": [], "max_tokens": ' + b"7" * 5000 + b"}", 400, "invalid_json"),
    ("400-digit budget", chat("hi", budget=10**400), 400, "invalid_value"),
    ("400-digit temperature", chat("hi", temperature=10**400), 400, "invalid_value"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_unicode"),
    ("very wide image", chat(image(data_url(png((4000, 2))))), 400, "image_aspect_ratio"),
    ("tools", chat("hi", tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_parameter"),
    ("logprobs", chat("hi", logprobs=True), 400, "unsupported_parameter"),
    ("unrecognized field", chat("hi", frobnicate=1), 400, "unsupported_parameter"),
    ("n above 1", chat("hi", n=3), 400, "invalid_value"),
]


@pytest.mark.parametrize("name, body, status, code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_4xx_with_an_error_body(http, name, body, status, code):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = http.post("/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]


@pytest.mark.parametrize("path, code, words", [
    ("/big.png", "image_too_large", "too large"), ("/slow.png", "image_fetch_failed", "timed out"),
    ("/text.png", "invalid_image", "not an image"), ("/missing.png", "image_fetch_failed", "HTTP 404"),
])  # fmt: skip
def test_bad_fetched_images_are_4xx(http, server, path, code, words):
    r = http.post("/v1/chat/completions", json=chat(image(server["images"] + path)))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code and words in r.json()["error"]["message"]


def test_well_formed_requests_beside_hostile_ones_are_all_answered(server):
    """Every bad body and a well-formed request between each two, all at once: every bad one is a 4xx, every good one
    a 200 with its tokens (nothing lost, no replica taken down)."""
    import httpx

    def send(item):
        kind, body = item
        with httpx.Client(base_url=server["url"], timeout=120) as c:
            kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
                "json": body}  # fmt: skip
            r = c.post("/v1/chat/completions", **kw)
            return kind, r.status_code, r.json()

    items = []
    for _, body, _, _ in BAD:
        items += [("bad", body), ("good", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})]
    with cf.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(send, items))
    assert all(400 <= status < 500 for kind, status, _ in results if kind == "bad"), results
    good = [(status, body) for kind, status, body in results if kind == "good"]
    # answered in full (the budget the load allows may make a row stop at EOS before its 3 tokens)
    assert all(status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
               and body["usage"]["completion_tokens"] <= 3 for status, body in good), good  # fmt: skip
    assert len(good) == len(BAD)


# ---------------------------------------------------------------------------------------------------------- health


def test_a_replica_failing_its_health_check_is_replaced(server, client):
    from ray import serve

    handle = serve.get_deployment_handle("AdaLlavaModel", app_name="adallava")
    before = {handle.info.remote().result()["replica"] for _ in range(20)}
    broken = handle.inject_fault.remote().result()
    assert broken in before
    seen_new = set()
    for _ in range(180):  # a bounded number of polls; each ends as soon as the state is reached
        seen = {handle.info.remote().result()["replica"] for _ in range(10)}
        seen_new |= seen - before
        if seen_new and broken not in seen:
            break
        time.sleep(1)
    assert seen_new, "no replacement replica appeared"
    assert broken not in {handle.info.remote().result()["replica"] for _ in range(20)}
    r = client.chat.completions.create(model="adallava-test", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")
