"""Budget -> plan size (spec 2.1), the encoder's quantisation (spec 1.3), training budgets (spec 2.5), bad budgets."""

import math

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig

from adallava import budget
from adallava.config import AdaLlavaConfig, default_group_size


def vicuna7b_config(granularity):
    text = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, hidden_size=4096, intermediate_size=11008)
    return AdaLlavaConfig(vision_config=CLIPVisionConfig(), text_config=text, granularity=granularity)


@pytest.mark.parametrize(
    "b, k",
    [(1.0, 16), (0.85, 11), (0.6, 3), (0.5, 0), (17 / 32, 1), (0.53, 0), (0.999, 15), (27 / 32, 11), (19 / 32, 3)],
)
def test_layer_units_match_spec_table(b, k):
    cfg = vicuna7b_config("layer")
    assert cfg.num_prefix_layers == 16 and cfg.units_per_layer == 1
    assert budget.units_for_budget(torch.tensor([b]), cfg).item() == k


@pytest.mark.parametrize("b, k", [(1.0, 64), (0.85, 44), (0.6, 12), (0.5, 0), (65 / 128, 1), (0.75, 32)])
def test_head_units_match_spec_table(b, k):
    # H: 32 heads in groups of 8 -> 4 units per layer; k_u = floor(128 b) - 64
    cfg = vicuna7b_config("head")
    assert cfg.group_size == 8 and cfg.units_per_layer == 4
    assert budget.units_for_budget(torch.tensor([b]), cfg).item() == k


def test_exact_grid_budgets_are_not_floored_away():
    # k/(uL) * (uL) can land a hair below k in floating point; every grid step must give its own k
    for granularity in ("layer", "head"):
        cfg = vicuna7b_config(granularity)
        grid = budget.budget_grid(cfg)
        ks = budget.units_for_budget(torch.tensor(grid, dtype=torch.float64), cfg).tolist()
        assert ks == list(range(len(grid)))
        assert grid[0] == 0.5 and grid[-1] == 1.0


def test_encoder_input_quantisation():
    cfg = vicuna7b_config("layer")
    q = budget.encoder_input(torch.tensor([1.0, 0.5, 0.6]), cfg)
    assert torch.allclose(q, torch.tensor([16 / 17, 0.0, 3 / 17], dtype=torch.float64))
    cfg = vicuna7b_config("head")
    assert budget.encoder_input(torch.tensor([1.0]), cfg).item() == pytest.approx(64 / 65)


def test_training_budgets_are_uniform_over_the_grid():
    cfg = vicuna7b_config("layer")
    g = torch.Generator().manual_seed(0)
    b = budget.sample_training_budgets(17000, cfg, generator=g)
    values, counts = torch.unique(b, return_counts=True)
    assert values.tolist() == budget.budget_grid(cfg)
    assert counts.min() > 850 and counts.max() < 1150  # 1000 expected per step


@pytest.mark.parametrize("bad", [0.3, 1.2, -1.0, float("nan"), "0.7", None, [0.6, float("nan")], True])
def test_bad_budgets_raise_naming_the_range(bad):
    cfg = vicuna7b_config("layer")
    with pytest.raises(ValueError, match=r"\[0\.5, 1\]"):
        budget.validate_budget(bad, 2, cfg)


def test_budget_list_of_wrong_length_raises():
    cfg = vicuna7b_config("layer")
    with pytest.raises(ValueError, match="3 budgets for a batch of 2"):
        budget.validate_budget([0.6, 0.7, 0.8], 2, cfg)


def test_budget_accepts_scalar_list_and_tensor():
    cfg = vicuna7b_config("layer")
    assert budget.validate_budget(0.75, 3, cfg).tolist() == [0.75] * 3
    assert budget.validate_budget([0.5, 1.0], 2, cfg).tolist() == [0.5, 1.0]
    assert budget.validate_budget(torch.tensor(0.6, dtype=torch.float64), 2, cfg).tolist() == [0.6, 0.6]
    # a float32 budget just below a step (0.7 -> 0.69999999) still gets that step's plan size
    text = LlamaConfig(num_hidden_layers=10, num_attention_heads=4, hidden_size=64)
    cfg10 = AdaLlavaConfig(text_config=text, num_prefix_layers=5)
    b32 = budget.validate_budget(torch.tensor([0.7], dtype=torch.float32), 1, cfg10)
    assert budget.units_for_budget(b32, cfg10).tolist() == [2]


def test_config_defaults_and_errors():
    assert [default_group_size(h) for h in (32, 4, 9, 14, 40)] == [8, 1, 3, 7, 8]  # 40: the official rank 8
    cfg = vicuna7b_config("layer")
    assert cfg.gumbel_tau == 5.0 and cfg.latency_embed_dim == 256
    text = LlamaConfig(num_hidden_layers=40, num_attention_heads=40, hidden_size=5120)
    assert AdaLlavaConfig(text_config=text).num_prefix_layers == 20  # 13B: 20 of 40
    with pytest.raises(ValueError, match="num_prefix_layers"):
        AdaLlavaConfig(text_config=text, num_prefix_layers=40)
    with pytest.raises(ValueError, match="group_size"):
        AdaLlavaConfig(text_config=text, granularity="head", group_size=3)
    assert math.isclose(budget.budget_range(cfg)[0], 0.5)
