"""adallava.attention: where the latency token looks (evaluation's qualitative figure and the Serve playground)."""

import pytest
import torch
from PIL import Image

from adallava.attention import attention_map, latency_token_attention
from adallava.presets import load


@pytest.fixture(scope="module")
def tiny():
    model, processor = load("tiny", seed=0)
    model.eval()
    return model, processor


def encode(processor, colour=(200, 30, 30), question="What colour is it?"):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    img = Image.new("RGB", (40, 40), colour)
    img.paste((20, 20, 220), (0, 0, 20, 20))  # not uniform, so patches differ
    return processor(images=[img], text=[prompt], return_tensors="pt")


def test_shape_and_a_distribution_over_the_prompt(tiny):
    model, processor = tiny
    enc = encode(processor)
    att = latency_token_attention(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], 0.75)
    P, H = model.config.num_prefix_layers, model.config.text_config.num_attention_heads
    n_img = int((enc["input_ids"][0] == model.config.image_token_id).sum())
    assert att.shape == (P, H, n_img) == (4, 4, 16)
    # weights over the image are part of a softmax over the whole prompt: positive, and below 1 in sum
    assert (att > 0).all() and (att.sum(-1) < 1).all()


def test_map_is_the_last_prefix_layer_averaged_over_heads_and_normalised(tiny):
    model, processor = tiny
    enc = encode(processor)
    att = latency_token_attention(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], 0.75)
    grid = attention_map(att)
    expected = att[-1].mean(0) / att[-1].mean(0).sum()
    assert grid.shape == (4, 4)
    torch.testing.assert_close(grid.flatten(), expected)
    torch.testing.assert_close(grid.sum(), torch.tensor(1.0))
    torch.testing.assert_close(attention_map(att, layer=0).flatten(), att[0].mean(0) / att[0].mean(0).sum())


def test_the_budget_changes_where_the_latency_token_looks(tiny):
    """The latency token encodes the budget, so its query (and the map) depend on it; the image tokens do not."""
    model, processor = tiny
    enc = encode(processor)
    low = latency_token_attention(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], 0.5)
    high = latency_token_attention(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], 1.0)
    again = latency_token_attention(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], 0.5)
    assert not torch.allclose(low, high)
    torch.testing.assert_close(low, again)  # deterministic


def test_refusals_name_the_problem(tiny):
    model, processor = tiny
    enc = encode(processor)
    two = {k: torch.cat([v, v]) for k, v in enc.items()}
    with pytest.raises(ValueError, match="one request at a time"):
        latency_token_attention(model, two["input_ids"], two["pixel_values"], two["attention_mask"], 1.0)
    with pytest.raises(ValueError, match="square patch grid"):
        attention_map(torch.rand(4, 4, 15))
    with pytest.raises(ValueError, match=r"\[layers, heads, image tokens\]"):
        attention_map(torch.rand(4, 16))
    fastv, fprocessor = load("tiny", seed=0, token_selection="fastv")
    fastv.eval()
    enc = encode(fprocessor)
    with pytest.raises(ValueError, match="token_selection='none'.*'fastv'"):
        latency_token_attention(fastv, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], 1.0)
    model.train()
    try:
        with pytest.raises(RuntimeError, match="model.eval"):
            latency_token_attention(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], 1.0)
    finally:
        model.eval()
