"""How one gated layer runs for a plan, and what it caches (spec 1.6, 2.4): the plan/cache functions of
adallava/modeling.py (`_full_weights`, `_sliced_weights`, `_groups_for_layer`, `_run_layer`, `resolve_budget`,
`latency_token`) against a reference decoder layer written out here in plain tensor algebra.

A plan switches heads and MLP neuron groups of a schedulable layer on or off. The specification of a partly used
layer: its output equals the full layer's with the switched-off heads' outputs and neuron groups' activations set to
zero before o_proj / down_proj, and the biases of o_proj / down_proj counted only when some head / group of that block
runs. A skipped block adds nothing. The KV cache of a layer holds exactly the K/V heads its kept query heads use, at the
slots of the tokens run. The models are tiny and random, built here (2 layers, 4 heads of 32, one variant of 16, no
hub access), with weights redrawn at std 0.15 so every output depends on the whole computation.
"""

import pytest
import torch

from adallava.budget import encoder_input, sample_training_budgets
from adallava.modeling import AdaLlavaForConditionalGeneration, _full_weights, _Group, _sliced_weights
from adallava.presets import tiny_config
from powered import power_up

HEAD_DIM = 32


def build(text_model="llama", **overrides):
    cfg = tiny_config("head", text_model, num_hidden_layers=2, fastv_k=1, **overrides)
    torch.manual_seed(0)
    model = power_up(AdaLlavaForConditionalGeneration(cfg).eval())
    with torch.no_grad():  # biases (when the model has them) and norm scales away from their 0 / 1 initial values
        g = torch.Generator().manual_seed(1)
        for _, p in model.model.language_model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def llama():  # MHA, 344 neurons (4 groups of 86), o_proj and down_proj with biases
    return build("llama", attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def qwen2():  # GQA (2 query heads per K/V head), 346 neurons: groups of 87, 87, 86, 86
    return build("qwen2")


def layer_of(model, i=1):
    return model.model.language_model.layers[i]


def rotate(x, cos, sin):  # RoPE on [b, heads, T, d] with cos/sin [b, T, d]
    x1, x2 = x.chunk(2, -1)
    return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]


def reference_qkv(layer, h, cos, sin):
    """Full-layer q [b, H, T, d] and the K/V heads [b, Hkv, T, d], RoPE applied."""
    a = layer.self_attn
    b, T, _ = h.shape
    x = layer.input_layernorm(h)
    q = a.q_proj(x).view(b, T, -1, HEAD_DIM).transpose(1, 2)
    k = a.k_proj(x).view(b, T, -1, HEAD_DIM).transpose(1, 2)
    v = a.v_proj(x).view(b, T, -1, HEAD_DIM).transpose(1, 2)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def reference_layer(layer, h, cos, sin, mask, heads_on=None, groups_on=None, sizes=None, kv=None):
    """The spec's layer: heads_on [b, H] / groups_on [b, G] (0/1, None: all on) zero the switched-off heads' outputs
    and neuron groups' activations; a block's bias counts when any of its switches is on. kv: (k, v) [b, Hkv, n, d]
    to attend to instead of this call's own keys (a cache)."""
    a, mlp = layer.self_attn, layer.mlp
    b, T, D = h.shape
    H = a.q_proj.out_features // HEAD_DIM
    heads_on = torch.ones(b, H) if heads_on is None else heads_on.float()
    q, k, v = reference_qkv(layer, h, cos, sin)
    if kv is not None:
        k, v = kv
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) * a.scaling
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    o = (p @ v) * heads_on[:, :, None, None]  # [b, H, T, d]
    o = o.transpose(1, 2).reshape(b, T, -1) @ a.o_proj.weight.T
    if a.o_proj.bias is not None:
        o = o + a.o_proj.bias * heads_on.amax(-1)[:, None, None]
    h = h + o  # every head off: o is zero, bias included (the block does not run)
    x = layer.post_attention_layernorm(h)
    act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    G = len(sizes)
    groups_on = torch.ones(b, G) if groups_on is None else groups_on.float()
    neuron_on = groups_on.repeat_interleave(torch.tensor(sizes), dim=1)  # [b, I]
    o = (act * neuron_on[:, None]) @ mlp.down_proj.weight.T
    if mlp.down_proj.bias is not None:
        o = o + mlp.down_proj.bias * groups_on.amax(-1)[:, None, None]
    return h + o


def inputs(model, b=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, T, model.config.text_config.hidden_size, generator=g)
    pos = torch.arange(T)[None].expand(b, -1) + torch.arange(b)[:, None]  # rows at different positions: RoPE matters
    cos, sin = model.model.language_model.rotary_emb(h, pos)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(b, 1, T, T).clone()
    return h, cos, sin, mask


def neuron_groups(model):
    bounds = [0, *torch.tensor(model._neuron_group_sizes).cumsum(0).tolist()]
    return [torch.arange(a, c) for a, c in zip(bounds, bounds[1:])]


def rows_of(heads):
    return torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads]) if heads else None


# ------------------------------------------------------------------------------------------------ which weights run


def test_full_weights_are_every_head_and_neuron(llama, qwen2):
    for model, n_kv in ((llama, 4), (qwen2, 2)):
        layer = layer_of(model)
        w = _full_weights(layer, model._n_rep)
        assert (w.layer, w.n_q, w.n_kv, w.kv_map, w.q_rows, w.kv_rows, w.neurons, w.mlp) == (
            layer, 4, n_kv, None, None, None, None, True
        )  # fmt: skip
        assert torch.equal(w.q_w, layer.self_attn.q_proj.weight) and torch.equal(w.d_w, layer.mlp.down_proj.weight)
        assert model.full_layer_weights(layer).n_kv == n_kv


@pytest.mark.parametrize(
    "heads, kv_heads, kv_map",
    [
        ([0, 2, 3], [0, 1], [0, 1, 1]),  # K/V head 0 serves one query head, head 1 two: an explicit map
        ([0, 1], [0], None),  # one K/V head for both: SDPA's grouped-query attention, no index
        ([1, 2], [0, 1], None),  # one query head per K/V head: the identity
        ([3], [1], None),
        ([], [], None),  # attention skipped
    ],
)
def test_sliced_weights_keep_the_query_heads_and_their_kv_heads(qwen2, heads, kv_heads, kv_map):
    layer = layer_of(qwen2)
    heads_on = torch.zeros(4, dtype=torch.bool)
    heads_on[heads] = True
    groups_on = torch.tensor([False, True, False, True])
    w = _sliced_weights(layer, heads_on, groups_on, qwen2._n_rep, neuron_groups(qwen2))
    assert (w.n_q, w.n_kv) == (len(heads), len(kv_heads))
    assert (w.kv_map is None and kv_map is None) or w.kv_map.tolist() == kv_map
    if heads:
        assert torch.equal(w.q_rows, rows_of(heads)) and torch.equal(w.kv_rows, rows_of(kv_heads))
        assert torch.equal(w.q_w, layer.self_attn.q_proj.weight[rows_of(heads)])
        assert torch.equal(w.k_w, layer.self_attn.k_proj.weight[rows_of(kv_heads)])
        assert torch.equal(w.o_w, layer.self_attn.o_proj.weight[:, rows_of(heads)])
    else:
        assert w.q_rows is None and w.kv_rows is None and w.q_w is None and w.o_w is None
    # neuron groups 1 and 3 of 87, 87, 86, 86
    assert w.mlp and w.neurons.tolist() == list(range(87, 174)) + list(range(260, 346))
    assert torch.equal(w.g_w, layer.mlp.gate_proj.weight[w.neurons])


def test_sliced_weights_without_neuron_groups_skip_the_mlp(llama):
    layer = layer_of(llama)
    w = _sliced_weights(layer, torch.tensor([True, False, False, True]), torch.zeros(4, dtype=torch.bool), 1,
                        neuron_groups(llama))  # fmt: skip
    assert (w.n_q, w.n_kv, w.kv_map, w.neurons, w.mlp) == (2, 2, None, None, False)
    assert w.g_w is None and w.d_w is None
    assert torch.equal(w.q_rows, rows_of([0, 3])) and torch.equal(w.kv_rows, rows_of([0, 3]))


# ------------------------------------------------------------------------------------------------ grouping rows


def plan_rows(*rows):
    """[B, 2, 4] plans from strings like '1011/0110' (heads / neuron groups)."""
    return torch.tensor([[[float(c) for c in part] for part in r.split("/")] for r in rows])


def test_rows_are_grouped_by_how_they_run_the_layer(qwen2):
    """Full rows share the full layer, skipped rows are in no group, rows with the same partial pattern share one
    slice; each group that runs attention holds a zeroed [rows, K/V heads, capacity, head_dim] cache."""
    layer = layer_of(qwen2)
    plan = plan_rows("1111/1111", "0000/0000", "1000/0011", "0110/1000", "1000/0011", "0000/0100")
    groups = qwen2._groups_for_layer(layer, plan, True, 9, 6)
    by_rows = {tuple(g.rows.tolist()): g for g in groups}
    assert sorted(by_rows) == [(0,), (2, 4), (3,), (5,)] and len(groups) == 4
    full, a, b, mlp_only = by_rows[(0,)], by_rows[(2, 4)], by_rows[(3,)], by_rows[(5,)]
    assert (full.weights.n_q, full.weights.n_kv, full.weights.neurons) == (4, 2, None)
    assert (a.weights.n_q, a.weights.n_kv, a.weights.neurons.tolist()) == (1, 1, list(range(174, 346)))
    assert (b.weights.n_q, b.weights.n_kv, b.weights.kv_map, b.weights.neurons.tolist()) == (2, 2, None,
                                                                                               list(range(87)))
    assert (mlp_only.weights.n_q, mlp_only.weights.neurons.tolist()) == (0, list(range(87, 174)))
    assert full.k.shape == (1, 2, 9, HEAD_DIM) and a.k.shape == (2, 1, 9, HEAD_DIM) and b.v.shape == (1, 2, 9, 32)
    for g in (full, a, b):
        assert g.k.dtype == qwen2.dtype and not g.k.any() and not g.v.any() and g.k is not g.v
    assert mlp_only.k is None and mlp_only.v is None  # no attention: no cache
    assert all(g.k is None for g in qwen2._groups_for_layer(layer, plan, False, 9, 6))


def test_a_batch_that_runs_the_whole_layer_is_one_group_over_every_row(llama):
    layer = layer_of(llama)
    (g,) = llama._groups_for_layer(layer, torch.ones(3, 2, 4), True, 7, 3)
    assert g.rows is None and (g.weights.n_q, g.weights.n_kv, g.weights.mlp) == (4, 4, True)
    assert g.k.shape == (3, 4, 7, HEAD_DIM) and g.v.shape == (3, 4, 7, HEAD_DIM)
    assert llama._groups_for_layer(layer, torch.zeros(3, 2, 4), True, 7, 3) == []  # skipped by every row


# ------------------------------------------------------------------------------------------------ running a layer


@pytest.mark.parametrize("T", [2, 4, 5])  # as many tokens as K/V heads (qwen2), as query heads, neither
def test_the_full_layer_is_the_reference_layer(llama, qwen2, T):
    for model in (llama, qwen2):
        layer = layer_of(model)
        h, cos, sin, mask = inputs(model, T=T)
        with torch.no_grad():
            out = model._run_layer(layer, _full_weights(layer, model._n_rep), h, cos, sin, mask)
            ref = reference_layer(layer, h, cos, sin, mask, sizes=model._neuron_group_sizes)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("heads, groups", [([0, 2, 3], [1, 3]), ([1], [0]), ([0, 1], []), ([], [2]), ([3], [0, 1, 2])])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_sliced_layer_is_the_layer_with_the_other_heads_and_groups_switched_off(llama, qwen2, arch, heads, groups):
    """Skip mode (weights sliced to the kept heads and neuron groups) and mask mode (full weights, switches as
    multipliers) both give the spec's output, biases counted only for a block that runs."""
    model = {"llama": llama, "qwen2": qwen2}[arch]
    layer = layer_of(model)
    h, cos, sin, mask = inputs(model, seed=len(heads))
    heads_on, groups_on = torch.zeros(2, 4), torch.zeros(2, 4)
    heads_on[:, heads], groups_on[:, groups] = 1, 1
    with torch.no_grad():
        ref = reference_layer(layer, h, cos, sin, mask, heads_on, groups_on, model._neuron_group_sizes)
        w = _sliced_weights(layer, heads_on[0].bool(), groups_on[0].bool(), model._n_rep, neuron_groups(model))
        sliced = model._run_layer(layer, w, h, cos, sin, mask)
        masked = model._run_layer(layer, _full_weights(layer, model._n_rep), h, cos, sin, mask, head_mask=heads_on,
                                  mlp_mask=groups_on)  # fmt: skip
    torch.testing.assert_close(sliced, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(masked, ref, rtol=1e-4, atol=1e-4)


def test_mask_mode_switches_each_row_by_its_own_plan(llama):
    """Rows of one batch with different switches (mask mode): each row gets its own plan's output; a row with every
    switch off passes through unchanged (no bias either)."""
    layer = layer_of(llama)
    h, cos, sin, mask = inputs(llama, b=3)
    heads_on = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    groups_on = torch.tensor([[0.0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    with torch.no_grad():
        out = llama._run_layer(layer, _full_weights(layer, 1), h, cos, sin, mask, head_mask=heads_on,
                               mlp_mask=groups_on)  # fmt: skip
        ref = reference_layer(layer, h, cos, sin, mask, heads_on, groups_on, llama._neuron_group_sizes)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], h[1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ the KV cache


@pytest.mark.parametrize("heads", [[0, 2, 3], [0, 1, 2, 3], [2]])
def test_prefill_then_decode_caches_the_kept_kv_heads_at_their_slots(qwen2, heads):
    """A prefill of T tokens (slot 0 unless told otherwise) writes slots 0..T-1 of the group's cache with the kept
    K/V heads (RoPE applied to K), nothing else; a decode step writes slot T and attends to all T+1 cached keys: the
    same output as the reference layer over the whole sequence at that position."""
    layer = layer_of(qwen2)
    T, cap = 5, 8
    h, cos, sin, mask = inputs(qwen2, b=2, T=T + 1, seed=3)
    on = torch.zeros(4, dtype=torch.bool)
    on[heads] = True
    groups_on = torch.tensor([True, False, True, True])
    w = _sliced_weights(layer, on, groups_on, 2, neuron_groups(qwen2))
    kv = torch.unique(torch.tensor(heads) // 2)
    g = _Group(None, w, torch.zeros(2, len(kv), cap, HEAD_DIM), torch.zeros(2, len(kv), cap, HEAD_DIM))
    heads_on, groups = torch.zeros(2, 4), groups_on.float().expand(2, -1)
    heads_on[:, heads] = 1
    with torch.no_grad():
        ref = reference_layer(layer, h, cos, sin, mask, heads_on, groups, qwen2._neuron_group_sizes)
        _, k_ref, v_ref = reference_qkv(layer, h, cos, sin)
        pre = qwen2._run_layer(layer, w, h[:, :T], cos[:, :T], sin[:, :T], mask[:, :, :T, :T], g)  # slot 0: default
        torch.testing.assert_close(pre, ref[:, :T], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g.k[:, :, :T], k_ref[:, kv, :T], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g.v[:, :, :T], v_ref[:, kv, :T], rtol=1e-6, atol=1e-6)
        assert not g.k[:, :, T:].any() and not g.v[:, :, T:].any()
        step = qwen2._run_layer(layer, w, h[:, T:], cos[:, T:], sin[:, T:], mask[:, :, T:, : T + 1], g, T)
    torch.testing.assert_close(step, ref[:, T:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g.k[:, :, : T + 1], k_ref[:, kv], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g.v[:, :, : T + 1], v_ref[:, kv], rtol=1e-6, atol=1e-6)
    assert not g.k[:, :, T + 1 :].any() and not g.v[:, :, T + 1 :].any()


def test_a_decode_token_per_row_at_its_own_slot(llama):
    """Continuous batching: one token per row, row r written at slot[r] only, attending to the cache up to the mask's
    key length (here: row 0 at slot 2 sees slots 0..2, row 1 at slot 4 sees 0..4)."""
    layer = layer_of(llama)
    cap = 6
    g0 = torch.Generator().manual_seed(5)
    k_cache, v_cache = torch.randn(2, 4, cap, HEAD_DIM, generator=g0), torch.randn(2, 4, cap, HEAD_DIM, generator=g0)
    group = _Group(None, _full_weights(layer, 1), k_cache.clone(), v_cache.clone())
    h, _, _, _ = inputs(llama, b=2, T=1, seed=6)
    slots = torch.tensor([2, 4])
    cos, sin = llama.model.language_model.rotary_emb(h, slots[:, None])
    n_keys = 5
    mask = (torch.arange(n_keys)[None] <= slots[:, None])[:, None, None]  # [2, 1, 1, 5]
    with torch.no_grad():
        out = llama._run_layer(layer, group.weights, h, cos, sin, mask, group, slots)
        _, k_new, v_new = reference_qkv(layer, h, cos, sin)
        expected_k, expected_v = k_cache.clone(), v_cache.clone()
        expected_k[[0, 1], :, slots] = k_new[:, :, 0]
        expected_v[[0, 1], :, slots] = v_new[:, :, 0]
        ref = reference_layer(layer, h, cos, sin, mask, sizes=llama._neuron_group_sizes,
                              kv=(expected_k[:, :, :n_keys], expected_v[:, :, :n_keys]))  # fmt: skip
    torch.testing.assert_close(group.k, expected_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(group.v, expected_v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ budget and token


def test_budgets_resolve_to_the_full_model_at_inference_and_one_random_step_per_sample_in_training(llama):
    assert llama.resolve_budget(None, 3).tolist() == [1.0, 1.0, 1.0]
    assert llama.resolve_budget(None, 3).dtype == torch.float64
    b = llama.resolve_budget([0.75, 0.625], 2)
    assert b.dtype == torch.float64 and b.tolist() == [0.75, 0.625]
    assert llama.resolve_budget(0.875, 2).tolist() == [0.875, 0.875]
    with pytest.raises(ValueError, match=r"\[0\.5, 1\]"):
        llama.resolve_budget(0.25, 1)
    llama.train()
    try:
        torch.manual_seed(7)
        drawn = llama.resolve_budget(None, 64)
        torch.manual_seed(7)
        assert torch.equal(drawn, sample_training_budgets(64, llama.config))
        assert llama.resolve_budget([0.75], 1).tolist() == [0.75]  # a given budget is used in training too
    finally:
        llama.eval()
    assert len(set(drawn.tolist())) >= 3


def test_the_latency_token_encodes_each_rows_budget(llama):
    budget = torch.tensor([0.5, 0.75, 1.0], dtype=torch.float64)
    with torch.no_grad():
        tok = llama.latency_token(budget)
        ref = llama.latency_encoder(encoder_input(budget, llama.config))
    assert tok.shape == (3, llama.config.text_config.hidden_size)
    torch.testing.assert_close(tok, ref, rtol=0, atol=0)
    assert (tok[0] - tok[1]).abs().max() > 1e-3 and (tok[1] - tok[2]).abs().max() > 1e-3


def test_a_model_whose_heads_do_not_fill_the_hidden_size_in_bfloat16():
    """head_dim 16 with hidden 128 and 4 heads (q_proj is 64 x 128): the layer has 4 query heads, and the caches of
    its row groups are [rows, K/V heads, capacity, 16] in the model's own dtype."""
    model = build("llama", head_dim=16).to(torch.bfloat16)
    layer = layer_of(model)
    assert layer.self_attn.q_proj.weight.shape == (64, 128)
    w = _full_weights(layer, 1)
    assert (w.n_q, w.n_kv) == (4, 4)
    groups = model._groups_for_layer(layer, plan_rows("1111/1111", "0100/0010"), True, 6, 2)
    assert [(tuple(g.k.shape), tuple(g.v.shape)) for g in groups] == [((1, 4, 6, 16),) * 2, ((1, 1, 6, 16),) * 2]
    assert all(g.k.dtype == g.v.dtype == torch.bfloat16 for g in groups)
