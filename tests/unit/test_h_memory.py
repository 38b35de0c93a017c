"""AdaLLaVA-H keeps no per-request weight copies and no identity K/V index: a request's row groups hold index tensors
only (integers, far smaller than a layer), MHA models never index K/V, and results are those of the mask path."""

import torch

from adallava import modeling
from adallava.presets import build_tiny


def _generate_recording_states(model, ids, budgets, max_new_tokens=4):
    states, original = [], modeling.DecodeState

    def recording(*args, **kwargs):
        states.append(original(*args, **kwargs))
        return states[-1]

    modeling.DecodeState = recording
    try:
        out = model.generate(ids, budget=budgets, max_new_tokens=max_new_tokens, return_dict_in_generate=True)
    finally:
        modeling.DecodeState = original
    return out, states[0]


def _held(state):
    """(floating-point tensors other than the KV cache, integer bytes, KV bytes) reachable from the row groups."""
    floats, ints, kv = [], 0, 0
    for groups in state.groups.values():
        for g in groups:
            kv += sum(t.numel() * t.element_size() for t in (g.k, g.v) if t is not None)
            for value in (*vars(g.weights).values(), g.rows):
                if isinstance(value, torch.Tensor):
                    if value.is_floating_point():
                        floats.append(value)
                    else:
                        ints += value.numel() * value.element_size()
    return floats, ints, kv


def test_mixed_head_plans_hold_no_weight_copies_on_mha():
    model, _ = build_tiny("head")
    ids = torch.randint(5, 100, (4, 10), generator=torch.Generator().manual_seed(0))
    budgets = [0.5625, 0.6875, 0.8125, 0.9375]  # every row partly uses some layers, each with its own plan
    out, state = _generate_recording_states(model, ids, budgets)
    sliced = [g for groups in state.groups.values() for g in groups if g.weights.q_rows is not None]
    assert len(sliced) >= 4  # partial layers with distinct patterns exist
    floats, ints, kv = _held(state)
    assert floats == []  # no weights held: only indices
    layer_bytes = sum(p.numel() * p.element_size() for p in model._layers[0].parameters())
    assert ints < layer_bytes / 4
    assert all(g.weights.kv_map is None for groups in state.groups.values() for g in groups)  # MHA: no K/V indexing
    for i, budget in enumerate(budgets):  # and each request gets the tokens it gets alone
        alone = model.generate(ids[i : i + 1], budget=budget, max_new_tokens=4)
        assert torch.equal(alone[0], out.sequences[i])


def test_gqa_indexes_kv_only_when_kept_heads_share_kv_heads_unevenly():
    model, _ = build_tiny("head", text_model="mistral")  # 4 query heads, 2 K/V heads (0,1 -> 0; 2,3 -> 1)
    layer = model._layers[5]
    plan = torch.zeros(3, 2, 4)
    plan[0, 0, [0, 1]] = 1  # one K/V head for both: SDPA's enable_gqa, no index
    plan[1, 0, [0, 2]] = 1  # one query head per K/V head: identity, no index
    plan[2, 0, [0, 1, 2]] = 1  # uneven: each query head points at its own K/V head
    plan[:, 1, 0] = 1
    groups = model._groups_for_layer(layer, plan, False, 0, 3)
    maps = {tuple(g.rows.tolist()): (g.weights.n_q, g.weights.n_kv, g.weights.kv_map) for g in groups}
    assert maps[(0,)][:2] == (2, 1) and maps[(0,)][2] is None
    assert maps[(1,)][:2] == (2, 2) and maps[(1,)][2] is None
    assert maps[(2,)][:2] == (3, 2) and torch.equal(maps[(2,)][2], torch.tensor([0, 0, 1]))
    h = torch.randn(3, 5, 128)
    with torch.no_grad():  # and the skip path equals the mask path for these rows
        skip = model(inputs_embeds=h, execution_plan=_plan_at(model, plan, 5), plan_mode="skip").logits
        mask = model(inputs_embeds=h, execution_plan=_plan_at(model, plan, 5), plan_mode="mask").logits
    torch.testing.assert_close(skip, mask, atol=2e-5, rtol=1e-4)


def _plan_at(model, layer_plan, layer_index):
    cfg = model.config
    plan = torch.ones(layer_plan.shape[0], cfg.num_schedulable_layers, 2, cfg.num_switches)
    plan[:, layer_index - cfg.num_prefix_layers] = layer_plan
    return plan


def test_skip_equals_mask_with_partial_layers():
    model, _ = build_tiny("head", text_model="qwen2")
    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        skip = model(input_ids=ids, budget=[0.5625, 0.75, 0.9375], plan_mode="skip")
        mask = model(input_ids=ids, budget=[0.5625, 0.75, 0.9375], plan_mode="mask")
    torch.testing.assert_close(skip.logits, mask.logits, atol=2e-5, rtol=1e-4)
