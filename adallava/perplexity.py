"""Perplexity on held-out English text, for the language model of any preset (text only, no image).

The text: Python's own reference documentation, which ships inside the standard library (pydoc_data.topics: 79
topics of English prose with some code), so it is there offline on every machine. Topics are split into a training
set and a disjoint evaluation set (every 4th topic, sorted by name). Each chunk is `n_ctx` tokens of context (not
scored) and `n_cont` tokens of continuation (scored); AdaLLaVA's latency token sits between them (after the prompt,
before the answer), so the scheduler sees the context.

    chunks = text_chunks(tokenizer, 48, 48, "eval")[:12]
    math.exp(nll(model, chunks, 48, 12, budget=0.8)[0] / nll(...)[1])            # the scheduler's plan
    nll(model, chunks, 48, 12, 1.0, lambda B: layer_plan(model.config, B, range(k)))  # early exit after k layers
    nll_plain(model, chunks, 48, 12)                                              # the language model alone

Used by bench/bench_smol.py and pipelines/evaluate.py (perplexity per method and budget).
"""

from __future__ import annotations

import math


def text_chunks(tokenizer, n_ctx: int, n_cont: int, split: str) -> list[list[int]]:
    """Non-overlapping chunks of n_ctx + n_cont tokens from the stdlib's Python reference topics, interleaved across
    topics (chunk 0 of every topic, then chunk 1, ...) so a small set still spans many topics."""
    from pydoc_data.topics import topics

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    names = sorted(topics)
    chosen = [n for i, n in enumerate(names) if (i % 4 == 0) == (split == "eval")]
    size = n_ctx + n_cont
    per_topic = []
    for name in chosen:
        ids = tokenizer(topics[name].strip(), add_special_tokens=False).input_ids
        per_topic.append([ids[i : i + size] for i in range(0, len(ids) - size + 1, size)])
    out = []
    for j in range(max(map(len, per_topic))):
        out += [chunks[j] for chunks in per_topic if j < len(chunks)]
    return out


def batches(chunks, n_ctx: int, batch: int):
    """(input_ids, labels) batches; the first n_ctx tokens of each chunk are context (label -100)."""
    import torch

    for i in range(0, len(chunks), batch):
        ids = torch.tensor(chunks[i : i + batch])
        labels = ids.clone()
        labels[:, :n_ctx] = -100  # context: not scored; the latency token goes right after it
        yield ids, labels


def nll(model, chunks, n_ctx: int, batch: int, budget, plan_fn=None) -> tuple[float, int]:
    """(summed NLL, scored tokens) of the continuations under AdaLLaVA's forward at `budget`; plan_fn(batch size) ->
    an execution plan to run instead of the scheduler's (baselines), or None = the scheduler."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in batches(chunks, n_ctx, batch):
            ids, labels = ids.to(model.device), labels.to(model.device)
            plan = plan_fn(ids.shape[0]) if plan_fn else None
            out = model(input_ids=ids, labels=labels, budget=budget, execution_plan=plan)
            lab = out.labels[:, 1:]
            total += F.cross_entropy(
                out.logits[:, :-1].float().flatten(0, 1), lab.flatten(), ignore_index=-100, reduction="sum"
            ).item()
            count += int((lab != -100).sum())
    return total, count


def nll_plain(model, chunks, n_ctx: int, batch: int) -> tuple[float, int]:
    """The language model alone (no latency token, every layer): the reference the adaptive model is measured
    against."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    lm = model.model.language_model
    with torch.no_grad():
        for ids, labels in batches(chunks, n_ctx, batch):
            ids, labels = ids.to(model.device), labels.to(model.device)
            hidden = lm(input_ids=ids, use_cache=False).last_hidden_state
            logits = model.lm_head(hidden)
            total += F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
            ).item()
            count += int((labels[:, 1:] != -100).sum())
    return total, count


def perplexity(result: tuple[float, int]) -> float:
    """exp(mean NLL) of an (nll sum, tokens) pair."""
    total, count = result
    if count == 0:
        raise ValueError("no scored tokens: the chunks have no continuation")
    return math.exp(total / count)


def layer_plan(config, batch: int, layers):
    """[batch, S, 2, H] plan running exactly the given schedulable layers (indices 0..S-1)."""
    import torch

    plan = torch.zeros(batch, config.num_schedulable_layers, 2, config.num_switches)
    plan[:, list(layers)] = 1.0
    return plan


def k_for(config, budget: float) -> int:
    """Schedulable units run at `budget` (the plan size the scheduler and the baselines use)."""
    import torch

    from .budget import units_for_budget

    return int(units_for_budget(torch.tensor([budget], dtype=torch.float64), config)[0])
