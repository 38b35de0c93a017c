"""PruMerge and PruMerge+ equal LLaVA-PruMerge's reference code (42Shawn/LLaVA-PruMerge, clip_encoder.py:
token_prune_merge_advanced and token_prune_merge_advanced_plus, inference path with if_adaptive=True) on the same
inputs. The reference functions are ported below line for line (hooks on the CLIP layer after the selected
features, `23` for CLIP-L with -2; numpy percentiles; per-token loops), batch 1 as the reference runs them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from adallava import tokens


def complement_idx(idx, dim):
    a = torch.arange(dim, device=idx.device)
    ndim = idx.ndim
    dims = idx.shape
    n_idx = dims[-1]
    dims = dims[:-1] + (-1,)
    for i in range(1, ndim):
        a = a.unsqueeze(0)
    a = a.expand(*dims)
    masked = torch.scatter(a, -1, idx, 0)
    compl, _ = torch.sort(masked, dim=-1, descending=False)
    compl = compl.permute(-1, *tuple(range(ndim - 1)))
    compl = compl[n_idx:].permute(*(tuple(range(1, ndim)) + (0,)))
    return compl


def outlier_dectection(attn):
    attn_np = attn.to(dtype=torch.float32).cpu().numpy().flatten()
    Q1 = np.percentile(attn_np, 25)
    Q3 = np.percentile(attn_np, 75)
    IQR = Q3 - Q1
    upper_bound = Q3 + 1.5 * IQR
    outlier_indices = np.where((attn_np > upper_bound))[0]
    return len(outlier_indices) / len(attn_np)


def reference(vision_tower, images, select_layer=-2, plus=False):
    outputs = {}
    encoder = vision_tower.vision_model.encoder if hasattr(vision_tower, "vision_model") else vision_tower.encoder
    layer = encoder.layers[len(encoder.layers) + select_layer + 1]  # layers[23] for CLIP-L (24 layers), -2
    hook_handle_k = layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: outputs.__setitem__("desired_k", o))
    hook_handle_q = layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: outputs.__setitem__("desired_q", o))
    image_forward_outs = vision_tower(images, output_hidden_states=True)
    image_features = image_forward_outs.hidden_states[select_layer][:, 1:].to(images.dtype)
    B, N, C = image_features.shape
    desired_layer_k = outputs["desired_k"]
    desired_layer_q = outputs["desired_q"]
    hook_handle_k.remove()
    hook_handle_q.remove()
    attn = (desired_layer_q @ desired_layer_k.transpose(-2, -1)) * C**-0.5
    attn = F.softmax(attn, dim=-1)
    cls_attn = attn[:, 0, 1:]
    reduction_ratio = outlier_dectection(cls_attn)
    _, idx = torch.topk(cls_attn, int(N * reduction_ratio), dim=1, largest=True)
    if plus:
        step_length = int(1 / reduction_ratio)
        arithmetic_sequence = torch.arange(0, N - 1, int(step_length / 3))  # 575 for CLIP-L's 576 patches
        original_tensor_1d = idx.flatten()
        filtered_sequence = torch.tensor([x for x in arithmetic_sequence if x not in original_tensor_1d], dtype=torch.long)
        idx = torch.cat((idx, filtered_sequence.unsqueeze(0)), dim=1)
    index = idx.unsqueeze(-1).expand(-1, -1, C)
    Key_wo_cls = desired_layer_k[:, 1:]
    x_others = torch.gather(image_features, dim=1, index=index)
    x_others_attn = torch.gather(cls_attn, dim=1, index=idx)
    Key_others = torch.gather(Key_wo_cls, dim=1, index=index)
    compl = complement_idx(idx, N)
    non_topk = torch.gather(image_features, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_Key = torch.gather(Key_wo_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)
    Key_others_norm = F.normalize(Key_others, p=2, dim=-1)
    non_topk_Key_norm = F.normalize(non_topk_Key, p=2, dim=-1)
    B, left_tokens, C = x_others.size()
    updated_x_others = torch.zeros_like(x_others)
    for b in range(B):
        for i in range(left_tokens):
            key_others_norm = Key_others_norm[b, i, :].unsqueeze(0).unsqueeze(0)
            before_i_Key = Key_others_norm[b, :i, :].unsqueeze(0)
            after_i_Key = Key_others_norm[b, i + 1 :, :].unsqueeze(0)
            before_i_x_others = x_others[b, :i, :].unsqueeze(0)
            after_i_x_others = x_others[b, i + 1 :, :].unsqueeze(0)
            rest_x_others = torch.cat([before_i_x_others, after_i_x_others, non_topk[b, :, :].unsqueeze(0)], dim=1)
            before_i_x_others_attn = x_others_attn[b, :i].unsqueeze(0)
            after_i_x_others_attn = x_others_attn[b, i + 1 :].unsqueeze(0)
            rest_x_others_attn = torch.cat([before_i_x_others_attn, after_i_x_others_attn,
                                            non_topk_attn[b, :].unsqueeze(0)], dim=1)  # fmt: skip
            rest_Keys = torch.cat([before_i_Key, after_i_Key, non_topk_Key_norm[b, :, :].unsqueeze(0)], dim=1)
            cos_sim_matrix = torch.bmm(key_others_norm, rest_Keys.transpose(1, 2))
            _, cluster_indices = torch.topk(cos_sim_matrix, k=int(32), dim=2, largest=True)
            cluster_tokens = rest_x_others[:, cluster_indices.squeeze(), :]
            weights = rest_x_others_attn[:, cluster_indices.squeeze()].unsqueeze(-1)
            weighted_avg = torch.sum(cluster_tokens * weights, dim=1)
            updated_center = weighted_avg + x_others[b, i, :]
            updated_x_others[b, i, :] = updated_center
    extra_one_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
    return torch.cat([updated_x_others, extra_one_token], dim=1)


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           image_size=112, patch_size=7)  # 256 patches  # fmt: skip
    vt = CLIPVisionModel(cfg).eval()
    with torch.no_grad():  # a sharper CLS attention (as trained CLIP has), so that a few patches are outliers
        encoder = vt.vision_model.encoder if hasattr(vt, "vision_model") else vt.encoder
        encoder.layers[3].self_attn.q_proj.weight.mul_(6)
    return vt


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prumerge_equals_reference(tower, plus, seed):
    images = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = reference(tower, images, plus=plus)[0]
        hs, attn, keys = tokens.cls_attention_and_keys(tower, images, -2)
        out, valid = tokens.prumerge(hs[-2][:, 1:], attn, keys, plus=plus)
    assert 2 <= ref.shape[0] < 256  # some patches kept, some merged
    assert int(valid.sum()) == ref.shape[0] and bool(valid[0, : ref.shape[0]].all())
    torch.testing.assert_close(out[0, : ref.shape[0]], ref, atol=1e-5, rtol=1e-5)


def test_batched_images_equal_one_by_one(tower):
    images = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hs, attn, keys = tokens.cls_attention_and_keys(tower, images, -2)
        out, valid = tokens.prumerge(hs[-2][:, 1:], attn, keys, plus=True)
        for i in range(3):
            ref = reference(tower, images[i : i + 1], plus=True)[0]
            assert int(valid[i].sum()) == ref.shape[0]
            torch.testing.assert_close(out[i, : ref.shape[0]], ref, atol=1e-5, rtol=1e-5)


def test_last_layer_features_refused(tower):
    with pytest.raises(ValueError, match="vision_feature_layer=-1"):
        tokens.cls_attention_and_keys(tower, torch.randn(1, 3, 112, 112), -1)
