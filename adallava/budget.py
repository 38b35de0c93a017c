"""What a budget means, in one place (spec 2.1, 1.3, 2.5).

A budget is the fraction of the language model's decoder compute that a request may use, counting the always-on
prefix: with L layers, P prefix layers and u units per layer (u = 1 for `layer`, num_heads/group_size for `head`),
budget b allows k(b) = floor(u*L*b) - u*P schedulable units. The accepted range is [P/L, 1]; anything else is an error,
never a silent clamp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# floor(u*L*b) must give k for b = k/(u*L) even though k/(u*L)*(u*L) can land a hair below k in floating point
# (0.57 * 100 = 56.99999999999999; a float32 0.7 is 0.69999999, a float32 33/160 is 1.2e-6 units short at uL = 160).
# The tolerance is 1e-6 of u*L*b (at least 1e-6 of a unit): far below one step, far above float32's 6e-8.
_FLOOR_EPS = 1e-6


def budget_range(config) -> tuple[float, float]:
    return config.num_prefix_layers / config.num_layers, 1.0


def budget_grid(config) -> list[float]:
    """Every budget at which the plan size changes: P/L, P/L + 1/(uL), ..., 1.0 (the model's own steps)."""
    total = config.units_per_layer * config.num_layers
    prefix = config.units_per_layer * config.num_prefix_layers
    return [n / total for n in range(prefix, total + 1)]


def validate_budget(budget, batch_size: int, config) -> torch.Tensor:
    """One float, or one per request -> float64 tensor [batch_size]. Raises ValueError naming the accepted range."""
    lo, hi = budget_range(config)
    accepted = f"a budget must be a number in [{lo:g}, {hi:g}] (num_prefix_layers/num_layers to 1)"
    if isinstance(budget, torch.Tensor):
        values = budget.detach().to("cpu", torch.float64).reshape(-1)
        if budget.dim() == 0:
            values = values.expand(batch_size)
    elif isinstance(budget, (int, float)) and not isinstance(budget, bool):
        values = torch.full((batch_size,), float(budget), dtype=torch.float64)
    elif isinstance(budget, Sequence) and not isinstance(budget, str):
        try:
            values = torch.tensor([float(b) for b in budget], dtype=torch.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{accepted}; got {budget!r}") from None
    else:
        raise ValueError(f"{accepted}; got {budget!r}")
    if values.numel() != batch_size:
        raise ValueError(f"got {values.numel()} budgets for a batch of {batch_size}: give one, or one per request")
    bad = [float(v) for v in values if math.isnan(v) or not lo - _FLOOR_EPS <= v <= hi + _FLOOR_EPS]
    if bad:
        raise ValueError(f"{accepted}; got {bad[0]}")
    return values


def units_for_budget(budget: torch.Tensor, config) -> torch.Tensor:
    """k(b) = relu(floor(u*L*b) - u*P): schedulable units that run, per request (LongTensor)."""
    u, n_layers, prefix = config.units_per_layer, config.num_layers, config.num_prefix_layers
    x = budget.to(torch.float64) * (u * n_layers)
    # a relative tolerance: a float32 budget k/(uL) is off by up to 6e-8 of itself, i.e. 1.2e-5 units at uL = 200
    total = torch.floor(x + _FLOOR_EPS * x.clamp(min=1.0)).long()
    return (total - u * prefix).clamp(min=0, max=u * (n_layers - prefix))


def encoder_input(budget: torch.Tensor, config) -> torch.Tensor:
    """The latency encoder's quantised input (spec 1.3): relu(floor(T_u*l) - P_u) / (T_u - P_u + 1).

    With T_u = u*L total units and P_u = u*P prefix units; the +1 is deliberate in the official code, so 100% encodes
    as 16/17 for L=32, P=16.
    """
    total_units = config.units_per_layer * config.num_layers
    prefix_units = config.units_per_layer * config.num_prefix_layers
    k = units_for_budget(budget, config).to(torch.float64)
    return k / (total_units - prefix_units + 1)


def sample_training_budgets(batch_size: int, config, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform over the model's own budget steps, per sample (spec 2.5): randint(uP, uL+1) / (uL)."""
    total = config.units_per_layer * config.num_layers
    prefix = config.units_per_layer * config.num_prefix_layers
    n = torch.randint(prefix, total + 1, (batch_size,), generator=generator)
    return n.to(torch.float64) / total
