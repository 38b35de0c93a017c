"""Where the latency token looks: its attention over the image patches in the prefix layers (the paper's qualitative
figure, and the overlay of the Serve playground's "compare budgets" view). Computed from the model's own modules
without touching the model code: forward hooks capture each layer's normalised input, and softmax(q_lat k^T / sqrt(d))
is recomputed with the layer's q/k projections and rotary embedding, exactly as the layer's attention computes it.

Lives in the library (not in pipelines/) so that evaluation and the Serve replicas share one computation."""

from __future__ import annotations

import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@torch.no_grad()
def latency_token_attention(model, input_ids, pixel_values, attention_mask, budget: float) -> torch.Tensor:
    """One request (batch of 1) -> [num_prefix_layers, num_heads, num_image_tokens]: the attention weights of the
    latency token (appended at the end of the prompt, spec 1.4) over the image tokens in each prefix layer."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"one request at a time, got a batch of {input_ids.shape[0]}")
    if model.training:
        raise RuntimeError("call model.eval() first")
    if getattr(model.config, "token_selection", "none") != "none":
        # FastV / PruMerge drop or merge image tokens inside the prefix layers: the image positions of input_ids no
        # longer index the hidden states, so the map would be wrong. Refused rather than drawn wrong.
        raise ValueError(f"latency-token attention needs token_selection='none', the model has "
                         f"{model.config.token_selection!r}")
    layers = model.model.language_model.layers
    P = model.config.num_prefix_layers
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layers[i].input_layernorm.register_forward_hook(lambda m, args, out, i=i: captured.setdefault(i, out))
        for i in range(P)
    ]
    try:
        model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, budget=budget)
    finally:
        for h in hooks:
            h.remove()
    mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)  # + the latency token
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    image_pos = (input_ids[0] == model.config.image_token_id).nonzero().flatten()
    lm = model.model.language_model
    out = []
    for i in range(P):
        x = captured[i]  # [1, T+1, D], the latency token last
        if x.shape[1] != mask.shape[1]:
            raise ValueError(f"layer {i} saw {x.shape[1]} positions, expected {mask.shape[1]} (prompt + latency token)")
        attn = layers[i].self_attn
        d = attn.head_dim
        T1 = x.shape[1]
        q = attn.q_proj(x).view(1, T1, -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(1, T1, -1, d).transpose(1, 2)
        cos, sin = lm.rotary_emb(x, position_ids)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention
        scores = (q[:, :, -1:] @ k.transpose(-1, -2)).squeeze(2) * attn.scaling  # [1, H, T+1]
        scores = scores.masked_fill(~mask.bool()[:, None], float("-inf"))
        out.append(scores.softmax(-1)[0][:, image_pos])
    return torch.stack(out)


def attention_map(attention: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """latency_token_attention's [num_prefix_layers, num_heads, num_image_tokens] -> [side, side] map over the image's
    patch grid (row-major, as the vision tower orders patches): one prefix layer (default the last, the one whose
    output the scheduler reads), mean over heads, normalised to sum to 1 over the image."""
    if attention.dim() != 3:
        raise ValueError(f"expected [layers, heads, image tokens], got shape {tuple(attention.shape)}")
    n = attention.shape[-1]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} image tokens do not form a square patch grid")
    grid = attention[layer].float().mean(0).view(side, side)
    return grid / grid.sum().clamp(min=1e-12)
