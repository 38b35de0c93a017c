"""The gated LLaVA: equalities between its paths (spec 9.10 and the issue's list), on tiny random models."""

import numpy as np
import pytest
import torch
from PIL import Image

from adallava.modeling import IGNORE_INDEX, AdaLlavaForConditionalGeneration
from adallava.budget import encoder_input
from adallava.presets import load
from powered import build_powered, distinct_tokens

ARCHS = [("layer", "llama"), ("head", "llama"), ("layer", "mistral"), ("head", "mistral"), ("layer", "qwen2"),
         ("head", "qwen2")]  # fmt: skip
QUESTIONS = ["What colour is the circle?", "How many squares are there in the picture?", "Is it left?"]


def images(n, size=40):
    return [Image.fromarray((np.random.RandomState(i).rand(size, size, 3) * 255).astype("uint8")) for i in range(n)]


def prompt(processor, question, image=True):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def batch(processor, n=3):
    return processor(
        images=images(n), text=[prompt(processor, q) for q in QUESTIONS[:n]], return_tensors="pt", padding=True
    )


@pytest.fixture(scope="module", params=ARCHS, ids=lambda a: f"{a[0]}-{a[1]}")
def tiny(request):
    """A tiny model with power (tests/unit/powered.py): its greedy tokens vary, so token equalities mean something."""
    return build_powered(*request.param)


def mixed_budgets(model):
    """Three different budgets, each scheduling at least one unit (k >= 1), one of them full."""
    from adallava.budget import budget_grid

    grid = budget_grid(model.config)
    return [grid[1], grid[len(grid) // 2 + 1], 1.0]


def test_full_budget_equals_the_ungated_language_model(tiny):
    """With every switch on, our decoder loop gives what transformers' own LlamaModel/MistralModel/Qwen2Model gives
    on the same embeddings (latency token included)."""
    model, processor = tiny
    inputs = batch(processor)
    with torch.no_grad():
        embeds = model.embed_inputs(inputs["input_ids"], inputs["pixel_values"])
        budget = torch.ones(3, dtype=torch.float64)
        h, mask, _, pos = model.insert_latency_token(embeds, inputs["attention_mask"], None, model.latency_token(budget))
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        ours, plan = model.decode(h, mask.bool(), position_ids, budget, pos)
        ref = model.model.language_model(inputs_embeds=h, attention_mask=mask, position_ids=position_ids)
    assert plan.min() == 1.0
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], ref.last_hidden_state[valid], rtol=1e-5, atol=1e-5)


def test_masked_equals_skipped(tiny):
    """The training path (masks) and the inference path (real skips and slices) agree for the same plans."""
    model, processor = tiny
    inputs = batch(processor)
    budgets = mixed_budgets(model)
    with torch.no_grad():
        masked = model(**inputs, budget=budgets, plan_mode="mask")
        skipped = model(**inputs, budget=budgets, plan_mode="skip")
    assert torch.equal(masked.plan, skipped.plan)
    valid = torch.cat([inputs["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1).bool()
    torch.testing.assert_close(masked.logits[valid], skipped.logits[valid], rtol=1e-5, atol=1e-5)


def test_plans_have_exactly_k_units_and_prefix_always_runs(tiny):
    model, processor = tiny
    inputs = batch(processor)
    budgets = mixed_budgets(model)
    cfg = model.config
    expected_units = [round((b - 0.5) * cfg.units_per_layer * cfg.num_layers) for b in budgets]
    for mode in ("eval", "train"):
        model.train(mode == "train")
        out = model(**inputs, budget=budgets)
        switches_per_unit = 2 * (cfg.group_size if cfg.granularity == "head" else cfg.num_switches)
        units = out.plan.detach().sum((1, 2, 3)) / switches_per_unit
        assert units.round().long().tolist() == expected_units
        assert (out.execution_plan[:, : cfg.num_prefix_layers] == 1).all()
        fraction_run = out.execution_plan.mean(1)
        assert torch.allclose(fraction_run, torch.tensor(budgets, dtype=torch.float32), atol=1e-6)
    model.eval()


def test_cached_generation_equals_uncached(tiny):
    model, processor = tiny
    inputs = batch(processor)
    kwargs = dict(budget=mixed_budgets(model), max_new_tokens=8, return_dict_in_generate=True)
    cached = model.generate(**inputs, **kwargs)
    uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert min(distinct_tokens(cached.sequences[:, -8:])) >= 4  # the fixture has power: no one-token loops
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.plan, uncached.plan)


def test_the_plan_depends_on_the_budget_through_the_latency_token(tiny, monkeypatch):
    """The scheduler reads a latency token that encodes the request's own budget (spec 1.3-1.5): the encoder gets
    encoder_input(b) of each row, and the hidden state the scheduler reads, hence its logits, changes with b."""
    model, processor = tiny
    inputs = batch(processor)
    budgets = mixed_budgets(model)
    seen = {}
    encode = model.latency_encoder.forward
    monkeypatch.setattr(model.latency_encoder, "forward", lambda q: seen.setdefault("q", q) is not None and encode(q))
    head = model.scheduler.logits
    monkeypatch.setattr(model.scheduler, "logits", lambda x: seen.setdefault("logits", head(x)))
    with torch.no_grad():
        model(**inputs, budget=budgets)
    expected = encoder_input(torch.tensor(budgets, dtype=torch.float64), model.config)
    torch.testing.assert_close(seen["q"], expected, rtol=0, atol=0)
    assert len(set(expected.tolist())) == 3  # three different budgets encode as three different tokens
    # the same prompt at two budgets: the scheduler's logits differ (the token is read), the prompt does not
    one = {k: v[:1].repeat(2, *[1] * (v.dim() - 1)) for k, v in inputs.items()}
    seen.clear()
    with torch.no_grad():
        model(**one, budget=[budgets[1], 1.0])
    logits = seen["logits"]
    assert (logits[0] - logits[1]).abs().max() > 1e-3
    seen.clear()
    with torch.no_grad():
        model(**one, budget=[1.0, 1.0])
    torch.testing.assert_close(seen["logits"][0], seen["logits"][1])


def test_mixed_budget_batch_equals_one_by_one(tiny):
    model, processor = tiny
    inputs = batch(processor)
    budgets = mixed_budgets(model)
    together = model.generate(**inputs, budget=budgets, max_new_tokens=8, return_dict_in_generate=True)
    for i, (image, question) in enumerate(zip(images(3), QUESTIONS)):
        alone = model.generate(
            **processor(images=image, text=prompt(processor, question), return_tensors="pt"),
            budget=budgets[i], max_new_tokens=8, return_dict_in_generate=True,
        )  # fmt: skip
        assert torch.equal(alone.sequences[0, -8:], together.sequences[i, -8:])
        assert torch.equal(alone.plan[0], together.plan[i])
        assert alone.flops[0] == together.flops[i]


def test_gradients_reach_scheduler_and_latency_encoder(tiny):
    model, processor = tiny
    inputs = batch(processor)
    labels = inputs["input_ids"].clone()
    labels[:, :-4] = IGNORE_INDEX
    model.train()
    model.zero_grad()
    out = model(**inputs, labels=labels, budget=mixed_budgets(model))  # k >= 1 for every row
    out.loss.backward()
    model.eval()
    assert model.scheduler.mlp_head.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.latency_encoder.parameters() if p.dim() > 1)
    model.zero_grad()


def test_save_load_round_trip(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load(tmp_path)
    assert type(loaded) is AdaLlavaForConditionalGeneration

    def architecture(cfg):  # the config minus bookkeeping that loading fills in (dtype, source path)
        d = cfg.to_dict()
        for sub in (d, d["text_config"], d["vision_config"]):
            for key in ("dtype", "_name_or_path", "transformers_version"):
                sub.pop(key, None)
        return d

    assert architecture(loaded.config) == architecture(model.config)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    inputs = batch(processor)
    kwargs = dict(budget=mixed_budgets(model), max_new_tokens=6, return_dict_in_generate=True)
    assert torch.equal(model.generate(**inputs, **kwargs).sequences, loaded.generate(**inputs, **kwargs).sequences)
    assert loaded_processor.tokenizer("What colour?").input_ids == processor.tokenizer("What colour?").input_ids
