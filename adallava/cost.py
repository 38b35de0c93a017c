"""Analytic FLOPs of a request under an execution plan (multiply-add = 2 FLOPs, as LLM-Viewer counts).

Counted: each decoder layer's projections, attention matmuls and MLP, scaled by the heads, key/value heads and neuron
groups that run; lm_head for each generated token; the latency encoder and scheduler (once per request); and, when the
request has images, the vision tower and projector. Norms, RoPE and softmax are left out (under 1% at these shapes).
"""

from __future__ import annotations

import torch


def layer_flops(hidden, head_dim, n_q, n_kv, n_neurons, n_new, n_ctx_start):
    """One decoder layer on n_new tokens whose first attends to n_ctx_start + 1 keys (causal)."""
    proj = 2 * n_new * hidden * head_dim * (2 * n_q + 2 * n_kv)  # q, o + k, v
    # keys seen by the new tokens: (n_ctx_start+1) + ... + (n_ctx_start+n_new)
    keys = n_new * n_ctx_start + n_new * (n_new + 1) / 2
    attn = 2 * 2 * n_q * head_dim * keys  # QK^T and AV
    mlp = 3 * 2 * n_new * hidden * n_neurons
    return proj + attn + mlp


def _active_sizes(config, plan):
    """Per row and layer: (query heads, key/value heads, neurons) that run. plan [B, S, 2, H] -> three [B, L] tensors."""
    text = config.text_config
    H, n_kv_total = text.num_attention_heads, text.num_key_value_heads
    n_rep = H // n_kv_total
    B = plan.shape[0]
    on = plan.detach().float().cpu() > 0.5
    heads = on[:, :, 0]  # [B, S, H]
    q = heads.sum(-1).double()
    kv = heads.view(B, -1, n_kv_total, n_rep).any(-1).sum(-1).double()
    sizes = torch.tensor([len(g) for g in torch.tensor_split(torch.arange(text.intermediate_size), H)]).double()
    neurons = (on[:, :, 1].double() * sizes).sum(-1)
    P = config.num_prefix_layers
    full = torch.ones(B, P, dtype=torch.float64)
    return (
        torch.cat([full * H, q], 1),
        torch.cat([full * n_kv_total, kv], 1),
        torch.cat([full * text.intermediate_size, neurons], 1),
    )


def vision_flops(config) -> float:
    """CLIP-style vision tower on one image plus the 2-layer projector."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2 + 1
    patch_embed = 2 * (n - 1) * 3 * v.patch_size**2 * v.hidden_size
    per_layer = 2 * n * v.hidden_size * (4 * v.hidden_size + 2 * v.intermediate_size) + 4 * n * n * v.hidden_size
    h = config.text_config.hidden_size
    projector = 2 * config.image_seq_length * (v.hidden_size * h + h * h)
    return float(patch_embed + v.num_hidden_layers * per_layer + projector)


def scheduler_flops(config) -> float:
    h = config.text_config.hidden_size
    out = config.num_schedulable_layers * (1 if config.granularity == "layer" else 2 * config.num_switches)
    return float(2 * (config.latency_embed_dim * h + h * h) + 2 * h * out)


def request_flops(config, plan, prompt_len, num_generated, num_images=None) -> torch.Tensor:
    """FLOPs of each request [B] (float64): prefill of prompt_len tokens (latency token included), then one decode
    step per generated token after the first, lm_head once per generated token."""
    text = config.text_config
    hidden, head_dim = text.hidden_size, getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q, kv, neurons = _active_sizes(config, plan)
    prompt_len = prompt_len.detach().cpu().double()
    num_generated = num_generated.detach().cpu().double()
    total = torch.zeros(plan.shape[0], dtype=torch.float64)
    for b in range(plan.shape[0]):
        n, g = float(prompt_len[b]), float(num_generated[b])
        steps = max(g - 1, 0)
        for layer in range(config.num_layers):
            args = (hidden, head_dim, float(q[b, layer]), float(kv[b, layer]), float(neurons[b, layer]))
            total[b] += layer_flops(*args, n_new=n, n_ctx_start=0)
            if steps:  # decode steps attend to n+1, ..., n+steps keys
                total[b] += layer_flops(*args, n_new=steps, n_ctx_start=n)
        total[b] += 2 * hidden * text.vocab_size * g + scheduler_flops(config)
    if num_images is not None:
        total += num_images.detach().cpu().double() * vision_flops(config)
    return total
