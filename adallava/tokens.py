"""Visual-token selection that composes with execution plans (spec 5): FastV inside the language model, PruMerge and
PruMerge+ before the projector. Batched and vectorised: no per-token Python loops, any mix of budgets in a batch.

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
    """From a CLIP-style vision tower: the hidden states, the CLS token's attention over the patches (mean over heads)
    in the layer that produces the selected features, and that layer's keys of the patches.
    -> (hidden_states tuple, attention [N_img, P], keys [N_img, P, D])."""
    out = vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    hs = out.hidden_states
    j = feature_layer % len(hs)  # hidden_states[j] is the output of encoder layer j-1
    encoder = vision_tower.vision_model.encoder if hasattr(vision_tower, "vision_model") else vision_tower.encoder
    layer = encoder.layers[j - 1]
    x = layer.layer_norm1(hs[j - 1])
    attn = layer.self_attn
    B, n, _ = x.shape
    heads, d = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(B, n, heads, d).transpose(1, 2)
    k = attn.k_proj(x).view(B, n, heads, d).transpose(1, 2)
    a = (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2) * attn.head_dim**-0.5  # CLS query [B, H, n]
    a = a.softmax(-1).mean(1)[:, 1:]
    keys = k.transpose(1, 2).reshape(B, n, heads * d)[:, 1:]
    return hs, a, keys


def prumerge(features, cls_attention, keys, plus: bool = False, neighbours: int = 32):
    """PruMerge (LLaVA-PruMerge): keep the patches whose CLS attention is an IQR outlier (> Q3 + 1.5 IQR); merge into
    each the pruned patches most similar to it by key (cosine), weighted by CLS attention; add one token that is the
    attention-weighted mean of all pruned patches. PruMerge+ also keeps spatially uniform patches (about three per
    outlier), as in the paper.

    features [N, P, D], cls_attention [N, P], keys [N, P, Dk] -> (tokens [N, P, D], valid [N, P]): each image's
    selected tokens first (spatial order), then the merged extra token, then padding.
    """
    N, P, D = features.shape
    a = cls_attention.float()
    q1, q3 = torch.quantile(a, 0.25, dim=1), torch.quantile(a, 0.75, dim=1)
    keep = a > (q3 + 1.5 * (q3 - q1))[:, None]
    keep[torch.arange(N), a.argmax(1)] = True  # never nothing
    if plus:
        stride = torch.clamp(P // (3 * keep.sum(1)), min=1)
        keep |= (torch.arange(P, device=a.device)[None] % stride[:, None]) == 0
    pruned = ~keep
    kn = F.normalize(keys.float(), dim=-1)
    sim = (kn @ kn.transpose(1, 2)).masked_fill(~pruned[:, None, :], float("-inf"))  # kept rows x pruned columns
    m = min(neighbours, P)
    top, idx = sim.topk(m, dim=-1)  # [N, P, m]
    w = torch.where(torch.isfinite(top), a.gather(1, idx.flatten(1)).view(N, P, m), torch.zeros_like(top))
    f = features.float()
    gathered = f.gather(1, idx.flatten(1)[..., None].expand(-1, -1, D)).view(N, P, m, D)
    merged = (a[..., None] * f + (w[..., None] * gathered).sum(2)) / (a + w.sum(-1))[..., None]
    pa = a * pruned
    extra = (pa[..., None] * f).sum(1) / pa.sum(1, keepdim=True).clamp(min=1e-12)  # [N, D]
    has_extra = pruned.any(1)
    # order: kept (spatial order) | extra | padding
    rank = torch.where(keep, torch.cumsum(keep.long(), 1) - 1, torch.full_like(a, P, dtype=torch.long))
    n_keep = keep.sum(1)
    out = torch.zeros(N, P + 1, D, dtype=torch.float32, device=features.device)
    out.scatter_(1, rank[..., None].expand(-1, -1, D), torch.where(keep[..., None], merged, torch.zeros_like(merged)))
    out[torch.arange(N), n_keep] = torch.where(has_extra[:, None], extra, out[torch.arange(N), n_keep])
    valid = torch.arange(P + 1, device=a.device)[None] < (n_keep + has_extra.long())[:, None]
    return out[:, :P].to(features.dtype), valid[:, :P]


def keep_ratio(valid: torch.Tensor) -> float:
    return float(valid.float().mean())

