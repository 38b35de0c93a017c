"""The training objective, with knobs for how accuracy is shared across budgets. Defaults reproduce the paper (spec
2.6): the plain next-token loss, budgets uniform over the model's steps, no extra terms.

    loss = mean_tok[ w(b) * CE(sampled plan at b) ]                     w(b) = b ** gamma (gamma = 0: the paper)
         + distill * KL( full-budget model || sampled plan )            the "sandwich" rule of slimmable networks
         + latency * mean_b[ relu(expected cost of the plan - b) ]      only bites when unit costs are not uniform

Budgets are drawn per sample from `budget_dist`: "uniform" over the model's own steps (the paper), or "beta" with
(budget_alpha, budget_beta) mapped onto [P/L, 1] and rounded to a step (alpha < beta favours low budgets).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import budget as budgets
from .modeling import IGNORE_INDEX


@dataclass
class LossWeights:
    gamma: float = 0.0  # w(b) = b ** gamma: > 0 favours high budgets, < 0 low budgets
    distill: float = 0.0  # weight of KL(full || sampled) on the answer tokens
    distill_temperature: float = 1.0
    latency: float = 0.0  # weight of relu(expected plan cost - budget)
    budget_dist: str = "uniform"  # "uniform" | "beta"
    budget_alpha: float = 1.0
    budget_beta: float = 1.0

    def __post_init__(self):
        if self.budget_dist not in ("uniform", "beta"):
            raise ValueError(f"budget_dist must be 'uniform' or 'beta', got {self.budget_dist!r}")
        for name in ("distill", "latency"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} weight must be >= 0, got {getattr(self, name)}")
        if self.budget_alpha <= 0 or self.budget_beta <= 0:
            raise ValueError("budget_alpha and budget_beta must be > 0")
        if self.distill_temperature <= 0:
            raise ValueError("distill_temperature must be > 0")

    @property
    def is_paper_default(self) -> bool:
        return asdict(self) == asdict(LossWeights())


def sample_budgets(config, n: int, weights: LossWeights, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n] budgets on the model's grid, from the configured distribution."""
    if weights.budget_dist == "uniform":
        return budgets.sample_training_budgets(n, config, generator)
    grid = torch.tensor(budgets.budget_grid(config), dtype=torch.float64)
    beta = torch.distributions.Beta(torch.tensor(weights.budget_alpha), torch.tensor(weights.budget_beta))
    x = beta.sample((n,)).double()  # Beta has no generator argument: seed torch globally for repeatability
    idx = torch.round(x * (len(grid) - 1)).long()
    return grid[idx]


def per_sample_ce(logits, labels):
    """Mean next-token cross-entropy of each sample over its labelled tokens -> [B] (0 where a sample has none)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    tok = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    n = (shift_labels != IGNORE_INDEX).sum(1)
    return tok.sum(1) / n.clamp(min=1), n


def switch_costs(config) -> torch.Tensor:
    """Relative cost of each switch of a schedulable layer [2, H]: attention heads (their q/o projections, their share
    of k/v and of the attention matmuls) and MLP neuron groups (by size), normalised so a whole layer costs 1."""
    text = config.text_config
    H, kv = text.num_attention_heads, text.num_key_value_heads
    d = getattr(text, "head_dim", None) or text.hidden_size // H
    head = 2 * text.hidden_size * d + 2 * text.hidden_size * d * kv / H  # q, o + its share of k, v
    base, extra = divmod(text.intermediate_size, H)
    groups = torch.tensor([base + 1] * extra + [base] * (H - extra), dtype=torch.float64) * 3 * text.hidden_size
    costs = torch.stack([torch.full((H,), head, dtype=torch.float64), groups])
    return costs / costs.sum()


def expected_plan_cost(config, plan) -> torch.Tensor:
    """[B] cost of each sample's plan as a fraction of the whole language model (prefix included), differentiable
    through the plan's straight-through switches."""
    c = switch_costs(config).to(plan.device, plan.dtype)
    schedulable = (plan * c).sum((-1, -2)).sum(-1)  # layers' worth of compute
    return (config.num_prefix_layers + schedulable) / config.num_layers


def adaptive_loss(model, batch: dict, weights: LossWeights, generator=None):
    """One training step's loss under `weights` -> (loss, parts dict of floats for logging).

    batch: input_ids, attention_mask, labels, pixel_values (optional). The model must be in train() mode: each
    sample gets a budget from weights' distribution and a Gumbel-sampled plan.
    """
    cfg = model.config
    B = batch["input_ids"].shape[0]
    b = sample_budgets(cfg, B, weights, generator)
    out = model(**batch, budget=b, generator=generator)
    ce, n_tok = per_sample_ce(out.logits, out.labels)
    w = b.to(ce.device, ce.dtype) ** weights.gamma
    n = n_tok.to(ce.dtype)
    lm = (w * ce * n).sum() / n.sum().clamp(min=1)  # a mean over labelled tokens (as forward's loss), each weighted
    loss = lm
    parts = {"lm": float(lm.detach()), "mean_budget": float(b.mean())}
    if weights.distill > 0:
        with torch.no_grad():
            full = model(**batch, budget=1.0, generator=generator)
        mask = (out.labels[:, 1:] != IGNORE_INDEX) & (full.labels[:, 1:] != IGNORE_INDEX)
        t = weights.distill_temperature
        student = F.log_softmax(out.logits[:, :-1].float() / t, -1)
        teacher = F.log_softmax(full.logits[:, :-1].float() / t, -1)
        kl = (teacher.exp() * (teacher - student)).sum(-1)  # KL(teacher || student) per token
        distill = (kl * mask).sum() / mask.sum().clamp(min=1) * t * t
        loss = loss + weights.distill * distill
        parts["distill"] = float(distill.detach())
    if weights.latency > 0:
        over = torch.relu(expected_plan_cost(cfg, out.plan) - b.to(out.plan.device, out.plan.dtype))
        latency = over.mean()
        loss = loss + weights.latency * latency
        parts["latency"] = float(latency.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts
