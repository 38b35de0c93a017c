"""Visual-token selection that composes with execution plans (spec 5): FastV inside the language model, PruMerge and
PruMerge+ before the projector (exactly LLaVA-PruMerge's algorithm, per image, with the per-token loop vectorised).

Both shorten the sequence the decoder layers see; rows of a batch keep different tokens, so the shortened rows are
packed to the right (dropped tokens become left padding) and keep their original position ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pack_right(keep: torch.Tensor):
    """keep [B, T] bool -> (index [B, T'], valid [B, T']): the kept positions of each row in their order, packed at the
    right end of a T' = max-kept-per-row window; dropped/padding positions fill the left and are invalid."""
    order = torch.sort(keep.long(), dim=1, stable=True).indices  # dropped first, kept after, each in order
    width = max(int(keep.sum(1).max()), 1)
    index = order[:, -width:]
    return index, keep.gather(1, index)


def fastv_keep(scores, image_mask, key_valid, ratio: float):
    """FastV: keep the ceil((1 - ratio) * n) image tokens of each row that the query attends to most; every other
    real token stays. scores, image_mask, key_valid: [B, T]. -> pack_right(keep)."""
    n_image = image_mask.sum(1)
    n_keep = torch.ceil((1 - ratio) * n_image.double()).long()
    s = scores.float().masked_fill(~image_mask, float("-inf"))
    rank = s.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    keep = key_valid.bool() & (~image_mask | (rank < n_keep[:, None]))
    return pack_right(keep)


@torch.no_grad()
def cls_attention_and_keys(vision_tower, pixel_values, feature_layer: int):
    """As LLaVA-PruMerge reads them (hooks on CLIP-L's encoder.layers[23] q_proj/k_proj for features from layer -2):
    the q and k projections of the encoder layer that *consumes* the selected features, over their full width (one
    head), CLS attention = softmax(q_cls . k / sqrt(width)) over all tokens, then the patches' part.
    -> (hidden_states tuple, attention [N_img, P], keys [N_img, P, width])."""
    out = vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    hs = out.hidden_states
    j = feature_layer % len(hs)  # hidden_states[j] is the output of encoder layer j-1 and the input of layer j
    encoder = vision_tower.vision_model.encoder if hasattr(vision_tower, "vision_model") else vision_tower.encoder
    if j >= len(encoder.layers):
        raise ValueError(f"PruMerge reads the attention of the encoder layer after the selected features; "
                         f"vision_feature_layer={feature_layer} is the last layer's output (use -2, as LLaVA)")  # fmt: skip
    layer = encoder.layers[j]
    x = layer.layer_norm1(hs[j])
    q, k = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x)
    width = hs[j].shape[-1]
    attn = ((q[:, :1] @ k.transpose(-1, -2)) * width**-0.5).softmax(-1)  # [N, 1, n]
    return hs, attn[:, 0, 1:], k[:, 1:]


def _outlier_ratio(attention: torch.Tensor) -> float:
    """LLaVA-PruMerge's outlier_dectection: fraction of values above Q3 + 1.5 IQR (numpy percentiles, float32)."""
    import numpy as np

    a = attention.to(torch.float32).cpu().numpy().flatten()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    return len(np.where(a > q3 + 1.5 * (q3 - q1))[0]) / len(a)


def prumerge(features, cls_attention, keys, plus: bool = False, neighbours: int = 32):
    """PruMerge / PruMerge+ exactly as LLaVA-PruMerge's token_prune_merge_advanced(_plus) (inference, adaptive), per
    image:
      * keep the top int(P * r) patches by CLS attention, r = the IQR-outlier fraction (attention-descending order);
      * PruMerge+: append the spatial samples arange(0, P-1, int(int(1/r)/3)) not already kept;
      * each kept patch i becomes x_i + sum_j a_j x_j over its `neighbours` most key-similar (cosine) other patches,
        kept or not (no normalisation);
      * one extra token = sum over the patches not kept of a_j x_j.
    Where the reference fails (r = 0 in PruMerge+: 1/0; a stride of 0: arange step 0) this uses stride max(., 1) and
    P/3; when every patch is kept the (zero) extra token is left out, so that at most P tokens come back.

    features [N, P, D], cls_attention [N, P], keys [N, P, Dk] -> (tokens [N, P, D], valid [N, P]): each image's tokens
    first, in the reference's order, then padding.
    """
    N, P, D = features.shape
    out = torch.zeros_like(features)
    valid = torch.zeros(N, P, dtype=torch.bool, device=features.device)
    for n in range(N):
        a, x, k = cls_attention[n], features[n], keys[n]
        ratio = _outlier_ratio(a)
        idx = torch.topk(a, int(P * ratio), largest=True).indices
        if plus:
            stride = max(int(int(1 / ratio) / 3), 1) if ratio > 0 else max(P // 3, 1)
            seq = torch.arange(0, P - 1, stride, device=a.device)
            idx = torch.cat([idx, seq[~torch.isin(seq, idx)]])
        kept = torch.zeros(P, dtype=torch.bool, device=a.device)
        kept[idx] = True
        compl = (~kept).nonzero().flatten()  # ascending, as complement_idx
        order = torch.cat([idx, compl])  # candidates: the other kept patches (in order), then the rest
        kn = F.normalize(k[order], p=2, dim=-1)
        m = len(idx)
        merged = x[idx].clone()
        if m and P > 1:
            sim = kn[:m] @ kn.T  # [m, P]
            sim[torch.arange(m), torch.arange(m)] = float("-inf")  # a patch is not its own neighbour
            top = sim.topk(min(neighbours, P - 1), dim=-1).indices  # [m, K]
            cand = order[top]
            merged = (x[cand] * a[cand][..., None]).sum(1) + x[idx]
        tokens = [merged]
        if m < P:
            tokens.append((x[compl] * a[compl][:, None]).sum(0, keepdim=True))
        t = torch.cat(tokens)
        out[n, : len(t)] = t
        valid[n, : len(t)] = True
    return out, valid


def keep_ratio(valid: torch.Tensor) -> float:
    return float(valid.float().mean())

