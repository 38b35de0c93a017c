"""The training objective's knobs: paper defaults reproduce the plain loss; each term does what it says."""

import pytest
import torch

from adallava import budget as budget_mod
from adallava.objective import LossWeights, adaptive_loss, expected_plan_cost, per_sample_ce, sample_budgets
from adallava.presets import build_tiny
from test_modeling import batch


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("layer")


def train_batch(processor):
    inputs = dict(batch(processor))
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    inputs["labels"] = labels
    return inputs


def test_paper_defaults_give_the_models_own_loss(tiny):
    model, processor = tiny
    inputs = train_batch(processor)
    model.train()
    loss, parts = adaptive_loss(model, inputs, LossWeights(), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # same draws: budgets first, then the Gumbel noise
    b = budget_mod.sample_training_budgets(3, model.config, generator=g)
    reference = model(**inputs, budget=b, generator=g).loss
    model.eval()
    # the model's loss is a mean over all labelled tokens; equal token counts per sample make the two means equal
    torch.testing.assert_close(loss, reference)
    assert set(parts) == {"lm", "mean_budget", "loss"} and LossWeights().is_paper_default


def test_budget_weighting_and_distributions(tiny):
    model, _ = tiny
    grid = budget_mod.budget_grid(model.config)
    torch.manual_seed(0)
    low = sample_budgets(model.config, 4000, LossWeights(budget_dist="beta", budget_alpha=1.0, budget_beta=4.0))
    high = sample_budgets(model.config, 4000, LossWeights(budget_dist="beta", budget_alpha=4.0, budget_beta=1.0))
    assert set(low.tolist()) <= set(grid) and set(high.tolist()) <= set(grid)
    assert low.mean() < 0.65 < 0.85 < high.mean()
    with pytest.raises(ValueError, match="budget_dist"):
        LossWeights(budget_dist="gauss")
    with pytest.raises(ValueError, match="distill weight"):
        LossWeights(distill=-1)


def test_per_sample_ce_ignores_unlabelled_samples():
    logits = torch.zeros(2, 4, 5)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, -100, -100]])
    ce, n = per_sample_ce(logits, labels)
    torch.testing.assert_close(ce, torch.tensor([torch.log(torch.tensor(5.0)).item(), 0.0]))
    assert n.tolist() == [2, 0]


def test_distillation_and_latency_terms_add_and_backpropagate(tiny):
    model, processor = tiny
    inputs = train_batch(processor)
    model.train()
    model.zero_grad()
    loss, parts = adaptive_loss(model, inputs, LossWeights(distill=1.0, latency=1.0, gamma=1.0))
    loss.backward()
    model.eval()
    assert parts["distill"] >= 0 and parts["latency"] >= 0
    assert parts["loss"] == pytest.approx(parts["lm"] + parts["distill"] + parts["latency"], rel=1e-5)
    assert model.latency_encoder.net[1].weight.grad.abs().sum() > 0


def test_expected_cost_equals_the_budget_when_units_cost_the_same(tiny):
    """Layer granularity: the hard constraint is exact, so the latency term is zero."""
    model, _ = tiny
    plan = torch.zeros(2, 4, 2, 4)
    plan[0, :2] = 1
    cost = expected_plan_cost(model.config, plan)
    torch.testing.assert_close(cost, torch.tensor([6 / 8, 4 / 8]))
