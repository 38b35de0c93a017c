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


@pytest.mark.parametrize("bad", [0.3, 1.2, -1.0, float("nan"), "0.7", None, [0.6, float("nan")], True, [0.6, "x"], {0.6}])
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


@pytest.mark.parametrize("layers,heads,granularity", [(10, 4, "layer"), (32, 32, "layer"), (32, 32, "head"),
                                                       (40, 40, "head"), (80, 64, "head"), (40, 40, "layer")])
def test_float32_budgets_give_their_own_step(layers, heads, granularity):
    """Every grid step n/(uL), as float32 (what a bf16/fp32 pipeline hands over), runs n - uP units."""
    text = LlamaConfig(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       hidden_size=heads * 8, intermediate_size=64)  # fmt: skip
    cfg = AdaLlavaConfig(text_config=text, granularity=granularity)
    u, total = cfg.units_per_layer, cfg.units_per_layer * layers
    steps = torch.arange(u * cfg.num_prefix_layers, total + 1)
    b32 = (steps.double() / total).float()
    units = budget.units_for_budget(budget.validate_budget(b32, len(steps), cfg), cfg)
    assert units.tolist() == (steps - u * cfg.num_prefix_layers).tolist()


def test_a_float32_budget_plans_as_its_exact_value():
    """units_for_budget computes in float64 whatever the budget's dtype: every float32 within 40 ulps of each step's
    tolerance edge (640 units: float32 rounding of b * uL is then comparable to the tolerance) gets the plan size of
    its exact value."""
    text = LlamaConfig(num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=64, hidden_size=512,
                       intermediate_size=64)  # fmt: skip
    cfg = AdaLlavaConfig(text_config=text, granularity="head")
    total = cfg.units_per_layer * cfg.num_layers
    assert total == 640
    edges = torch.tensor([(k - 1e-6 * k) / total for k in range(total // 2, total + 1)], dtype=torch.float32)
    values = [edges]
    up, down = edges.clone(), edges.clone()
    for _ in range(40):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(0.0))
        values += [up, down]
    b32 = torch.cat(values)
    assert budget.units_for_budget(b32, cfg).tolist() == budget.units_for_budget(b32.double(), cfg).tolist()


def test_validated_budgets_are_float64_whatever_came_in():
    cfg = vicuna7b_config("layer")
    for given in (0.75, [0.6, 0.75], torch.tensor([0.6, 0.75], dtype=torch.float32), torch.tensor(0.6, dtype=torch.bfloat16)):
        got = budget.validate_budget(given, 2, cfg)
        assert got.dtype == torch.float64 and got.shape == (2,), given
    assert budget.validate_budget(torch.tensor([0.7], dtype=torch.float32), 1, cfg).item() == float(torch.tensor(0.7))


def test_budgets_at_the_tolerance_edges_are_accepted():
    """The range is [lo, hi] widened by the same 1e-6 that floors a step (so a float32 1.0 or lo is never refused)."""
    cfg = vicuna7b_config("layer")
    lo, hi = budget.budget_range(cfg)
    assert budget.validate_budget([lo - 1e-6, hi + 1e-6], 2, cfg).tolist() == [lo - 1e-6, hi + 1e-6]
    for outside in (lo - 2e-6, hi + 2e-6):
        with pytest.raises(ValueError, match=r"\[0\.5, 1\]"):
            budget.validate_budget(outside, 1, cfg)


def test_plan_sizes_stay_within_the_schedulable_units():
    """relu at the bottom (spec 2.1) and at most every schedulable unit at the top, whatever value comes in."""
    for granularity, most in (("layer", 16), ("head", 64)):
        cfg = vicuna7b_config(granularity)
        units = budget.units_for_budget(torch.tensor([0.0, 0.25, 1.0, 3.0], dtype=torch.float64), cfg)
        assert units.tolist() == [0, 0, most, most]
