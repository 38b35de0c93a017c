"""Plan sampling (spec 2.2-2.4): exact plan sizes, top-k at inference, straight-through gradients."""

import pytest
import torch

import torch.nn.functional as F

from adallava.scheduler import LatencyEncoder, Scheduler, _gumbel, sample_head_plan, sample_layer_plan


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


def test_straight_through_gradient_is_the_softmax_gradient_of_the_same_draw():
    """One Gumbel-softmax pick (k=1): the forward value is the one-hot argmax of (logits + g) and the gradient is
    that of softmax((logits + g) / tau), with g the same noise (replayed from the same generator)."""
    tau = 2.0
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.0]], requires_grad=True)
    plan = sample_layer_plan(logits, torch.tensor([1]), tau, stochastic=True, generator=torch.Generator().manual_seed(4))
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0]])
    (plan * w).sum().backward()
    g = _gumbel(logits.detach(), torch.Generator().manual_seed(4))
    z = logits.detach() + g
    assert plan.detach().tolist() == [F.one_hot(z.argmax(-1), 5).float().tolist()[0]]
    s = (z / tau).softmax(-1)[0]
    jacobian = (torch.diag(s) - s[:, None] * s[None, :]) / tau  # d softmax_i / d logit_j
    torch.testing.assert_close(logits.grad[0], w[0] @ jacobian)
    # the direction training relies on: raising the weight of the chosen layer raises its logit's gradient
    chosen = int(z.argmax())
    assert logits.grad[0, chosen] > 0 if w[0, chosen] > (w[0] * s).sum() else logits.grad[0, chosen] <= 0


def test_training_sampler_keeps_the_highest_scored_layers_as_often_as_softmax_says():
    """Gumbel-max sampling (spec 2.2): the first layer picked is layer i with probability softmax(logits)_i, so
    training favours the same layers inference keeps (top-k). 4000 draws: 4 standard errors <= 0.032."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    n = 4000
    g = torch.Generator().manual_seed(0)
    freq = sample_layer_plan(logits.expand(n, -1), torch.ones(n, dtype=torch.long), 5.0, True, g).mean(0)
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.032, rtol=0)
    assert freq[0] > freq[1] > freq[2] > freq[3]
    # two layers out of five: the top-2 of inference is also the most frequent pair in training
    freq2 = sample_layer_plan(logits.expand(n, -1), torch.full((n,), 2), 5.0, True, g).mean(0)
    assert set(freq2.topk(2).indices.tolist()) == set(logits.topk(2).indices.tolist()) == {0, 1}
    assert freq2[0] > 0.8 and freq2[4] < 0.05


def test_training_head_sampler_picks_layers_and_heads_by_their_scores():
    """AdaLLaVA-H: the layer of a unit is drawn by a Gumbel-softmax over every switch's logit, then its heads by
    Gumbel-top-k: with one clearly best layer and head, training picks them about as often as softmax says."""
    logits = torch.zeros(3, 2, 4)
    logits[1, 0, 2] = 4.0  # layer 1, head 2 is the best switch of the model
    e4 = torch.exp(torch.tensor(4.0))
    p_layer1 = float((e4 + 7) / (e4 + 23))  # 3 layers x 8 switches
    n = 4000
    g = torch.Generator().manual_seed(0)
    plan = sample_head_plan(logits.expand(n, -1, -1, -1), torch.ones(n, dtype=torch.long), 1, 5.0, True, g)
    freq_layer = plan[:, :, 0].sum(-1).mean(0)  # [3]
    assert abs(float(freq_layer[1]) - p_layer1) < 0.03
    assert freq_layer[1] > freq_layer[0] and freq_layer[1] > freq_layer[2]
    heads = plan[:, 1, 0].sum(0)
    assert heads.argmax() == 2 and heads[2] / heads.sum() > 0.8


def test_latency_encoder_shapes_and_sensitivity():
    torch.manual_seed(0)
    enc = LatencyEncoder(hidden_size=32, embed_dim=256)
    out = enc(torch.tensor([0.0, 0.5, 16 / 17], dtype=torch.float64))
    assert out.shape == (3, 32)
    assert (out[0] - out[2]).abs().max() > 0.05 and (out[1] - out[2]).abs().max() > 0.05
    assert sum(p.numel() for p in enc.parameters()) == 2 * 256 + 256 * 32 + 32 + 32 * 32 + 32


def test_latency_encoder_is_sinusoid_layernorm_linear_gelu_linear():
    """The encoder's output by hand (spec 1.3), for three quantised budgets."""
    import math

    torch.manual_seed(0)
    enc = LatencyEncoder(hidden_size=32, embed_dim=256)
    q = torch.tensor([0.0, 0.5, 16 / 17], dtype=torch.float64)
    freq = 1.0 / (10000 ** (torch.arange(128, dtype=torch.float32) / 128))
    v = q.float()[:, None] * (2 * math.pi) * freq
    e = torch.cat([v.sin(), v.cos()], -1)
    ln, l1, l2 = enc.net[0], enc.net[1], enc.net[3]
    expected = l2(F.gelu(l1(F.layer_norm(e, (256,), ln.weight, ln.bias, ln.eps))))
    torch.testing.assert_close(enc(q), expected, rtol=0, atol=0)  # the same float32 ops: bit for bit
    assert enc.embed_dim == 256 and len(enc.net) == 4
    default = LatencyEncoder(hidden_size=32)  # spec 1.3: a 256-d sinusoid unless told otherwise
    assert default.embed_dim == 256 and default.net[0].normalized_shape == (256,) and default(q).shape == (3, 32)
    # a bf16 encoder takes the float32 sinusoid cast to its own dtype and answers in it
    half = enc.to(torch.bfloat16)
    assert half(q).dtype == torch.bfloat16
    torch.testing.assert_close(half(q), half.net(e.to(torch.bfloat16)), rtol=0, atol=0)


def test_scheduler_heads_have_one_logit_per_layer_or_per_switch():
    assert Scheduler(16, 4, 8, "layer").mlp_head.out_features == 4
    assert Scheduler(16, 4, 8, "head").mlp_head.out_features == 4 * 2 * 8


def test_an_empty_batch_gets_an_empty_plan():
    plan = sample_layer_plan(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 5.0, stochastic=False)
    assert plan.shape == (0, 4)


def test_an_empty_batch_of_a_model_without_schedulable_layers_gets_an_empty_plan():
    """No request and no schedulable layer: no pick is attempted (a pick over zero layers would be an error)."""
    for stochastic in (False, True):
        plan = sample_layer_plan(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), 5.0, stochastic=stochastic)
        assert plan.shape == (0, 0)


def test_gumbel_noise_is_standard_gumbel_and_finite_at_the_ends_of_rand(monkeypatch):
    """-log(-log(u)), u ~ U(0, 1): mean = Euler's constant, std = pi/sqrt(6) (200k draws: 5 standard errors <= 0.015).
    u is clamped to [1e-20, 1 - 1e-7], so the noise stays finite where rand returns exactly 0 (or 1)."""
    import math

    g = torch.Generator().manual_seed(0)
    noise = _gumbel(torch.zeros(200_000), g)
    assert noise.dtype == torch.float32 and noise.shape == (200_000,)
    assert abs(float(noise.mean()) - 0.5772157) < 0.015
    assert abs(float(noise.std()) - math.pi / math.sqrt(6)) < 0.015
    double = _gumbel(torch.zeros(3, 2, dtype=torch.float64), None)
    assert double.dtype == torch.float64 and double.shape == (3, 2)
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.zeros(shape, dtype=torch.float64))
    assert _gumbel(torch.zeros(2), None).tolist() == pytest.approx([-math.log(-math.log(1e-20))] * 2, rel=1e-12)
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.ones(shape, dtype=torch.float64))
    assert _gumbel(torch.zeros(2), None).tolist() == pytest.approx([-math.log(-math.log(1 - 1e-7))] * 2, rel=1e-6)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_a_bfloat16_scheduler_samples_from_float32_logits_and_returns_its_own_dtype(granularity):
    """The logits are computed in float32 whatever the model's dtype (top-k and Gumbel noise on bf16 logits would tie
    and round); the plan comes back in the hidden state's dtype, with the same picks as float32 logits give."""
    torch.manual_seed(0)
    sched = Scheduler(16, 4, 4, granularity).to(torch.bfloat16)
    x = torch.randn(3, 16).to(torch.bfloat16)
    k = torch.tensor([0, 2, 4])
    plan, z = sched(x, k, group_size=2, tau=5.0, stochastic=False)
    assert z.dtype == torch.float32 and plan.dtype == torch.bfloat16
    expected = sched.mlp_head(x).float()
    torch.testing.assert_close(z, expected if granularity == "layer" else expected.view(-1, 4, 2, 4), rtol=0, atol=0)
    if granularity == "layer":
        ref = sample_layer_plan(expected, k, 5.0, False)[:, :, None, None].expand(-1, -1, 2, 4)
    else:
        ref = sample_head_plan(expected.view(-1, 4, 2, 4), k, 2, 5.0, False)
    assert torch.equal(plan.float(), ref)


def test_inference_plans_are_hard_and_carry_no_gradient():
    """stochastic=False (inference): the plain top-k 0/1 plan, with no straight-through path back to the logits."""
    logits = torch.randn(2, 4, requires_grad=True)
    layer = sample_layer_plan(logits, torch.tensor([1, 3]), 5.0, stochastic=False)
    assert not layer.requires_grad and layer.sum(-1).tolist() == [1.0, 3.0]
    head_logits = torch.randn(2, 3, 2, 4, requires_grad=True)
    head = sample_head_plan(head_logits, torch.tensor([1, 2]), 2, 5.0, stochastic=False)
    assert not head.requires_grad and head.sum((1, 2, 3)).tolist() == [4.0, 8.0]
    # the same draws in training mode do carry it
    assert sample_layer_plan(logits, torch.tensor([1, 3]), 5.0, stochastic=True).requires_grad


def test_head_sampler_straight_through_is_the_softmax_over_the_layers_heads():
    """AdaLLaVA-H, one layer, one unit: the layer pick is certain (its softmax sums to 1, so no gradient flows through
    it) and the unit's heads and MLP groups are the Gumbel-top-2 of each switch type, with the gradient of
    softmax((logits + g2) / tau) over that type's switches; g1, g2 replayed from the same generator."""
    tau, H = 2.0, 4
    logits = torch.tensor([[[[0.5, -1.0, 2.0, 0.0], [1.0, 0.3, -0.5, 0.8]]]], requires_grad=True)  # [1, 1, 2, 4]
    plan = sample_head_plan(logits, torch.tensor([1]), 2, tau, True, torch.Generator().manual_seed(3))
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.0, 2.0, 0.0, 1.5]])
    (plan[0, 0] * w).sum().backward()
    g = torch.Generator().manual_seed(3)
    _gumbel(logits.detach().reshape(1, -1), g)  # the layer pick's noise
    z2 = logits.detach()[0, 0] + _gumbel(torch.zeros(1, 2, H), g)[0]
    top = torch.zeros(2, H).scatter_(-1, z2.topk(2, -1).indices, 1.0)
    assert torch.equal(plan.detach()[0, 0], top)
    s = (z2 / tau).softmax(-1)
    expected = s * (w - (w * s).sum(-1, keepdim=True)) / tau
    torch.testing.assert_close(logits.grad[0, 0], expected, rtol=1e-5, atol=1e-6)


def test_plans_and_latency_tokens_stay_on_the_models_device_when_k_is_on_the_cpu():
    """Every tensor the samplers and the latency encoder make is made on the device of the logits (of the encoder's
    weights), whatever device the unit counts k or the budgets come from. The meta device stands in for an
    accelerator on a CPU-only run: a tensor left on the CPU would meet a meta tensor and raise."""
    meta = torch.device("meta")
    k = torch.tensor([1, 3])  # on the CPU, as units_for_budget returns them
    assert _gumbel(torch.zeros(2, 4, device=meta), None).device == meta
    for stochastic in (True, False):
        layer = sample_layer_plan(torch.zeros(2, 4, device=meta), k, 5.0, stochastic)
        assert layer.device == meta and layer.shape == (2, 4)
        head = sample_head_plan(torch.zeros(2, 3, 2, 4, device=meta), k, 2, 5.0, stochastic)
        assert head.device == meta and head.shape == (2, 3, 2, 4)
    for granularity in ("layer", "head"):
        plan, z = Scheduler(16, 4, 4, granularity).to(meta)(torch.zeros(2, 16, device=meta), k, group_size=2,
                                                             tau=5.0, stochastic=True)  # fmt: skip
        assert plan.device == meta and z.device == meta and plan.shape == (2, 4, 2, 4)
    token = LatencyEncoder(hidden_size=16).to(meta)(torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert token.device == meta and token.shape == (2, 16) and token.dtype == torch.float32


@pytest.mark.parametrize("stochastic", [False, True])
def test_an_empty_batch_gets_an_empty_head_plan(stochastic):
    """AdaLLaVA-H with no request: no unit is picked, also in a model without schedulable layers (where a pick over
    zero switches would be an error)."""
    for S in (4, 0):
        plan = sample_head_plan(torch.zeros(0, S, 2, 4), torch.zeros(0, dtype=torch.long), 2, 5.0, stochastic)
        assert plan.shape == (0, S, 2, 4)


@pytest.mark.parametrize("tau", [2.0, 0.5])
def test_head_sampler_layer_pick_has_the_gradient_of_the_softmax_over_every_switch_at_tau(tau):
    """AdaLLaVA-H, one unit of one head (H = 1, so the unit's head and MLP group are certain and carry no gradient):
    the unit's layer is the argmax of (logits + g) over every (layer, switch), and its straight-through gradient is
    that of softmax((logits + g) / tau) over those 2 * S switches, summed per layer; g replayed from the generator."""
    logits = torch.tensor([[[[0.5], [-1.0]], [[2.0], [0.0]], [[1.0], [0.3]]]], requires_grad=True)  # [1, 3, 2, 1]
    plan = sample_head_plan(logits, torch.tensor([1]), 1, tau, True, torch.Generator().manual_seed(2))
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 2.5]])  # a weight per (layer, switch)
    (plan[0, :, :, 0] * w).sum().backward()
    z = logits.detach().reshape(1, 6) + _gumbel(torch.zeros(1, 6), torch.Generator().manual_seed(2))
    chosen = int(z.argmax()) // 2
    expected_plan = torch.zeros(3, 2)
    expected_plan[chosen] = 1.0
    assert torch.equal(plan.detach()[0, :, :, 0], expected_plan)
    s = (z[0] / tau).softmax(-1)  # over the six switches
    W = w.sum(-1).repeat_interleave(2)  # d loss / d (layer of switch j): both switches of that layer are on
    expected = s * (W - (s * W).sum()) / tau
    torch.testing.assert_close(logits.grad.reshape(6), expected, rtol=1e-5, atol=1e-7)
    assert expected.abs().max() > 0.01


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_the_scheduler_draws_its_noise_from_the_given_generator(granularity):
    """Training plans are reproducible from the generator alone: with equal logits every pick is decided by the
    Gumbel noise, and the plan is the sampler's with the same seeded generator whatever the global RNG's state."""
    sched = Scheduler(16, 6, 4, granularity)
    torch.nn.init.zeros_(sched.mlp_head.weight)
    torch.nn.init.zeros_(sched.mlp_head.bias)
    x, k = torch.randn(4, 16), torch.tensor([1, 2, 3, 4])

    def plan(seed, global_seed):
        torch.manual_seed(global_seed)
        return sched(x, k, group_size=2, tau=5.0, stochastic=True, generator=torch.Generator().manual_seed(seed))[0]

    zeros = torch.zeros(4, 6) if granularity == "layer" else torch.zeros(4, 6, 2, 4)
    if granularity == "layer":
        ref = sample_layer_plan(zeros, k, 5.0, True, torch.Generator().manual_seed(5))[:, :, None, None].expand(-1, -1, 2, 4)
    else:
        ref = sample_head_plan(zeros, k, 2, 5.0, True, torch.Generator().manual_seed(5))
    assert torch.equal(plan(5, 0), ref) and torch.equal(plan(5, 1), ref)
    assert not torch.equal(plan(6, 0), ref)  # the noise does decide: another seed, another plan
