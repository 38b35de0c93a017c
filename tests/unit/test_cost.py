"""FLOPs, roofline, measured cost tables and budgets in milliseconds."""

import pytest
import torch

from adallava import cost
from adallava.presets import build_tiny


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("layer")


def synthetic_table(layer_ms=10.0):
    # 8 layers, 4 prefix: budget b costs (4 + k) * 10 ms + 1 (scheduler) + 1 (lm_head) + 5 per image
    return {
        "device": "test", "model": "m", "granularity": "layer", "num_layers": 8, "num_prefix_layers": 4,
        "units_per_layer": 1, "layers": [{"seq_len": 10, "layer_ms": layer_ms, "attention_ms": 4.0},
                                         {"seq_len": 100, "layer_ms": layer_ms, "attention_ms": 4.0}],
        "scheduler_ms": 1.0, "lm_head_ms": 1.0, "vision_ms_per_image": 5.0,
    }  # fmt: skip


def test_layer_flops_by_hand():
    # q,k,v,o: 2*n*hidden*head_dim*(2*nq + 2*nkv) = 2*2*2*1*8 = 64; attention 2*2*nq*d*(1+2) = 24; MLP 3*2*2*2*3 = 72
    assert cost.layer_flops(hidden=2, head_dim=1, n_q=2, n_kv=2, n_neurons=3, n_new=2, n_ctx_start=0) == 160


def test_request_flops_count_skipped_layers_as_zero(tiny):
    model, _ = tiny
    cfg = model.config
    full = torch.ones(1, 4, 2, 4)
    half = torch.zeros(1, 4, 2, 4)
    f_full = cost.request_flops(cfg, full, torch.tensor([20]), torch.tensor([1]))
    f_half = cost.request_flops(cfg, half, torch.tensor([20]), torch.tensor([1]))
    text = cfg.text_config
    one_layer = cost.layer_flops(text.hidden_size, 32, 4, 4, text.intermediate_size, 20, 0)
    torch.testing.assert_close(f_full - f_half, torch.tensor([4 * one_layer], dtype=torch.float64))


def test_roofline_falls_with_the_plan_and_rejects_unknown_hardware(tiny):
    model, _ = tiny
    full, half = torch.ones(1, 4, 2, 4), torch.zeros(1, 4, 2, 4)
    assert cost.roofline_prefill_seconds(model.config, half, 600) < cost.roofline_prefill_seconds(model.config, full, 600)
    assert cost.roofline_prefill_seconds(model.config, full, 600, "H100") < cost.roofline_prefill_seconds(
        model.config, full, 600, "V100"
    )
    with pytest.raises(ValueError, match="unknown hardware 'TPU'"):
        cost.roofline_prefill_seconds(model.config, full, 600, "TPU")


def test_budget_for_latency_picks_the_largest_budget_that_fits():
    t = synthetic_table()
    assert cost.predict_prefill_ms(t, 0.5, 50) == 42.0 and cost.predict_prefill_ms(t, 1.0, 50, 1) == 87.0
    assert cost.budget_for_latency(t, 62.0, 50) == 0.75  # 4+2 layers = 60 + 2
    assert cost.budget_for_latency(t, 61.9, 50) == 0.625
    assert cost.budget_for_latency(t, 1000.0, 50) == 1.0
    with pytest.raises(ValueError, match=r"42\.0 ms \(budget 0\.5\) to 82\.0 ms"):
        cost.budget_for_latency(t, 30.0, 50)
    for bad in (0, -5, float("nan"), "10", None):
        with pytest.raises(ValueError, match="latency_ms must be a positive number"):
            cost.budget_for_latency(t, bad, 50)


def test_profile_save_load_and_generate_with_latency_ms(tiny, tmp_path):
    model, processor = tiny
    table = cost.profile_latency(model, seq_lens=(16, 48), repeats=1)
    assert table["model"] == cost.model_signature(model.config)
    assert all(r["layer_ms"] > 0 and r["attention_ms"] > 0 for r in table["layers"]) and table["vision_ms_per_image"] > 0
    cost.save_cost_table(table, tmp_path / "t.json")
    assert cost.load_cost_table(tmp_path / "t.json", model) == table
    assert list(tmp_path.iterdir()) == [tmp_path / "t.json"]  # no temporary file left behind
    other, _ = build_tiny("layer", num_prefix_layers=3)
    with pytest.raises(ValueError, match="cost table is for model"):
        cost.load_cost_table(tmp_path / "t.json", other)

    inputs = processor(text=["USER: hi ASSISTANT:"] * 2, return_tensors="pt")
    with pytest.raises(ValueError, match="needs a cost table"):
        model.generate(**inputs, latency_ms=50.0)
    model.cost_table = synthetic_table()
    try:
        seq = inputs["input_ids"].shape[1] + 1
        assert cost.predict_prefill_ms(model.cost_table, 0.75, seq) == 62.0
        out = model.generate(**inputs, latency_ms=[62.0, 1000.0], max_new_tokens=1, return_dict_in_generate=True)
        assert out.budget.tolist() == [0.75, 1.0]
        capped = model.generate(**inputs, latency_ms=1000.0, budget=0.625, max_new_tokens=1, return_dict_in_generate=True)
        assert capped.budget.tolist() == [0.625, 0.625]  # both are caps: the smaller wins
        with pytest.raises(ValueError, match="3 latency_ms targets for a batch of 2"):
            model.generate(**inputs, latency_ms=[50.0, 60.0, 70.0])
    finally:
        del model.cost_table


def test_flops_breakdown_parts_add_up_and_follow_the_plan(tiny):
    model, processor = tiny
    inputs = processor(images=[__import__("PIL.Image").Image.new("RGB", (32, 32))] * 2,
                       text=["USER: <image>\nWhat colour? ASSISTANT:"] * 2, return_tensors="pt")  # fmt: skip
    out = model.generate(**inputs, budget=[0.5, 1.0], max_new_tokens=3, eos_token_id=-1, return_dict_in_generate=True)
    for detail, total in zip(out.flops_breakdown, out.flops.tolist()):
        assert sum(detail["prefill"].values()) + sum(detail["decode"].values()) == pytest.approx(total)
        assert sum(detail["layers"]) == pytest.approx(detail["prefill"]["attention"] + detail["prefill"]["mlp"]
                                                      + detail["decode"]["attention"] + detail["decode"]["mlp"])
        assert detail["prefill"]["vision_tower"] > 0 and detail["prefill"]["projector"] > 0
        assert detail["decode"]["lm_head"] == 2 * detail["prefill"]["lm_head"]  # 3 tokens: 1 at prefill, 2 decoded
    low, full = out.flops_breakdown
    assert low["layers"][4:] == [0.0] * 4 and all(x > 0 for x in full["layers"])  # budget 0.5: prefix only
    text_only = model.generate(**processor(text=["USER: hi ASSISTANT:"], return_tensors="pt"), max_new_tokens=1,
                               return_dict_in_generate=True)  # fmt: skip
    assert text_only.flops_breakdown[0]["prefill"]["vision_tower"] == 0
    assert sum(text_only.flops_breakdown[0]["decode"].values()) == 0
