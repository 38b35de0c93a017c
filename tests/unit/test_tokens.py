"""Token selection (FastV, PruMerge, PruMerge+) composed with execution plans."""

import pytest
import torch

from adallava import tokens
from adallava.presets import build_tiny
from powered import build_powered
from test_modeling import QUESTIONS, batch, images, prompt

BUDGETS = [0.5 + 5 / 32, 0.8, 1.0]  # head granularity: 1/32 steps


@pytest.fixture(scope="module")
def base():
    """With power (tests/unit/powered.py): greedy tokens vary, so cached == uncached means something."""
    return build_powered("head", "mistral")


def variant(base, **overrides):
    model, _ = build_tiny("head", "mistral", **overrides)
    model.load_state_dict(base[0].state_dict())
    return model


def test_fastv_keeps_the_most_attended_image_tokens():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.05, 0.3], [0.4, 0.1, 0.3, 0.2, 0.6, 0.7]])
    image = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    index, kept = tokens.fastv_keep(scores, image, valid, ratio=0.5)
    # row 0: 4 image tokens -> keep 2 (scores 0.9 at 3, 0.5 at 1); row 1: padding at 0 dropped, image keep 2 of 4
    assert [index[0][kept[0]].tolist(), index[1][kept[1]].tolist()] == [[0, 1, 3, 5], [1, 4, 5]]
    assert kept.shape[1] == 4 and kept[1].tolist() == [False, True, True, True]  # packed right, left-padded


def test_fastv_keeping_everything_equals_no_selection(base):
    model, processor = base
    keep_all = variant(base, token_selection="fastv", fastv_ratio=0.0)
    inputs = batch(processor)
    kw = dict(budget=BUDGETS, max_new_tokens=6, return_dict_in_generate=True)
    a, b = model.generate(**inputs, **kw), keep_all.generate(**inputs, **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.flops, b.flops)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, budget=BUDGETS).logits, keep_all(**inputs, budget=BUDGETS).logits)


@pytest.mark.parametrize("selection", ["fastv", "prumerge", "prumerge+"])
def test_selection_composes_with_plans_and_generation(base, selection):
    """Through generation with a cache: cached == uncached, a mixed-budget batch == one by one, masked == skipped,
    fewer FLOPs than no selection, and training still sends gradients to the scheduler."""
    _, processor = base
    model = variant(base, token_selection=selection)
    inputs = batch(processor)
    kw = dict(budget=BUDGETS, max_new_tokens=6, return_dict_in_generate=True)
    cached = model.generate(**inputs, **kw)
    assert torch.equal(cached.sequences, model.generate(**inputs, use_cache=False, **kw).sequences)
    for i in range(3):
        alone = model.generate(**processor(images=images(3)[i], text=prompt(processor, QUESTIONS[i]), return_tensors="pt"),
                               budget=BUDGETS[i], max_new_tokens=6, return_dict_in_generate=True)  # fmt: skip
        assert torch.equal(alone.sequences[0, -6:], cached.sequences[i, -6:])
        assert alone.flops[0] == cached.flops[i]
    assert (cached.flops < base[0].generate(**inputs, **kw).flops).all()
    with torch.no_grad():
        masked, skipped = model(**inputs, budget=BUDGETS, plan_mode="mask"), model(**inputs, budget=BUDGETS, plan_mode="skip")
    torch.testing.assert_close(masked.logits, skipped.logits, rtol=1e-5, atol=1e-5)
    if selection == "fastv":  # R = 0.5 of each image's 16 tokens dropped after layer K: exactly 8 fewer positions
        assert masked.logits.shape[1] == inputs["input_ids"].shape[1] + 1 - 8
    else:
        assert masked.logits.shape[1] < inputs["input_ids"].shape[1] + 1  # the sequence really got shorter
    model.train()
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    out = model(**inputs, labels=labels, budget=BUDGETS)
    out.loss.backward()
    model.eval()
    assert out.labels.shape == out.logits.shape[:2] and (out.labels != -100).sum() == 3 * 3
    assert model.scheduler.mlp_head.weight.grad.abs().sum() > 0


def test_prumerge_keeps_outliers_merges_neighbours_and_adds_one_token():
    torch.manual_seed(0)
    P, D = 16, 4
    attn = torch.full((1, P), 0.01)
    attn[0, [3, 9]] = torch.tensor([0.5, 0.3])  # two clear outliers
    feats = torch.randn(1, P, D)
    keys = torch.randn(1, P, 8)
    out, valid = tokens.prumerge(feats, attn, keys, neighbours=P)
    assert valid.sum() == 3  # 2 outliers + the merged-remainder token
    pruned = [j for j in range(P) if j not in (3, 9)]
    w = attn[0, pruned]
    torch.testing.assert_close(out[0, 2], (w[:, None] * feats[0, pruned]).sum(0))  # LLaVA-PruMerge: a sum
    # with every neighbour merged, a kept token is itself plus the attention-weighted sum of all the other patches
    # (kept ones too); kept tokens come in attention order (3 before 9)
    others = [j for j in range(P) if j != 3]
    torch.testing.assert_close(out[0, 0], feats[0, 3] + (attn[0, others, None] * feats[0, others]).sum(0))
    _, valid_plus = tokens.prumerge(feats, attn, keys, plus=True)
    # PruMerge+ adds spatially uniform patches: stride 16 // (3 * 2 outliers) = 2, so patches 0, 2, .., 14 (8) and
    # the outliers 3 and 9, plus the merged-remainder token
    assert valid_plus.sum() == 8 + 2 + 1


def test_prumerge_rejects_a_placeholder_count_that_does_not_match(base):
    _, processor = base
    model = variant(base, token_selection="prumerge")
    inputs = batch(processor)
    inputs["input_ids"][0, inputs["input_ids"][0] == model.config.image_token_id] = 5  # one image loses its tokens
    with pytest.raises(ValueError, match="placeholder tokens for 3 images"):
        model.generate(**inputs, budget=1.0)


def test_bad_selection_config_is_rejected():
    with pytest.raises(ValueError, match="fastv_k must be in"):
        build_tiny(token_selection="fastv", fastv_k=7)
    with pytest.raises(ValueError, match="fastv_ratio"):
        build_tiny(token_selection="fastv", fastv_ratio=1.0)


def test_fastv_defaults_are_the_papers():
    model, _ = build_tiny(token_selection="fastv")
    assert (model.config.fastv_k, model.config.fastv_ratio) == (2, 0.5)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_fastv_drops_exactly_its_fraction_inside_the_model(base, ratio):
    """Inside the decoder loop, after layer K every row keeps its text, its latency token and (1 - R) of its image
    tokens (the most attended ones by the latency token), and nothing else."""
    _, processor = base
    model = variant(base, token_selection="fastv", fastv_ratio=ratio)
    inputs = batch(processor)
    with torch.no_grad():
        embeds = model.embed_inputs(inputs["input_ids"], inputs["pixel_values"])
        budget = torch.tensor(BUDGETS, dtype=torch.float64)
        h, mask, _, pos = model.insert_latency_token(embeds, inputs["attention_mask"], None, model.latency_token(budget))
        image_mask = torch.cat([inputs["input_ids"] == model.config.image_token_id, torch.zeros(3, 1, dtype=torch.bool)], 1)
        selection = {}
        model.decode(h, mask.bool(), (mask.cumsum(-1) - 1).clamp(min=0), budget, pos, image_mask=image_mask,
                     selection=selection)  # fmt: skip
    n_image = int(image_mask[0].sum())
    dropped = int(n_image * ratio)
    assert n_image == 16
    assert selection["valid"].sum(1).tolist() == (mask.sum(1) - dropped).tolist()
    kept = selection["index"].masked_fill(~selection["valid"], -1)
    for row in range(3):
        positions = [int(j) for j in kept[row] if j >= 0]
        kept_image = [j for j in positions if image_mask[row, j]]
        assert len(kept_image) == n_image - dropped
        text = [j for j in range(h.shape[1]) if mask[row, j] and not image_mask[row, j]]
        assert set(text) <= set(positions)  # text and the latency token are never dropped
