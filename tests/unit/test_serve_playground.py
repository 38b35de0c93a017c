"""The playground's server side without Ray: the static routes (serve/playground.py), the files shipped (nothing
fetched from the internet) and the opt-in `adallava.attention` request field (serve/protocol.py)."""

import asyncio
import base64
import io
import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from serve.playground import FILES, STATIC, mount_playground
from serve.protocol import APIError, Limits, decode_data_url, parse_request, validate_request


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    mount_playground(app)
    return TestClient(app)


def test_page_and_its_files_are_served_with_their_types(client):
    root, page = client.get("/"), client.get("/playground")
    assert root.status_code == page.status_code == 200 and root.text == page.text
    assert root.headers["content-type"].startswith("text/html") and "<title>AdaLLaVA playground</title>" in root.text
    assert client.get("/playground/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/playground/style.css").headers["content-type"].startswith("text/css")
    assert root.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize("name", ["nope.js", "index.htm", "playground.py"])
def test_only_the_listed_files_are_served(client, name):
    r = client.get(f"/playground/{name}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found" and name in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/playground/..%2Fplayground.py", "/playground/%2E%2E%2F%2E%2E%2Fpyproject.toml"])
def test_paths_out_of_the_folder_are_not_found(client, path):
    r = client.get(path)
    assert r.status_code == 404 and "mount_playground" not in r.text and "[project]" not in r.text


def test_shipped_files_fetch_nothing_from_the_internet():
    """Every file the page loads is one of ours on the same origin: no http(s) URL anywhere, except the SVG namespace
    name (an identifier, never fetched)."""
    assert sorted(p.name for p in STATIC.iterdir()) == sorted(FILES)
    for name in FILES:
        text = (STATIC / name).read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'`)]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)
    page = (STATIC / "index.html").read_text()
    assert set(re.findall(r'(?:src|href)="([^"]+)"', page)) == {"/playground/app.js", "/playground/style.css"}


# ---------------------------------------------------------------------------------------------------------- protocol


def image_url():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def validate(obj):
    async def loader(url, param):
        return decode_data_url(url, param, Limits())

    return asyncio.run(validate_request(parse_request(obj), Limits(), (0.5, 1.0), loader))


def request(content, **extra):
    return {"messages": [{"role": "user", "content": content}], **extra}


WITH_IMAGE = [{"type": "image_url", "image_url": {"url": image_url()}}, {"type": "text", "text": "?"}]


def test_attention_is_off_unless_asked():
    assert validate(request(WITH_IMAGE)).attention is False
    assert validate(request(WITH_IMAGE, adallava={})).attention is False
    assert validate(request(WITH_IMAGE, adallava={"attention": False})).attention is False
    assert validate(request(WITH_IMAGE, adallava={"attention": True})).attention is True


@pytest.mark.parametrize("extra, param, code, words", [
    ({"adallava": {"attention": "yes"}}, "adallava.attention", "invalid_type", "boolean"),
    ({"adallava": {"attention": 1}}, "adallava.attention", "invalid_type", "boolean"),
    ({"adallava": {"atention": True}}, "adallava.atention", "unknown_field", "accepts: attention"),
    ({"adallava": True}, "adallava", "invalid_type", "AdaLlavaOptions"),
])  # fmt: skip
def test_malformed_attention_options_are_refused_by_name(extra, param, code, words):
    with pytest.raises(APIError) as e:
        parse_request(request(WITH_IMAGE, **extra))
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
    assert e.value.message.startswith(param + ":") and words in e.value.message


def test_attention_needs_exactly_one_image():
    with pytest.raises(APIError) as e:
        validate(request("hi", adallava={"attention": True}))
    assert (e.value.status, e.value.param) == (400, "adallava.attention") and "has none" in e.value.message

    async def loader(url, param):
        return decode_data_url(url, param, Limits())

    two = request(WITH_IMAGE + WITH_IMAGE[:1], adallava={"attention": True})
    with pytest.raises(APIError) as e:
        asyncio.run(validate_request(parse_request(two), Limits(max_images=2), (0.5, 1.0), loader))
    assert (e.value.status, e.value.param) == (400, "adallava.attention") and "has 2" in e.value.message


# ---------------------------------------------------------------------------------------------------------- replica


def test_the_replica_refuses_attention_with_token_selection():
    """FastV / PruMerge drop image tokens before the map is read: refused by name before the request is queued."""
    from types import SimpleNamespace

    from serve.replica import AdaLlavaModel, Job

    cls = AdaLlavaModel.func_or_class
    fake = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(token_selection="fastv")))
    job = Job(request_id="r", messages=[], images=[None], max_tokens=4, temperature=0.0, top_p=1.0, budget_cap=None,
              latency_ms=None, attention=True)  # fmt: skip
    with pytest.raises(APIError) as e:
        cls._prepare(fake, job)
    assert (e.value.status, e.value.param) == (400, "adallava.attention") and "'fastv'" in e.value.message


def test_the_replica_learns_the_engine_steps_of_an_answer_ended_by_eos_and_reports_its_prediction():
    """Two completion tokens and an EOS: three engine steps (joined at step 5, finished at 7), which is what the
    length model learns (the latency model plays engine steps); the response says what its join predicted."""
    from types import SimpleNamespace

    from serve.config import make_config
    from serve.policy import LengthModel
    from serve.replica import AdaLlavaModel, Job, _Live

    cls = AdaLlavaModel.func_or_class
    metric = SimpleNamespace(observe=lambda *a, **k: None)
    fake = SimpleNamespace(lengths=LengthModel(make_config({}).policy), m_budget=metric, m_latency=metric,
                           m_ttft=metric, m_tpot=metric, load_info=dict, replica_id="r0")  # fmt: skip
    job = Job(request_id="r", messages=[], images=[], max_tokens=8, temperature=0.0, top_p=1.0, budget_cap=None,
              latency_ms=None, t_ingress=100.0)  # fmt: skip
    live = _Live(job, request=None, queue=None, loop=None, budget=1.0, t_join=100.5, tokens_predicted=4)
    fin = SimpleNamespace(finished_step=7, joined_step=5, finish_reason="eos", execution_plan=None, flops=None,
                          prefill_s=0.1, plan=None, token_ids=[11, 12, 2])  # fmt: skip
    out = cls._done(fake, live, fin, "ab", 2, False, 100.6, 100.7)
    assert out["completion_tokens"] == 2 and out["adallava"]["engine_steps"] == 3
    assert list(fake.lengths.seen) == [3] and out["adallava"]["tokens_predicted"] == 4
