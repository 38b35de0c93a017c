"""The served answer is the model's own greedy answer: a Serve app (one replica, the `tiny` preset with seed 0, as the
server builds it) answers chat completions, and the same prompt and image through `load("tiny", seed=0).generate`
on this side must give the same text, token count and plan. A server that built the prompt wrongly, dropped the image
or ran another budget fails here."""

import base64
import io
import socket

import numpy as np
import pytest
from serve_images import data_url, png

pytestmark = pytest.mark.integration

MAX_TOKENS = 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def noise_png(seed):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(40, 40, 3) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(ray_cluster):
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model_name": "adallava-test", "seed": 0, "max_batch_size": 4, "min_replicas": 1, "max_replicas": 1,
        "profile_tokens": 2,
        # an SLO nothing misses: the server's own choice is the full budget, and a request's cap decides
        "policy": {"slo_ms": 1e9, "tokens": MAX_TOKENS},
        "limits": {"default_max_tokens": MAX_TOKENS, "max_images": 1},
    }  # fmt: skip
    serve.run(build_app(args), name="adallava-answers", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local():
    from adallava.presets import load

    return load("tiny", seed=0)


def reference(local, question, png_bytes, budget):
    """(text, token ids, execution plan) of the model's own greedy answer to the same chat message."""
    from PIL import Image

    model, processor = local
    content = ([{"type": "image"}] if png_bytes else []) + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [Image.open(io.BytesIO(png_bytes)).convert("RGB")] if png_bytes else None
    enc = processor(images=images, text=[prompt], return_tensors="pt")
    out = model.generate(**enc, budget=budget, max_new_tokens=MAX_TOKENS,
                         eos_token_id=processor.tokenizer.eos_token_id, return_dict_in_generate=True)  # fmt: skip
    ids = out.sequences[0, enc["input_ids"].shape[1] :][: int(out.num_generated[0])]
    eos = processor.tokenizer.eos_token_id
    text = processor.tokenizer.decode([t for t in ids.tolist() if t != eos], skip_special_tokens=True)
    return text, ids.tolist(), [round(float(x), 4) for x in out.execution_plan[0]]


CASES = [  # (question, image seed or None, budget cap): each pair's local answers differ from one another
    ("What colour is the circle?", 2, 1.0),
    ("What colour is the circle?", 2, 0.75),
    ("Describe this image in detail", None, 0.75),
    ("How many squares?", 1, 0.625),
]


@pytest.mark.parametrize("question, seed, budget", CASES)
def test_served_answer_is_the_models_greedy_answer(client, local, question, seed, budget):
    png_bytes = noise_png(seed) if seed is not None else None
    content = [{"type": "text", "text": question}]
    if png_bytes:
        url = "data:image/png;base64," + base64.b64encode(png_bytes).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}] + content
    r = client.chat.completions.create(model="adallava-test", messages=[{"role": "user", "content": content}],
                                       max_tokens=MAX_TOKENS, extra_body={"budget": budget})  # fmt: skip
    ada = r.model_extra["adallava"]
    assert ada["budget"] == budget  # the server's own choice is 1.0 (no SLO pressure): the cap decides
    text, ids, plan = reference(local, question, png_bytes, budget)
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == len(ids)
    assert ada["execution_plan"] == plan
    # the image reached the model: without it (or with another one) the model answers otherwise
    if png_bytes:
        assert reference(local, question, None, budget)[1] != ids
        assert reference(local, question, noise_png(seed + 10), budget)[1] != ids


def test_streamed_answer_is_the_models_greedy_answer(client, local):
    question, budget = "Describe this image in detail", 0.75
    stream = client.chat.completions.create(model="adallava-test", messages=[{"role": "user", "content": question}],
                                            max_tokens=MAX_TOKENS, stream=True, extra_body={"budget": budget})  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == reference(local, question, None, budget)[0]


@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


# Request semantics whose answers must be exact: on this server (an SLO nothing misses) the budget is the client's
# cap, whatever the machine's load; on the load-testing server of test_serve_app a busy machine lowers it.

def test_image_completion_and_budget_extension(client):
    content = [{"type": "image_url", "image_url": {"url": data_url(png())}}, {"type": "text", "text": "What colour?"}]
    full = client.chat.completions.create(model="adallava-test", messages=[{"role": "user", "content": content}],
                                          max_tokens=4, extra_body={"budget": 1.0})  # fmt: skip
    low = client.chat.completions.create(model="adallava-test", messages=[{"role": "user", "content": content}],
                                         max_tokens=4, extra_body={"budget": 0.5})  # fmt: skip
    a, b = full.model_extra["adallava"], low.model_extra["adallava"]
    assert b["budget"] == 0.5 and b["budget_cap"] == 0.5
    assert b["execution_plan"][4:] == [0.0, 0.0, 0.0, 0.0]  # budget 0.5 = the 4 prefix layers only
    assert b["flops"] < a["flops"]


def test_streaming_with_openai_client(client):
    stream = client.chat.completions.create(model="adallava-test", messages=[{"role": "user", "content": "Describe"}],
                                            max_tokens=6, stream=True, extra_body={"budget": 0.75})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["adallava"]["budget"] == 0.75
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    same = client.chat.completions.create(model="adallava-test", messages=[{"role": "user", "content": "Describe"}],
                                          max_tokens=6, extra_body={"budget": 0.75})  # fmt: skip
    assert text == same.choices[0].message.content  # greedy: streamed == non-streamed


LONG = [{"role": "user", "content": "Tell me a long story"}]


def test_a_short_request_beside_a_long_one_leaves_after_its_own_steps(client, http):
    """The long request streams; once it is running a 2-token request joins its batch and comes back after 2 engine
    steps while the long one goes on; the long answer is the one it gets alone (greedy)."""
    stream = client.chat.completions.create(model="adallava-test", messages=LONG, max_tokens=200, stream=True,
                                            extra_body={"budget": 1.0})  # fmt: skip
    chunks = [next(stream), next(stream)]  # the role chunk, then a first token: the long one is in the engine
    short = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                     "budget": 1.0})  # fmt: skip
    assert short.status_code == 200, short.text
    s = short.json()
    assert s["usage"]["completion_tokens"] == 2 and s["choices"][0]["finish_reason"] == "length"
    assert s["adallava"]["engine_steps"] == 2
    chunks += list(stream)
    long_ada = chunks[-1].model_extra["adallava"]
    assert chunks[-1].choices[0].finish_reason == "length" and long_ada["engine_steps"] == 200
    if s["adallava"]["replica"] == long_ada["replica"]:  # routed beside it: it joined a running batch
        assert s["adallava"]["batch_size"] >= 2
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    alone = client.chat.completions.create(model="adallava-test", messages=LONG, max_tokens=200,
                                           extra_body={"budget": 1.0})  # fmt: skip
    assert text == alone.choices[0].message.content and alone.usage.completion_tokens == 200


def test_stop_sequence_ends_the_answer_before_it(client):
    full = client.chat.completions.create(model="adallava-test", messages=LONG, max_tokens=24)
    text = full.choices[0].message.content
    start = next(i for i in range(3, len(text) - 2) if text[i : i + 2].isalpha())  # a printable pair past the start
    stop = text[start : start + 2]
    for stream in (False, True):
        r = client.chat.completions.create(model="adallava-test", messages=LONG, max_tokens=24, stop=[stop, "@@@"],
                                           stream=stream)  # fmt: skip
        if stream:
            chunks = list(r)
            got, reason = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            got, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert got == text[: text.find(stop)] and reason == "stop"


def test_seed_fixes_a_sampled_answer(client):
    def sample(seed):
        return client.chat.completions.create(model="adallava-test", messages=LONG, max_tokens=12, temperature=1.0,
                                              seed=seed).choices[0].message.content  # fmt: skip

    a = sample(7)
    assert sample(7) == a and sample(8) != a


def test_include_usage_and_max_completion_tokens(client):
    chunks = list(client.chat.completions.create(model="adallava-test", messages=LONG, max_completion_tokens=5,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 5
