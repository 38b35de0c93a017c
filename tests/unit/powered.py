"""Tiny test models with power: greedy outputs that vary from token to token.

`presets.build_tiny` initialises weights with std 0.02 (transformers' default), and such a random model repeats one
token or a 2-cycle (`[54] * 8`), so a token-equality test passes for many broken computations (a decode step that
never writes its KV cache passed on 2 of 6 architectures). Redrawing the language model's matrices, the LM head, the
latency encoder and the scheduler head with a larger std makes every token depend on the whole computation. The
`tiny` preset itself is unchanged (the pipelines' published numbers depend on it): this is a test fixture only.
"""

from __future__ import annotations

import torch

from adallava.presets import build_tiny

POWER_STD = 0.15


def power_up(model, std: float = POWER_STD, seed: int = 0):
    """Redraw every matrix of the language model, the LM head, the latency encoder and the scheduler head from
    N(0, std^2) (biases and norms untouched). Deterministic given the seed; returns the model."""
    g = torch.Generator().manual_seed(seed)
    modules = (model.model.language_model, model.lm_head, model.latency_encoder, model.scheduler)
    with torch.no_grad():
        for module in modules:
            for _, p in sorted(module.named_parameters()):
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
    return model


def build_powered(granularity: str = "layer", text_model: str = "llama", seed: int = 0, **overrides):
    """(model, processor) like build_tiny, with power_up applied (eval mode)."""
    model, processor = build_tiny(granularity, text_model, seed=seed, **overrides)
    return power_up(model, seed=seed), processor


def distinct_tokens(sequences: torch.Tensor) -> list[int]:
    """Number of distinct tokens in each row (a fixture's power check)."""
    return [len(set(row.tolist())) for row in sequences]
