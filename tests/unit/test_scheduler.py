"""Plan sampling (spec 2.2-2.4): exact plan sizes, top-k at inference, straight-through gradients."""

import pytest
import torch

from adallava.scheduler import LatencyEncoder, Scheduler, sample_head_plan, sample_layer_plan


@pytest.mark.parametrize("stochastic", [True, False])
def test_layer_plans_have_exactly_k_layers(stochastic):
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(6, 16, generator=g)
        k = torch.randint(0, 17, (6,), generator=g)
        plan = sample_layer_plan(logits, k, tau=5.0, stochastic=stochastic, generator=g)
        assert set(plan.unique().tolist()) <= {0.0, 1.0}
        assert plan.sum(-1).long().tolist() == k.tolist()


def test_inference_layer_plan_is_top_k_of_logits():
    logits = torch.randn(4, 16)
    k = torch.tensor([0, 3, 8, 16])
    plan = sample_layer_plan(logits, k, tau=5.0, stochastic=False)
    for b in range(4):
        expected = set(logits[b].topk(int(k[b])).indices.tolist()) if k[b] else set()
        assert set(plan[b].nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("group_size", [8, 2])
def test_head_plans_have_exactly_k_units(stochastic, group_size):
    H, S = 32, 16
    units = H // group_size
    g = torch.Generator().manual_seed(1)
    for trial in range(5):
        logits = torch.randn(3, S, 2, H, generator=g)
        k = torch.randint(0, S * units + 1, (3,), generator=g)
        plan = sample_head_plan(logits, k, group_size, tau=5.0, stochastic=stochastic, generator=g)
        assert set(plan.unique().tolist()) <= {0.0, 1.0}
        heads, groups = plan[:, :, 0].sum(-1), plan[:, :, 1].sum(-1)  # per layer [B, S]
        assert torch.equal(heads, groups)  # heads and MLP groups are added in equal numbers per layer
        assert (heads % group_size == 0).all()
        assert (heads.sum(-1) / group_size).long().tolist() == k.tolist()


def test_inference_head_plan_picks_the_highest_logits_first():
    logits = torch.zeros(1, 4, 2, 8)
    logits[0, 2, 0, 5] = 10.0  # the single best switch sits in layer 2
    logits[0, 2, 1, :3] = torch.tensor([3.0, 2.0, 1.0])
    plan = sample_head_plan(logits, torch.tensor([1]), group_size=2, tau=5.0, stochastic=False)
    assert plan[0].sum() == 4 and plan[0, 2].sum() == 4
    assert plan[0, 2, 0, 5] == 1 and plan[0, 2, 1, 0] == 1 and plan[0, 2, 1, 1] == 1


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_straight_through_gradient_reaches_the_scheduler(granularity):
    torch.manual_seed(0)
    sched = Scheduler(hidden_size=16, num_schedulable_layers=4, num_switches=4, granularity=granularity)
    x = torch.randn(2, 16)
    plan, _ = sched(x, torch.tensor([1, 2]), group_size=1, tau=5.0, stochastic=True)
    weights = torch.randn_like(plan)
    (plan * weights).sum().backward()
    assert sched.mlp_head.weight.grad.abs().sum() > 0


def test_no_gradient_when_no_unit_is_scheduled():
    sched = Scheduler(hidden_size=16, num_schedulable_layers=4, num_switches=4, granularity="layer")
    plan, _ = sched(torch.randn(2, 16), torch.tensor([0, 0]), group_size=1, tau=5.0, stochastic=True)
    assert plan.sum() == 0 and not plan.requires_grad


def test_latency_encoder_shapes_and_sensitivity():
    torch.manual_seed(0)
    enc = LatencyEncoder(hidden_size=32, embed_dim=256)
    out = enc(torch.tensor([0.0, 0.5, 16 / 17], dtype=torch.float64))
    assert out.shape == (3, 32)
    assert not torch.allclose(out[0], out[2])
    assert sum(p.numel() for p in enc.parameters()) == 2 * 256 + 256 * 32 + 32 + 32 * 32 + 32
