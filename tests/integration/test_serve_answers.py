"""The served answer is the model's own greedy answer: a Serve app (one replica, the `tiny` preset with seed 0, as the
server builds it) answers chat completions, and the same prompt and image through `load("tiny", seed=0).generate`
on this side must give the same text, token count and plan. A server that built the prompt wrongly, dropped the image
or ran another budget fails here."""

import base64
import io
import os
import socket

import numpy as np
import pytest

pytestmark = pytest.mark.integration

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

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
