"""The trained baselines' recipes (adallava.baselines): LayerSkip's rates, exit weights and early-exit loss, LayerDrop's
drop rate, checked against hand-computed values and the model's own inference paths."""

import math

import pytest
import torch

from adallava.baselines import (
    BaselineArgs, baseline_args, baseline_loss, layer_dropout_plan, layerdrop_loss, layerdrop_plan,
    layerskip_exit_layers, layerskip_exit_weights, layerskip_loss, layerskip_rates,
)  # fmt: skip
from adallava.presets import build_tiny
from test_modeling import batch


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("layer")  # 8 layers, 4 prefix + 4 schedulable


def train_batch(processor):
    inputs = dict(batch(processor))
    labels = inputs["input_ids"].clone()
    labels[:, :-4] = -100
    inputs["labels"] = labels
    return inputs


def first_k_plan(config, k, B):
    plan = torch.zeros(B, config.num_schedulable_layers, 2, config.num_switches)
    plan[:, :k] = 1.0
    return plan


def test_layerskip_rates_and_exit_weights_are_the_papers_formulas(tiny):
    config = tiny[0].config
    # p_l = p_max * (exp(l ln2 / (L-1)) - 1) = p_max * (2 ** (l / 7) - 1) for the schedulable layers l = 4..7
    expected = [0.2 * (2 ** (4 / 7) - 1), 0.2 * (2 ** (5 / 7) - 1), 0.2 * (2 ** (6 / 7) - 1), 0.2 * (2 - 1)]
    torch.testing.assert_close(layerskip_rates(config, 0.2), torch.tensor(expected, dtype=torch.float64))
    assert layerskip_exit_layers(config) == [3, 4, 5, 6, 7]
    # e(l) = sum_{i<=l} i for l < 7: 6, 10, 15, 21; e(7) = 7 + sum_{i<=6} i = 28; total 80
    w = layerskip_exit_weights([3, 4, 5, 6, 7], 8, 1.0)
    torch.testing.assert_close(w, torch.tensor([6, 10, 15, 21, 28], dtype=torch.float64) / 80)
    torch.testing.assert_close(layerskip_exit_weights([3, 4, 5, 6, 7], 8, 0.0),
                               torch.tensor([0, 0, 0, 0, 1.0], dtype=torch.float64))  # fmt: skip


def test_layer_dropout_rates_hold_over_many_draws(tiny):
    config = tiny[0].config
    rates = torch.tensor([0.0, 0.15, 0.5, 0.9], dtype=torch.float64)
    n = 20000
    plan = layer_dropout_plan(rates, n, config, torch.Generator().manual_seed(0))
    assert plan.shape == (n, 4, 2, config.num_switches)
    assert set(plan.unique().tolist()) == {0.0, 1.0}
    assert (plan == plan[:, :, :1, :1]).all()  # a layer is dropped whole
    dropped = 1 - plan[:, :, 0, 0].mean(0).double()
    sigma = (rates * (1 - rates) / n).sqrt()
    assert dropped[0] == 0.0  # rate 0: never dropped
    assert ((dropped - rates).abs() <= 4 * sigma + 1e-12).all(), dropped


def test_layerdrop_rate_over_many_draws_at_layer_and_head_granularity():
    n, rate = 20000, 0.3
    sigma = math.sqrt(rate * (1 - rate) / n)
    for granularity in ("layer", "head"):
        config = build_tiny(granularity)[0].config
        plan = layerdrop_plan(config, n, rate, torch.Generator().manual_seed(1))
        S, H, u = config.num_schedulable_layers, config.num_switches, config.units_per_layer
        assert plan.shape == (n, S, 2, H)
        units = plan[:, :, 0, :].reshape(n, S, u, H // u)
        assert (units == units[..., :1]).all() and (plan[:, :, 0] == plan[:, :, 1]).all()  # a unit drops whole
        dropped = 1 - units[..., 0].double().mean(0)  # [S, u]: each unit's own drop frequency
        assert ((dropped - rate).abs() <= 4 * sigma).all(), dropped
        # independent draws: both of two units of the first layer dropped at rate^2 (within 4 sigma)
        both = ((units[:, 0, 0, 0] == 0) & (units[:, -1, -1, 0] == 0)).double().mean()
        assert abs(both - rate**2) <= 4 * math.sqrt(rate**2 * (1 - rate**2) / n)
    config = build_tiny("layer")[0].config
    assert layerdrop_plan(config, 50, 0.0).eq(1).all()


def test_layerskip_loss_equals_the_hand_weighted_early_exit_losses(tiny):
    """No dropout: LayerSkip's loss = (6 CE_3 + 10 CE_4 + 15 CE_5 + 21 CE_6 + 28 CE_7) / 80, where CE_l is the loss of
    early exit after layer l at inference (the prefix and the first l - 3 schedulable layers run, skip mode)."""
    model, processor = tiny
    inputs = train_batch(processor)
    B = inputs["input_ids"].shape[0]
    model.eval()
    with torch.no_grad():
        ce = [model(**inputs, budget=1.0, execution_plan=first_k_plan(model.config, k, B)).loss for k in range(5)]
    expected = sum(w * c for w, c in zip([6, 10, 15, 21, 28], ce)) / 80
    model.train()
    try:
        loss, parts = layerskip_loss(model, inputs, BaselineArgs(layerskip_p_max=0.0, layerskip_e_scale=1.0))
    finally:
        model.eval()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for layer, c in zip([3, 4, 5, 6, 7], ce):
        assert parts[f"exit_{layer}"] == pytest.approx(float(c), rel=1e-5, abs=1e-5)
    assert loss.requires_grad
    # e_scale 0: only the last layer's loss, i.e. the full model's plain loss
    model.train()
    try:
        last, _ = layerskip_loss(model, inputs, BaselineArgs(layerskip_p_max=0.0, layerskip_e_scale=0.0))
    finally:
        model.eval()
    torch.testing.assert_close(last, ce[-1], rtol=1e-5, atol=1e-5)


def test_layerdrop_loss_is_the_models_loss_under_the_drawn_plan(tiny):
    model, processor = tiny
    inputs = train_batch(processor)
    B = inputs["input_ids"].shape[0]
    args = BaselineArgs(layerdrop_rate=0.5)
    model.train()
    try:
        loss, parts = layerdrop_loss(model, inputs, args, torch.Generator().manual_seed(3))
        plan = layerdrop_plan(model.config, B, 0.5, torch.Generator().manual_seed(3))
        reference = model(**inputs, budget=1.0, execution_plan=plan).loss
        via_stage, _ = baseline_loss("layerdrop", model, inputs, args, torch.Generator().manual_seed(3))
    finally:
        model.eval()
    assert 0 < plan.sum() < plan.numel()  # this draw drops some layers and keeps some
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(via_stage, reference)
    assert parts["kept"] == pytest.approx(float(plan.mean()))


def test_bad_baseline_settings_are_errors_naming_them():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['drop'\]"):
        baseline_args({"drop": 0.2})
    with pytest.raises(ValueError, match="layerdrop_rate must be in"):
        baseline_args({"layerdrop_rate": 1.0})
    with pytest.raises(ValueError, match="layerskip_e_scale"):
        BaselineArgs(layerskip_e_scale=-1)
    with pytest.raises(ValueError, match="no baseline training recipe for stage 'adapt'"):
        baseline_loss("adapt", None, {}, BaselineArgs())
    model, processor = build_tiny("head")
    with pytest.raises(ValueError, match="granularity 'layer' only"):
        layerskip_loss(model, train_batch(processor), BaselineArgs())
    with pytest.raises(ValueError, match="exit_layers"):
        model(**train_batch(processor), budget=1.0, exit_layers=[8])
