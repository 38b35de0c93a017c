"""Latency encoder, scheduler head and execution-plan sampling (spec 1.3, 1.5, 2.2-2.4).

An execution plan is a 0/1 tensor [batch, num_schedulable_layers, 2, num_heads]: for each schedulable layer, one switch
per attention head ([:, :, 0]) and one per MLP neuron group ([:, :, 1]). At `layer` granularity all switches of a layer
are equal. In training the 0/1 values carry straight-through gradients to the scheduler's logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LatencyEncoder(nn.Module):
    """Budget -> latency token: sinusoid(2*pi*q, 256-d) -> LayerNorm -> Linear -> GELU -> Linear (spec 1.3)."""

    def __init__(self, hidden_size: int, embed_dim: int = 256):
        super().__init__()
        self.embed_dim = embed_dim
        self.net = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, quantised_budget: torch.Tensor) -> torch.Tensor:
        half = self.embed_dim // 2
        device = self.net[1].weight.device
        freq = 1.0 / (10000 ** (torch.arange(half, device=device, dtype=torch.float32) / half))
        v = quantised_budget.to(device, torch.float32)[:, None] * (2 * math.pi) * freq
        e = torch.cat([v.sin(), v.cos()], dim=-1)
        return self.net(e.to(self.net[1].weight.dtype))


def _gumbel(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(like.shape, device=like.device, dtype=like.dtype, generator=generator)
    return -torch.log(-torch.log(u.clamp(min=1e-20, max=1 - 1e-7)))


def _straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    # hard + (soft - soft.detach()): forward value is exactly `hard` (0/1), gradient is soft's.
    return hard + (soft - soft.detach())


def sample_layer_plan(logits, k, tau, stochastic, generator=None):
    """AdaLLaVA-L: k layers without replacement by sequential Gumbel-softmax (spec 2.2); deterministic top-k if not
    stochastic. logits [B, S], k LongTensor [B] -> 0/1 plan [B, S] with exactly k[b] ones per row."""
    plan = torch.zeros_like(logits)
    picked = torch.zeros_like(logits, dtype=torch.bool)
    for step in range(int(k.max()) if k.numel() else 0):
        active = (k > step).to(logits.device)[:, None]
        z = logits + _gumbel(logits, generator) if stochastic else logits
        z = (z / tau).masked_fill(picked, float("-inf"))
        hard = F.one_hot(z.argmax(-1), logits.shape[-1]).to(logits.dtype)
        choice = _straight_through(hard, z.softmax(-1)) if stochastic else hard
        plan = plan + choice * active
        picked = picked | (hard.bool() & active)
    return plan


def sample_head_plan(logits, k, group_size, tau, stochastic, generator=None):
    """AdaLLaVA-H (spec 2.3): k units, each = group_size heads + group_size MLP groups of one layer.

    logits [B, S, 2, H] -> plan [B, S, 2, H]. Each unit: pick a layer by a (Gumbel-)softmax over every unpicked
    (layer, switch) logit, then the top group_size unpicked heads and MLP groups of that layer (Gumbel-top-k when
    stochastic), straight-through estimators on both picks.
    """
    B, S, _, H = logits.shape
    flat = logits.reshape(B, S * 2 * H)
    plan = torch.zeros_like(logits)
    for step in range(int(k.max()) if k.numel() else 0):
        active = (k > step).to(logits.device).to(logits.dtype)[:, None, None, None]
        picked = plan.detach() > 0.5
        # 1. which layer
        z = flat + _gumbel(flat, generator) if stochastic else flat
        z = (z / tau).masked_fill(picked.reshape(B, -1), float("-inf"))
        hard = F.one_hot(z.argmax(-1), flat.shape[-1]).to(logits.dtype)
        choice = _straight_through(hard, z.softmax(-1)) if stochastic else hard
        layer = choice.view(B, S, 2 * H).sum(-1)  # one-hot over layers [B, S]
        # 2. which heads and MLP groups inside it
        layer_logits = (logits * layer[:, :, None, None]).sum(1)  # [B, 2, H]
        layer_picked = (picked & (layer.detach()[:, :, None, None] > 0.5)).any(1)  # [B, 2, H]
        z2 = layer_logits + _gumbel(layer_logits, generator) if stochastic else layer_logits
        z2 = (z2 / tau).masked_fill(layer_picked, float("-inf"))
        khot = torch.zeros_like(z2).scatter_(-1, z2.topk(group_size, -1).indices, 1.0)
        kchoice = _straight_through(khot, z2.softmax(-1)) if stochastic else khot
        plan = plan + layer[:, :, None, None] * kchoice[:, None] * active
    return plan


class Scheduler(nn.Module):
    """A single Linear on the latency token's hidden state (spec 1.5): one logit per schedulable layer (`layer`),
    or one per head and per MLP group of each schedulable layer (`head`)."""

    def __init__(self, hidden_size: int, num_schedulable_layers: int, num_switches: int, granularity: str):
        super().__init__()
        self.granularity = granularity
        self.num_schedulable_layers = num_schedulable_layers
        self.num_switches = num_switches
        out = num_schedulable_layers if granularity == "layer" else num_schedulable_layers * 2 * num_switches
        self.mlp_head = nn.Linear(hidden_size, out)

    def logits(self, latency_hidden: torch.Tensor) -> torch.Tensor:
        z = self.mlp_head(latency_hidden).float()
        if self.granularity == "head":
            z = z.view(-1, self.num_schedulable_layers, 2, self.num_switches)
        return z

    def forward(self, latency_hidden, k, *, group_size: int, tau: float, stochastic: bool, generator=None):
        """-> (plan [B, S, 2, H] in the hidden state's dtype, logits)."""
        z = self.logits(latency_hidden)
        if self.granularity == "layer":
            layers = sample_layer_plan(z, k, tau, stochastic, generator)
            plan = layers[:, :, None, None].expand(-1, -1, 2, self.num_switches)
        else:
            plan = sample_head_plan(z, k, group_size, tau, stochastic, generator)
        return plan.to(latency_hidden.dtype), z
