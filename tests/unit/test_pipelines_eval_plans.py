"""Baseline plans of the evaluation: the same number of units as the scheduler runs at each budget."""

import pytest
import torch

from adallava.budget import budget_grid, units_for_budget
from adallava.presets import tiny_config
from pipelines.evaluate import baseline_plan, format_table, summarise


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_baseline_plans_have_the_budgets_plan_size(granularity):
    cfg = tiny_config(granularity)
    per_layer = cfg.units_per_layer
    unit = cfg.num_switches // per_layer
    for b in budget_grid(cfg):
        k = int(units_for_budget(torch.tensor([b], dtype=torch.float64), cfg)[0])
        early = baseline_plan("early_exit", b, 3, cfg)
        rand = baseline_plan("random_skip", b, 3, cfg, torch.Generator().manual_seed(0))
        for plan in (early, rand):
            assert plan.shape == (3, cfg.num_schedulable_layers, 2, cfg.num_switches)
            assert set(plan.unique().tolist()) <= {0.0, 1.0}
            # k units per request, attention heads and MLP groups alike
            assert plan.sum((1, 2, 3)).tolist() == [2.0 * k * unit] * 3
            assert torch.equal(plan[:, :, 0], plan[:, :, 1])
        # early exit: the first k units in layer order
        flat = early[0, :, 0].reshape(-1)
        assert flat[: k * unit].all() and not flat[k * unit :].any()
    full = baseline_plan("full", 1.0, 2, cfg)
    assert full.all()


def test_random_skipping_is_seeded_and_varies_per_request():
    cfg = tiny_config("layer")
    a = baseline_plan("random_skip", 0.75, 16, cfg, torch.Generator().manual_seed(1))
    b = baseline_plan("random_skip", 0.75, 16, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert len({tuple(p[:, 0, 0].tolist()) for p in a}) > 1
    with pytest.raises(ValueError, match="oracle"):
        baseline_plan("oracle", 0.75, 1, cfg)


def test_summary_and_table():
    rows = [
        {"question_type": "colour", "correct": True, "flops": 2.0, "execution_plan": [1, 1, 0]},
        {"question_type": "colour", "correct": False, "flops": 4.0, "execution_plan": [1, 0, 0]},
        {"question_type": "digit", "correct": True, "flops": 3.0, "execution_plan": [1, 1, 1]},
    ]
    s = summarise(rows)
    assert s["accuracy"] == pytest.approx(2 / 3) and s["accuracy_by_type"] == {"colour": 0.5, "digit": 1.0}
    assert s["flops"] == 3.0 and s["layer_usage"] == pytest.approx([1, 2 / 3, 1 / 3])
    s.update(budget=0.5, prefill_ms=1.0, per_token_ms=0.5)
    table = format_table({"num_examples": 3, "results": {"adallava": {"0.5000": s}, "early_exit": {"0.5000": s}}})
    assert "66.7" in table and "colour" in table and "early exit" in table
