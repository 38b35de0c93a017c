"""Generation details, latency-token placement, skipping really skipping, wrapping plain LLaVA checkpoints."""

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from adallava.modeling import IGNORE_INDEX, AdaLlavaForConditionalGeneration, DecodeState
from adallava.presets import load
from powered import build_powered

from test_modeling import QUESTIONS, batch, images, prompt


@pytest.fixture(scope="module")
def llama_layer():
    return build_powered("layer", "llama")


@pytest.fixture(scope="module")
def mistral_head():
    return build_powered("head", "mistral")


def test_latency_token_goes_after_the_last_prompt_token_in_training(llama_layer):
    model, _ = llama_layer
    embeds = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, 7, 8, -100], [-100, -100, 5, 6, 7, 8]])
    lat = torch.full((2, 4), 9.0)
    out, new_mask, new_labels, pos = model.insert_latency_token(embeds, mask, labels, lat)
    assert pos.tolist() == [3, 2]
    assert (out[0, 3] == 9).all() and torch.equal(out[0, 4], embeds[0, 3]) and torch.equal(out[0, :3], embeds[0, :3])
    assert new_labels.tolist() == [[-100, -100, -100, -100, 7, 8, -100], [-100, -100, -100, 5, 6, 7, 8]]
    assert new_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0], [1] * 7]
    _, _, _, pos = model.insert_latency_token(embeds, mask, None, lat)
    assert pos.tolist() == [6, 6]  # inference: appended at the end of the (left-padded) prompt


def test_right_padded_prompts_generate_like_left_padded(llama_layer):
    model, processor = llama_layer
    kwargs = dict(budget=[0.625, 0.75, 1.0], max_new_tokens=6)
    left = model.generate(**batch(processor), **kwargs)
    processor.tokenizer.padding_side = "right"
    try:
        right_inputs = batch(processor)
    finally:
        processor.tokenizer.padding_side = "left"
    right = model.generate(**right_inputs, **kwargs)
    assert torch.equal(left[:, -6:], right[:, -6:])


def _prefill_and_one_decode_step(model, processor, budget):
    """Run a prefill and one decode step through decode() with a DecodeState -> (state, prompt length)."""
    inputs = processor(images=images(1), text=prompt(processor, QUESTIONS[0]), return_tensors="pt")
    with torch.no_grad():
        embeds = model.embed_inputs(inputs["input_ids"], inputs["pixel_values"])
        budget = torch.tensor([budget], dtype=torch.float64)
        h, mask, _, pos = model.insert_latency_token(embeds, inputs["attention_mask"], None, model.latency_token(budget))
        T = h.shape[1]
        state = DecodeState(capacity=T + 2, key_valid=torch.zeros(1, T + 2, dtype=torch.bool))
        state.key_valid[:, :T] = True
        position_ids = mask.cumsum(-1) - 1
        hidden, _ = model.decode(h, state.key_valid, position_ids, budget, pos, state=state)
        token = model.lm_head(hidden[:, -1]).argmax(-1)
        state.key_valid[:, T] = True
        model.decode(model.get_input_embeddings()(token)[:, None], state.key_valid, position_ids[:, -1:] + 1, budget,
                     state=state)  # fmt: skip
    return state, T


@pytest.mark.parametrize("budget", [0.5 + 1 / 32, 0.5 + 6 / 32])
def test_skipped_layers_hold_no_cache_and_sliced_layers_only_kept_heads(mistral_head, budget):
    """GQA (4 query heads, 2 KV heads): a kept query head always brings its own KV head, and no other. A layer the
    plan skips holds no group and no cache; every layer that runs wrote its K/V for the decoded token too."""
    model, processor = mistral_head
    state, T = _prefill_and_one_decode_step(model, processor, budget)
    P = model.config.num_prefix_layers
    heads_per_layer = [int(state.plan[0, i - P, 0].sum()) for i in range(P, model.config.num_layers)]
    assert sum(heads_per_layer) == round((budget - 0.5) * 32)  # one head + one MLP group per unit
    skipped = [i for i in range(P, model.config.num_layers) if heads_per_layer[i - P] == 0]
    if budget < 0.55:
        assert len(skipped) == 3  # one unit: three of the four schedulable layers are skipped
    for i in range(P, model.config.num_layers):
        heads_on = state.plan[0, i - P, 0].nonzero().flatten()
        groups = state.groups[i]
        if i in skipped:
            assert groups == []
            continue
        (g,) = groups
        kv_needed = torch.unique(heads_on // 2)
        assert g.k.shape[1] == len(kv_needed) and g.weights.n_q == len(heads_on)
        assert g.weights.q_w.shape[0] == len(heads_on) * 32  # head_dim 32: sliced, not masked
        neurons = sum(model._neuron_group_sizes[j] for j in state.plan[0, i - P, 1].nonzero().flatten().tolist())
        assert g.weights.g_w.shape[0] == neurons
        written = g.k.abs().sum((0, 1, 3)) > 0  # per slot
        assert written.tolist() == [True] * (T + 1) + [False]  # prompt + the decoded token, not the free slot
    for i in range(P):  # prefix layers always run and cache every slot used
        assert (state.groups[i][0].k.abs().sum((0, 1, 3)) > 0).tolist() == [True] * (T + 1) + [False]


def test_skipped_layers_write_no_cache_at_layer_granularity(llama_layer):
    model, processor = llama_layer
    state, T = _prefill_and_one_decode_step(model, processor, 0.75)  # 2 of the 4 schedulable layers run
    P = model.config.num_prefix_layers
    runs = state.plan[0, :, 0, 0].bool().tolist()
    assert sum(runs) == 2
    for i in range(P, model.config.num_layers):
        if not runs[i - P]:
            assert state.groups[i] == []
        else:
            (g,) = state.groups[i]
            assert g.rows is None and g.k.shape == (1, 4, T + 2, 32)
            assert (g.k.abs().sum((0, 1, 3)) > 0).tolist() == [True] * (T + 1) + [False]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(llama_layer):
    model, processor = llama_layer
    inputs = batch(processor)
    labels = inputs["input_ids"].clone()
    labels[:, :-4] = IGNORE_INDEX
    plan = torch.ones(3, 4, 2, 4)
    plan[0, 1:] = 0
    results = []
    for enabled in (False, True):
        model.train()
        if enabled:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.language_model.layers)
        model.zero_grad()
        out = model(**inputs, labels=labels, budget=[0.625, 1.0, 1.0], execution_plan=plan)
        out.loss.backward()
        results.append((out.loss.detach(), model.lm_head.weight.grad.clone()))
        model.activation_checkpointing_disable()
    model.eval()
    model.zero_grad()
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_flops_grow_with_the_budget_and_count_only_what_ran(llama_layer):
    model, processor = llama_layer
    inputs = batch(processor)
    out = model.generate(**inputs, budget=[0.5, 0.75, 1.0], max_new_tokens=4, return_dict_in_generate=True)
    f = out.flops
    assert f[0] < f[1] < f[2]
    # at layer granularity the layer FLOPs are linear in the number of layers run (same prompt, same length)
    inputs1 = processor(images=images(1) * 3, text=[prompt(processor, QUESTIONS[0])] * 3, return_tensors="pt")
    out1 = model.generate(**inputs1, budget=[0.5, 0.75, 1.0], max_new_tokens=4, eos_token_id=-1,
                          return_dict_in_generate=True)  # fmt: skip
    f = out1.flops
    torch.testing.assert_close(f[2] - f[1], f[1] - f[0])


def test_generate_errors_are_clear(llama_layer):
    model, processor = llama_layer
    inputs = batch(processor)
    with pytest.raises(ValueError, match=r"\[0\.5, 1\]"):
        model.generate(**inputs, budget=0.2)
    with pytest.raises(ValueError, match="3 budgets for a batch of 2|got 2 budgets for a batch of 3"):
        model.generate(**inputs, budget=[0.6, 0.7])
    with pytest.raises(ValueError, match=r"\[0\.5, 1\]"):
        model.generate(**inputs, budget=float("nan"))
    with pytest.raises(TypeError, match="num_beams"):
        model.generate(**inputs, num_beams=2)
    with pytest.raises(TypeError, match="budjet"):
        model(**inputs, budjet=0.5)


def test_text_only_requests_work(llama_layer):
    """No image: the first generated token is the forward pass's greedy choice at the same budget."""
    model, processor = llama_layer
    inputs = processor(text=[prompt(processor, "Is the sky blue?", image=False)], return_tensors="pt")
    out = model.generate(**inputs, budget=0.75, max_new_tokens=3, eos_token_id=-1, return_dict_in_generate=True)
    with torch.no_grad():
        logits = model(**inputs, budget=0.75).logits
    T = inputs["input_ids"].shape[1]
    assert out.num_generated.tolist() == [3] and out.sequences.shape == (1, T + 3)
    assert out.sequences[0, T] == logits[0, -1].argmax()


def test_sampling_is_reproducible_with_a_generator(llama_layer):
    model, processor = llama_layer
    inputs = batch(processor)
    runs = [
        model.generate(**inputs, budget=0.75, max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9,
                       top_k=50, generator=torch.Generator().manual_seed(seed))
        for seed in (3, 3, 4)
    ]  # fmt: skip
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # another seed, other draws: sampling samples
    greedy = model.generate(**inputs, budget=0.75, max_new_tokens=6)
    assert not torch.equal(runs[0], greedy)


def test_sampling_follows_the_distribution():
    """do_sample draws from softmax(logits / temperature), restricted to the top_k tokens and to the smallest set
    whose mass reaches top_p. 8000 draws: 4 standard errors <= 0.023."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -2.0]])
    n = 8000
    many = logits.expand(n, -1)
    g = torch.Generator().manual_seed(0)

    def freq(**kw):
        kw = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw}
        tokens = AdaLlavaForConditionalGeneration._next_token(many, True, generator=g, **kw)
        return torch.bincount(tokens, minlength=6).float() / n

    torch.testing.assert_close(freq(), logits[0].softmax(-1), atol=0.023, rtol=0)
    torch.testing.assert_close(freq(temperature=2.0), (logits[0] / 2).softmax(-1), atol=0.023, rtol=0)
    top2 = torch.zeros(6)
    top2[:2] = logits[0, :2].softmax(-1)
    torch.testing.assert_close(freq(top_k=2), top2, atol=0.023, rtol=0)
    p = logits[0].softmax(-1)  # 0.55, 0.20, 0.12, ...: top_p=0.7 keeps the first two (0.55 < 0.7 <= 0.75)
    assert p[0] < 0.7 <= p[0] + p[1]
    torch.testing.assert_close(freq(top_p=0.7), top2, atol=0.023, rtol=0)
    assert AdaLlavaForConditionalGeneration._next_token(many[:4], False, 1.0, 0, 1.0, g).tolist() == [0] * 4
    assert AdaLlavaForConditionalGeneration._next_token(many[:4], True, 0.0, 0, 1.0, g).tolist() == [0] * 4


def test_training_draws_one_budget_per_sample(llama_layer):
    """No budget in training: each sample gets its own random step of the grid (spec 2.5), and its own plan size."""
    model, processor = llama_layer
    inputs = processor(images=images(1) * 12, text=[prompt(processor, QUESTIONS[0])] * 12, return_tensors="pt")
    model.train()
    try:
        torch.manual_seed(11)
        with torch.no_grad():
            out = model(**inputs)
    finally:
        model.eval()
    torch.manual_seed(11)
    from adallava.budget import sample_training_budgets

    expected = sample_training_budgets(12, model.config)
    assert torch.equal(out.budget, expected) and len(set(expected.tolist())) >= 3
    layers_run = out.plan[:, :, 0, 0].sum(1)
    assert layers_run.tolist() == ((expected - 0.5) * 8).round().tolist()


def test_from_llava_wraps_a_plain_checkpoint(tmp_path, llama_layer):
    model, processor = llama_layer
    plain_config = {k: v for k, v in model.config.to_dict().items()
                    if k not in ("num_prefix_layers", "granularity", "group_size", "gumbel_tau", "latency_embed_dim",
                                 "model_type")}  # fmt: skip
    torch.manual_seed(1)
    plain = LlavaForConditionalGeneration(LlavaConfig(**plain_config))
    plain.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    wrapped, _ = load(tmp_path, granularity="head", num_prefix_layers=3)
    assert wrapped.config.granularity == "head" and wrapped.config.num_prefix_layers == 3
    base, ours = plain.state_dict(), wrapped.state_dict()
    assert all(torch.equal(base[k], ours[k]) for k in base)
    assert abs(float(wrapped.scheduler.mlp_head.weight.std()) - 0.02) < 0.005  # freshly drawn, std 0.02
    in_memory = AdaLlavaForConditionalGeneration.from_llava(plain)
    assert in_memory.config.num_prefix_layers == 4
    ours = in_memory.state_dict()
    assert all(torch.equal(base[k], ours[k]) for k in base)
    # budget 1.0 on the wrapped model = the plain LLaVA on the same inputs, apart from the latency token (appended
    # after the prompt, so every prompt position's logits are the plain model's)
    inputs = batch(processor)
    with torch.no_grad():
        full = in_memory(**inputs, budget=1.0)
        reference = plain.eval()(**inputs).logits
    T = inputs["input_ids"].shape[1]
    assert full.logits.shape[1] == T + 1 and full.plan.min() == 1.0
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(full.logits[:, :T][valid], reference[valid], rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path / "nowhere")
