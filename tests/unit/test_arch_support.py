"""Nothing the decoder loop would bypass runs silently: unsupported language models, wrapped projections and forward
hooks are refused by name; supported ones (llama, mistral, qwen2) match transformers' own model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from adallava.config import AdaLlavaConfig
from adallava.modeling import AdaLlavaForConditionalGeneration
from adallava.presets import build_tiny, tiny_config


def _ids(batch=2, T=8):
    ids = torch.randint(5, 100, (batch, T), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def test_qwen3_refused_naming_the_architecture():
    cfg = tiny_config()
    text = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=32)  # fmt: skip
    config = AdaLlavaConfig(vision_config=cfg.vision_config, text_config=text, image_token_index=4,
                            image_seq_length=16)  # fmt: skip
    with pytest.raises(ValueError, match="'qwen3'.*Qwen3Config.*not supported"):
        AdaLlavaForConditionalGeneration(config)


def test_attention_dropout_refused():
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        AdaLlavaForConditionalGeneration(tiny_config(attention_dropout=0.1))


def test_extra_submodule_refused_by_path():
    model, _ = build_tiny()
    model.model.language_model.layers[3].self_attn.q_norm = torch.nn.LayerNorm(32)
    ids, mask = _ids()
    with pytest.raises(ValueError, match=r"layers\.3\.self_attn has submodules \['q_norm'\]"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


class _Scaled(torch.nn.Linear):  # a wrapper that keeps .weight, as quantised/custom Linears do
    def forward(self, x):
        return 2 * super().forward(x)


def test_wrapped_projection_refused_by_path():
    model, _ = build_tiny()
    old = model.model.language_model.layers[5].mlp.down_proj
    new = _Scaled(old.in_features, old.out_features, bias=False)
    new.weight = old.weight
    model.model.language_model.layers[5].mlp.down_proj = new
    ids, mask = _ids()
    with pytest.raises(ValueError, match=r"layers\.5\.mlp\.down_proj is a .*_Scaled"):
        model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("where", ["self_attn.q_proj", "mlp.down_proj", "mlp", "self_attn", ""])
def test_forward_hooks_refused(where):
    model, _ = build_tiny()
    layer = model.model.language_model.layers[6]
    module = layer.get_submodule(where) if where else layer
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    ids, mask = _ids()
    with pytest.raises(ValueError, match="forward hooks"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="forward hooks"):
        model.train()(input_ids=ids, attention_mask=mask, labels=ids)
    handle.remove()
    model.eval().generate(ids, attention_mask=mask, max_new_tokens=2)  # fine once removed


def test_hooks_on_norms_fire():
    """The loop calls the norms as modules: their hooks are honoured, not refused."""
    model, _ = build_tiny()
    calls = []
    model.model.language_model.layers[0].input_layernorm.register_forward_hook(lambda *a: calls.append(1))
    ids, mask = _ids()
    model.generate(ids, attention_mask=mask, max_new_tokens=3)
    assert len(calls) == 3  # prefill + 2 decode steps


@pytest.mark.parametrize("text_model", ["llama", "mistral", "qwen2"])
def test_supported_models_match_transformers_at_budget_1(text_model):
    model, _ = build_tiny("head", text_model=text_model)
    lm = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    ids, mask = _ids(1, 10)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        lat = model.latency_token(torch.tensor([1.0], dtype=torch.float64))
        h = torch.cat([embeds, lat[:, None]], 1)  # what AdaLLaVA runs: the prompt, then the latency token
        ours = model(input_ids=ids, attention_mask=mask, budget=1.0).logits
        ref = lm(inputs_embeds=h).logits
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
