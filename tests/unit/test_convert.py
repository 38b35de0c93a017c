"""Official AdaLLaVA checkpoints (LLaVA-repo layout) convert, load and give the plans their own weights imply.

The synthetic checkpoints are written as the official code writes them: config.json with model_type
"ada_llava_llama", the Llama fields, the LLaVA mm_* fields and num_prefix_layers / scheduler_type / scheduler_rank /
token_selecting; weights in pytorch_model.bin with keys model.layers.*, model.mm_projector.{0,2}.*, lm_head.*,
scheduler.mlp_head.*, scheduler.scheduler_up_proj.net.{0,1,3}.* (and a stale rotary inv_freq buffer, as old
transformers saved it). The expected plans are computed from those source tensors by hand: transformers' own Llama
runs the prefix layers, the latency encoder and the scheduler head are applied with F.* on the source weights.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from adallava import budget as budgets
from adallava.cli import main
from adallava.convert import convert_official
from adallava.modeling import AdaLlavaForConditionalGeneration
from adallava.scheduler import sample_head_plan

L, P, HEADS, HIDDEN, VOCAB = 6, 3, 4, 64, 200


def _write_official(root, scheduler_type="L", token_selecting="none", rank=2, with_tower=False, seed=0):
    torch.manual_seed(seed)
    src, clip_dir = root / "official", root / "clip"
    src.mkdir()
    text = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=L,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=256, rms_norm_eps=1e-5,
                rope_theta=10000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    cfg = {
        "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["AdaLlavaLlamaForCausalLM"],
        "model_type": "ada_llava_llama", **text, "attention_bias": False, "pretraining_tp": 1, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True, "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad", "mm_hidden_size": 32, "mm_patch_merge_type": "flat", "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False, "use_mm_proj": True,
        "num_prefix_layers": P, "scheduler_type": scheduler_type, "scheduler_rank": rank,
        "token_selecting": token_selecting,
    }  # fmt: skip
    (src / "config.json").write_text(json.dumps(cfg))
    lm = LlamaForCausalLM(LlamaConfig(**text, tie_word_embeddings=False))
    state = {k: torch.randn_like(v) * 0.1 if v.dim() > 1 else 1 + 0.1 * torch.randn_like(v)
             for k, v in lm.state_dict().items()}  # fmt: skip
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"] = torch.randn(HIDDEN, 32), torch.randn(HIDDEN)
    state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"] = torch.randn(HIDDEN, HIDDEN), torch.randn(HIDDEN)
    out = (L - P) if scheduler_type == "L" else (L - P) * HEADS * 2
    state["scheduler.mlp_head.weight"], state["scheduler.mlp_head.bias"] = torch.randn(out, HIDDEN), torch.randn(out)
    state["scheduler.scheduler_up_proj.net.0.weight"] = 1 + 0.1 * torch.randn(256)
    state["scheduler.scheduler_up_proj.net.0.bias"] = 0.1 * torch.randn(256)
    state["scheduler.scheduler_up_proj.net.1.weight"] = torch.randn(HIDDEN, 256) * 0.1
    state["scheduler.scheduler_up_proj.net.1.bias"] = torch.randn(HIDDEN) * 0.1
    state["scheduler.scheduler_up_proj.net.3.weight"] = torch.randn(HIDDEN, HIDDEN) * 0.1
    state["scheduler.scheduler_up_proj.net.3.bias"] = torch.randn(HIDDEN) * 0.1
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, image_size=16, patch_size=4)).eval()  # fmt: skip
    if with_tower:  # LLaVA's CLIPVisionTower holds a CLIPVisionModel (keys vision_model.*) as .vision_tower
        for k, v in clip.state_dict().items():
            state[f"model.vision_tower.vision_tower.vision_model.{k}"] = v
    torch.save(state, src / "pytorch_model.bin")
    # the CLIP folder as openai/clip-vit-large-patch14-336 ships it: a CLIPModel (vision_model.* and a text half)
    clip_dir.mkdir()
    vision = {k: v for k, v in clip.config.to_dict().items() if k not in ("architectures", "transformers_version")}
    (clip_dir / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": vision,
                                                      "text_config": {"hidden_size": 16}}))  # fmt: skip
    tensors = {f"vision_model.{k}": v.contiguous() for k, v in clip.state_dict().items()}
    save_file({**tensors, "text_model.embeddings.token_embedding.weight": torch.zeros(4, 16),
               "logit_scale": torch.zeros(())}, str(clip_dir / "model.safetensors"))  # fmt: skip
    return src, clip_dir, state, lm, clip


def _latency_embedding(state, b, units, prefix_units):
    """The official latency encoder (simple_scheduler.latency_encoding) on the source tensors."""
    q = max(math.floor(units * b + 1e-9) - prefix_units, 0) / (units - prefix_units + 1)
    v = torch.tensor([q * 2 * math.pi])
    freq = 1 / (10000 ** (torch.arange(128) / 128))
    e = torch.cat([torch.sin(v[:, None] * freq), torch.cos(v[:, None] * freq)], 1)
    s = lambda n: state[f"scheduler.scheduler_up_proj.net.{n}"]  # noqa: E731
    x = F.layer_norm(e, (256,), s("0.weight"), s("0.bias"))
    x = F.gelu(F.linear(x, s("1.weight"), s("1.bias")))
    return F.linear(x, s("3.weight"), s("3.bias"))


def _expected(state, lm, ids, b, units, prefix_units):
    """(scheduler logits, LM logits at budget 1) from the source weights: latency token appended to the prompt."""
    lm.load_state_dict({k: v for k, v in state.items() if not k.startswith(("model.mm", "scheduler")) and
                        "inv_freq" not in k and not k.startswith("model.vision_tower")})  # fmt: skip
    lm.eval()
    with torch.no_grad():
        h = torch.cat([lm.model.embed_tokens(ids), _latency_embedding(state, b, units, prefix_units)[None]], 1)
        out = lm(inputs_embeds=h, output_hidden_states=True)
        x = out.hidden_states[P][0, -1]  # input of layer P = output of layer P-1, raw residual stream
        logits = F.linear(x, state["scheduler.mlp_head.weight"], state["scheduler.mlp_head.bias"])
    return logits, out.logits


@pytest.mark.parametrize("budget", [1.0, 5 / 6, 4 / 6, 0.5])
def test_layer_checkpoint_converts_and_plans_as_its_weights_imply(tmp_path, budget):
    src, clip_dir, state, lm, clip = _write_official(tmp_path, "L")
    summary = convert_official(src, tmp_path / "out", vision_tower=clip_dir)
    assert summary["dropped"] == ["model.layers.0.self_attn.rotary_emb.inv_freq", "clip:logit_scale",
                                  "clip:text_model.embeddings.token_embedding.weight"]
    assert summary["granularity"] == "layer" and summary["image_token_id"] == VOCAB and not summary["processor"]
    model = AdaLlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert model.config.num_prefix_layers == P and model.config.token_selection == "none"
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    logits, lm_logits = _expected(state, lm, ids, budget, L, P)
    k = max(math.floor(L * budget + 1e-9) - P, 0)
    expected = torch.zeros(L - P)
    expected[logits.topk(k).indices] = 1 if k else 0
    with torch.no_grad():
        out = model(input_ids=ids, budget=budget)
    assert torch.equal(out.plan[0, :, 0, 0], expected)
    assert torch.equal(out.plan[0, :, 1, :], expected[:, None].expand(-1, HEADS))
    if budget == 1.0:  # every layer runs: the converted LM is the source LM
        torch.testing.assert_close(out.logits[..., :VOCAB], lm_logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("with_tower", [False, True])
def test_head_checkpoint_with_prumerge_plus(tmp_path, with_tower):
    src, clip_dir, state, lm, clip = _write_official(tmp_path, "H", "prumerge+", rank=2, with_tower=with_tower)
    convert_official(src, tmp_path / "out", vision_tower=clip_dir)
    model = AdaLlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    cfg = model.config
    assert (cfg.granularity, cfg.group_size, cfg.units_per_layer, cfg.token_selection) == ("head", 2, 2, "prumerge+")
    units, prefix_units = L * HEADS // 2, P * HEADS // 2  # the official T_u, P_u with scheduler_rank 2
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    for budget in (0.75, 5 / 6, 7 / 12):
        logits, _ = _expected(state, lm, ids, budget, units, prefix_units)
        k = torch.tensor([max(math.floor(units * budget + 1e-9) - prefix_units, 0)])
        expected = sample_head_plan(logits.view(1, L - P, 2, HEADS), k, 2, 5.0, False, None)
        with torch.no_grad():
            out = model(input_ids=ids, budget=budget)
        assert torch.equal(out.plan, expected)
        assert int(out.plan.sum()) == 2 * 2 * int(k)  # k units of 2 heads + 2 neuron groups
    # the vision path: CLIP layer -2 patches through the source projector
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ours = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        feats = clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        s = state
        ref = F.linear(F.gelu(F.linear(feats, s["model.mm_projector.0.weight"], s["model.mm_projector.0.bias"])),
                       s["model.mm_projector.2.weight"], s["model.mm_projector.2.bias"])  # fmt: skip
    torch.testing.assert_close(torch.cat(list(ours)), ref[0], atol=1e-5, rtol=1e-4)


def test_cli_convert_and_refusals(tmp_path, capsys):
    src, clip_dir, *_ = _write_official(tmp_path, "L", "prumerge")
    assert main(["convert", str(src), str(tmp_path / "out"), "--vision-tower", str(clip_dir)]) == 0
    assert json.loads((tmp_path / "out" / "conversion.json").read_text())["token_selection"] == "prumerge"
    assert "converted" in capsys.readouterr().out
    cfg = json.loads((src / "config.json").read_text())
    for field, value, message in [("token_selecting", "adaptive", "token_selecting='adaptive'"),
                                  ("model_type", "llava_llama", "not an official AdaLLaVA"),
                                  ("mm_use_im_start_end", True, "mm_use_im_start_end=True")]:  # fmt: skip
        (src / "config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(ValueError, match=message):
            convert_official(src, tmp_path / "bad", vision_tower=clip_dir)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vision tower"):
        convert_official(src, tmp_path / "bad")
    state = torch.load(src / "pytorch_model.bin")
    state["scheduler.extra_head.weight"] = torch.zeros(1)
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="scheduler.extra_head.weight"):
        convert_official(src, tmp_path / "bad", vision_tower=clip_dir)
