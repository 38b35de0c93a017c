"""The training objective's knobs: paper defaults reproduce the plain loss; each term does what it says."""

import re

import pytest
import torch

from adallava import budget as budget_mod
from adallava.objective import (LossWeights, adaptive_loss, expected_plan_cost, per_sample_ce, sample_budgets,
                                switch_costs)
from powered import build_powered
from test_modeling import batch


@pytest.fixture(scope="module")
def tiny():
    return build_powered("layer")


@pytest.fixture(scope="module")
def tiny_head():
    return build_powered("head", "mistral")


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


def _same_draws(model, inputs, seed):
    """The budgets and the student's forward adaptive_loss draws with generator seed `seed` (budgets first)."""
    g = torch.Generator().manual_seed(seed)
    b = budget_mod.sample_training_budgets(inputs["input_ids"].shape[0], model.config, generator=g)
    return b, model(**inputs, budget=b, generator=g)


@pytest.mark.parametrize("gamma", [1.0, 2.0, -1.0])
def test_gamma_weights_each_samples_loss_by_its_budget(tiny, gamma):
    """lm = mean_b[b ** gamma * CE_b] over the samples' own budgets: gamma > 0 shrinks the low-budget samples' share,
    gamma < 0 grows it."""
    model, processor = tiny
    inputs = train_batch(processor)
    model.train()
    try:
        loss, parts = adaptive_loss(model, inputs, LossWeights(gamma=gamma), generator=torch.Generator().manual_seed(5))
        b, out = _same_draws(model, inputs, 5)
        ce, _ = per_sample_ce(out.logits, out.labels)
    finally:
        model.eval()
    assert len(set(b.tolist())) > 1  # the draws mix budgets, so the weighting is visible
    torch.testing.assert_close(loss, (b.float() ** gamma * ce).mean())
    plain = ce.mean()
    assert (loss < plain) if gamma > 0 else (loss > plain)
    assert parts["loss"] == pytest.approx(parts["lm"]) == pytest.approx(float(loss.detach()))


def test_distillation_is_the_kl_from_the_full_budget_teacher(tiny):
    """distill * KL(full-budget model || sampled plan) on the answer tokens, with the teacher at budget 1.0 whatever
    budget the student drew; the term is added to the loss with its weight."""
    model, processor = tiny
    inputs = train_batch(processor)
    model.train()
    try:
        loss, parts = adaptive_loss(model, inputs, LossWeights(distill=0.5, distill_temperature=2.0),
                                    generator=torch.Generator().manual_seed(6))  # fmt: skip
        b, out = _same_draws(model, inputs, 6)
        with torch.no_grad():
            teacher = model(**inputs, budget=1.0)
    finally:
        model.eval()
    assert b.max() < 1.0  # every student runs a reduced plan, so teacher and student differ
    t = 2.0
    mask = out.labels[:, 1:] != -100
    p = torch.log_softmax(teacher.logits[:, :-1].float() / t, -1)
    q = torch.log_softmax(out.logits[:, :-1].float() / t, -1)
    kl = (p.exp() * (p - q)).sum(-1)
    expected = (kl * mask).sum() / mask.sum() * t * t
    assert float(expected) > 1e-3
    assert parts["distill"] == pytest.approx(float(expected), rel=1e-4)
    assert parts["loss"] == pytest.approx(parts["lm"] + 0.5 * parts["distill"], rel=1e-6)
    torch.testing.assert_close(loss, out.loss.new_tensor(parts["lm"]) + 0.5 * expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift,expected", [(0.1, 0.1), (-0.1, 0.0)])
def test_latency_term_is_the_plan_cost_above_the_budget(tiny_head, monkeypatch, shift, expected):
    """latency * mean_b[relu(expected plan cost - b)]: a plan that costs 0.1 more than its budget adds 0.1 times
    the weight; one that costs less adds nothing (relu), and the term sends gradient to the scheduler."""
    from adallava import objective

    model, processor = tiny_head
    real = objective.expected_plan_cost
    monkeypatch.setattr(objective, "expected_plan_cost", lambda cfg, plan: real(cfg, plan) + shift)
    inputs = train_batch(processor)
    model.train()
    model.zero_grad()
    try:
        loss, parts = adaptive_loss(model, inputs, LossWeights(latency=0.5), generator=torch.Generator().manual_seed(7))
        b, out = _same_draws(model, inputs, 7)
        # the cost of a sampled plan is its budget: every unit costs the same share of a layer
        torch.testing.assert_close(real(model.config, out.plan).double(), b, rtol=0, atol=2e-3)
        loss.backward()
    finally:
        model.eval()
    assert parts["latency"] == pytest.approx(expected, abs=2e-3)
    assert loss.dtype == torch.float32  # the float64 budgets are cast to the plan's dtype, not the loss to float64
    assert parts["loss"] == pytest.approx(parts["lm"] + 0.5 * parts["latency"], rel=1e-6)
    grad = model.scheduler.mlp_head.weight.grad
    lm_only = None
    model.train()
    model.zero_grad()
    try:
        adaptive_loss(model, inputs, LossWeights(), generator=torch.Generator().manual_seed(7))[0].backward()
        lm_only = model.scheduler.mlp_head.weight.grad
    finally:
        model.eval()
        model.zero_grad()
    differs = not torch.allclose(grad, lm_only)
    assert differs == (expected > 0)  # the term reaches the scheduler exactly when it is active


def test_head_granularity_switch_costs_by_hand(tiny_head):
    """A head: q and o projections plus its share of k and v; an MLP group: its neurons' gate, up and down rows.
    Normalised so a whole layer costs 1; a plan's cost counts the prefix as always run."""
    model, _ = tiny_head
    cfg = model.config
    D, H, kv, d, inter = 128, 4, 2, 32, 344  # tiny Mistral: hidden 128, 4 heads, 2 KV heads, head_dim 32
    head = 2 * D * d + 2 * D * d * kv / H
    group = inter / H * 3 * D
    layer = H * head + 3 * D * inter
    c = switch_costs(cfg)
    torch.testing.assert_close(c, torch.tensor([[head / layer] * H, [group / layer] * H], dtype=torch.float64))
    plan = torch.zeros(1, cfg.num_schedulable_layers, 2, H)
    plan[0, 0, 0, :2] = 1  # two heads of the first schedulable layer, no MLP
    cost = expected_plan_cost(cfg, plan)
    torch.testing.assert_close(cost, torch.tensor([(4 + 2 * head / layer) / 8], dtype=torch.float32))


def test_expected_cost_equals_the_budget_when_units_cost_the_same(tiny):
    """Layer granularity: the hard constraint is exact, so the latency term is zero."""
    model, _ = tiny
    plan = torch.zeros(2, 4, 2, 4)
    plan[0, :2] = 1
    cost = expected_plan_cost(model.config, plan)
    torch.testing.assert_close(cost, torch.tensor([6 / 8, 4 / 8]))


def test_switch_costs_use_the_models_own_head_dim():
    """A model whose head_dim is not hidden/heads (Gemma, Qwen3 style) costs its heads by its head_dim; a config
    without head_dim falls back to hidden/heads."""
    from types import SimpleNamespace as NS

    def costs(inter=344, **text):
        return switch_costs(NS(text_config=NS(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                              intermediate_size=inter, **text)))  # fmt: skip

    def expected(d, groups=(86, 86, 86, 86)):
        head = 2 * 128 * d + 2 * 128 * d * 2 / 4
        layer = 4 * head + 3 * 128 * sum(groups)
        return torch.tensor([[head / layer] * 4, [g * 3 * 128 / layer for g in groups]], dtype=torch.float64)

    exact = dict(rtol=1e-13, atol=0)
    torch.testing.assert_close(costs(head_dim=16), expected(16), **exact)
    torch.testing.assert_close(costs(), expected(32), **exact)
    torch.testing.assert_close(costs(head_dim=None), expected(32), **exact)
    # 346 neurons in 4 groups: the first two hold one extra (87, 87, 86, 86)
    torch.testing.assert_close(costs(inter=346), expected(32, (87, 87, 86, 86)), **exact)


def test_loss_weights_edges_are_valid_and_beyond_them_is_an_error_naming_the_knob():
    LossWeights(distill=0.0, latency=0.0, budget_alpha=1e-9, budget_beta=1e-9, distill_temperature=1e-9)
    for bad, match in [(dict(latency=-0.1), "latency weight must be >= 0, got -0.1"),
                       (dict(distill=-0.1), "distill weight must be >= 0, got -0.1"),
                       (dict(budget_alpha=0.0), "budget_alpha and budget_beta must be > 0"),
                       (dict(budget_beta=0.0), "budget_alpha and budget_beta must be > 0"),
                       (dict(budget_alpha=-1.0, budget_beta=2.0), "budget_alpha and budget_beta must be > 0"),
                       (dict(distill_temperature=0.0), "distill_temperature must be > 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"^{re.escape(match)}$"):  # the whole message, nothing around it
            LossWeights(**bad)
    assert not LossWeights(gamma=0.5).is_paper_default


def test_sampled_budgets_are_float64_steps_of_the_grid(tiny):
    """uniform: the paper's sampler with the same generator; beta: the draw on [0, 1] mapped onto the grid's steps,
    so a Beta piled at 1 gives budget 1.0 and one piled at 0 gives the lowest budget P/L."""
    cfg = tiny[0].config
    grid = budget_mod.budget_grid(cfg)
    uniform = sample_budgets(cfg, 50, LossWeights(), torch.Generator().manual_seed(3))
    assert uniform.dtype == torch.float64
    assert torch.equal(uniform, budget_mod.sample_training_budgets(50, cfg, torch.Generator().manual_seed(3)))
    torch.manual_seed(0)
    top = sample_budgets(cfg, 200, LossWeights(budget_dist="beta", budget_alpha=50.0, budget_beta=0.01))
    bottom = sample_budgets(cfg, 200, LossWeights(budget_dist="beta", budget_alpha=0.01, budget_beta=50.0))
    assert top.dtype == bottom.dtype == torch.float64
    assert top.tolist() == [1.0] * 200 and bottom.tolist() == [grid[0]] * 200 and grid[0] == 0.5
    # Beta(1, 1) is uniform on [0, 1]; rounding x * (n - 1) gives the two end steps half the others' share
    mid = sample_budgets(cfg, 20000, LossWeights(budget_dist="beta"))
    share = torch.tensor([(mid == g).double().mean().item() for g in grid], dtype=torch.float64)
    n = len(grid)
    expected = torch.tensor([0.5 if i in (0, n - 1) else 1.0 for i in range(n)], dtype=torch.float64) / (n - 1)
    torch.testing.assert_close(share, expected, atol=0.012, rtol=0)


def test_per_sample_ce_of_one_labelled_token_and_of_bfloat16_logits():
    """A sample with one labelled token: its CE is that token's (divided by 1); bf16 logits are scored in float32."""
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, -100, 3, -100], [-100, 1, 2, 6]])
    ce, n = per_sample_ce(logits, labels)
    assert n.tolist() == [1, 3]
    tok = lambda b, t, y: -torch.log_softmax(logits[b, t], -1)[y]  # noqa: E731  logits at t predict token t + 1
    torch.testing.assert_close(ce, torch.stack([tok(0, 1, 3), (tok(1, 0, 1) + tok(1, 1, 2) + tok(1, 2, 6)) / 3]))
    half = logits.to(torch.bfloat16)
    ce16, _ = per_sample_ce(half, labels)
    assert ce16.dtype == torch.float32
    torch.testing.assert_close(ce16, per_sample_ce(half.float(), labels)[0], rtol=0, atol=0)


def test_a_batch_with_one_labelled_token_gives_that_tokens_loss(tiny):
    """The LM term is a mean over labelled tokens (as the model's own loss), also when there is only one."""
    model, processor = tiny
    inputs = train_batch(processor)
    inputs["labels"][:, :] = -100
    inputs["labels"][1, -1] = inputs["input_ids"][1, -1]
    model.train()
    try:
        loss, parts = adaptive_loss(model, inputs, LossWeights(), generator=torch.Generator().manual_seed(2))
        b, out = _same_draws(model, inputs, 2)
        _, with_kl = adaptive_loss(model, inputs, LossWeights(distill=1.0), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            teacher = model(**inputs, budget=1.0)
    finally:
        model.eval()
    ce, n = per_sample_ce(out.logits, out.labels)
    assert n.tolist() == [0, 1, 0]
    torch.testing.assert_close(loss, ce[1])
    torch.testing.assert_close(loss, out.loss)
    assert parts["mean_budget"] == pytest.approx(float(b.mean()))
    # the distillation term is a mean over the labelled tokens too: here the KL at that one token
    t_pos = int((out.labels[1, 1:] != -100).nonzero())  # the logits predicting it
    p = torch.log_softmax(teacher.logits[1, t_pos].float(), -1)
    q = torch.log_softmax(out.logits[1, t_pos].detach().float(), -1)
    kl = float((p.exp() * (p - q)).sum())
    assert kl > 1e-3 and with_kl["distill"] == pytest.approx(kl, rel=1e-4)


def test_switch_costs_are_exact_for_a_fractional_kv_share_and_a_head_dim_of_hidden_floor_heads():
    """A head's share of k and v is kv/H of theirs: with 3 heads and 1 KV head that is a third, and the costs stay
    float64-exact. A config without head_dim has the head_dim its attention layers use, hidden // heads (42 for
    hidden 128 and 3 heads, not 42.67)."""
    from types import SimpleNamespace as NS

    def costs(**text):
        return switch_costs(NS(text_config=NS(hidden_size=128, num_attention_heads=3, num_key_value_heads=1,
                                              intermediate_size=344, **text)))  # fmt: skip

    def expected(d):
        head = 2 * 128 * d + 2 * 128 * d / 3  # 10922.67 for d = 32: not a float32 number
        groups = (115, 115, 114)  # 344 neurons in 3 groups
        layer = 3 * head + 3 * 128 * 344
        return torch.tensor([[head / layer] * 3, [g * 3 * 128 / layer for g in groups]], dtype=torch.float64)

    exact = dict(rtol=1e-13, atol=0)
    torch.testing.assert_close(costs(head_dim=32), expected(32), **exact)
    torch.testing.assert_close(costs(), expected(42), **exact)
    assert float(costs().sum()) == pytest.approx(1.0, abs=1e-15)


def test_expected_plan_cost_stays_on_the_plans_device():
    """The cost of a plan is computed where the plan is (the meta device stands in for an accelerator on a CPU-only
    run: costs left on the CPU would meet the meta plan and raise)."""
    from types import SimpleNamespace as NS

    cfg = NS(text_config=NS(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=344),
             num_prefix_layers=2, num_layers=4)  # fmt: skip
    cost = expected_plan_cost(cfg, torch.zeros(3, 2, 2, 4, device="meta"))
    assert cost.device == torch.device("meta") and cost.shape == (3,) and cost.dtype == torch.float32
    torch.testing.assert_close(expected_plan_cost(cfg, torch.ones(1, 2, 2, 4)), torch.tensor([1.0]))


def test_a_seeded_training_step_draws_nothing_from_the_global_rng(tiny):
    """Every draw of adaptive_loss comes from its generator: the budgets, the student's Gumbel noise and the
    full-budget teacher's (in train mode its scheduler samples too), so a seeded step is reproducible and leaves the
    global RNG as it found it."""
    model, processor = tiny
    inputs = train_batch(processor)
    model.train()
    try:
        torch.manual_seed(0)
        before = torch.get_rng_state()
        loss, parts = adaptive_loss(model, inputs, LossWeights(distill=0.5, latency=1.0),
                                    generator=torch.Generator().manual_seed(4))  # fmt: skip
        assert torch.equal(torch.get_rng_state(), before)
        assert set(parts) == {"lm", "mean_budget", "distill", "latency", "loss"}
        again, _ = adaptive_loss(model, inputs, LossWeights(distill=0.5, latency=1.0),
                                 generator=torch.Generator().manual_seed(4))  # fmt: skip
    finally:
        model.eval()
    assert torch.equal(loss, again)
