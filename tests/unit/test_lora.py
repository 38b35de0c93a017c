"""peft LoRA on the language model: adapters take effect in skip and mask modes exactly as the merged weights would,
train (gradients reach them only), and survive a save/load round trip."""

import copy

import pytest
import torch

from adallava import lora
from adallava.presets import build_tiny


def _with_lora(granularity, seed=0, text_model="llama"):
    model, processor = build_tiny(granularity, text_model=text_model, seed=seed)
    lora.add_lora(model, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft initialises B to 0 (no effect): make every adapter count
            p.data = torch.randn(p.shape, generator=g) * 0.2
    return model.eval(), processor


def _inputs(batch=3, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (batch, T), generator=g)
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("granularity,text_model", [("layer", "llama"), ("head", "llama"), ("head", "mistral")])
@pytest.mark.parametrize("mode", ["skip", "mask"])
def test_lora_equals_merged_weights(granularity, text_model, mode):
    model, _ = _with_lora(granularity, text_model=text_model)
    ids, mask = _inputs()
    budgets = [1.0, 0.75, 0.625]  # full, partly used (head) and skipped layers in one batch
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, budget=budgets, plan_mode=mode)
        merged = lora.merge_lora(copy.deepcopy(model))
        assert not lora.has_lora(merged)
        ref = merged(input_ids=ids, attention_mask=mask, budget=budgets, plan_mode=mode)
        plain, _ = build_tiny(granularity, text_model=text_model, seed=0)
        base = plain.eval()(input_ids=ids, attention_mask=mask, budget=budgets, plan_mode=mode)
    torch.testing.assert_close(out.plan, ref.plan)
    torch.testing.assert_close(out.logits, ref.logits, atol=2e-5, rtol=1e-4)
    assert (out.logits - base.logits).abs().max() > 1e-2  # the adapters changed the outputs


def test_lora_generate_equals_merged():
    model, _ = _with_lora("head")
    ids, mask = _inputs(batch=2)
    kw = dict(budget=[0.875, 0.625], max_new_tokens=5, return_dict_in_generate=True)
    out = model.generate(ids, attention_mask=mask, **kw)
    ref = lora.merge_lora(copy.deepcopy(model)).generate(ids, attention_mask=mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.plan, ref.plan)


def test_lora_trains_only_adapters():
    model, _ = _with_lora("layer")
    model.train()
    ids, mask = _inputs()
    labels = ids.clone()
    labels[:, :4] = -100
    model(input_ids=ids, attention_mask=mask, labels=labels, budget=[1.0, 0.75, 0.5]).loss.backward()
    lm = model.model.language_model
    lora_grads = [p.grad for n, p in lm.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert sum(float(g.abs().sum()) for g in lora_grads) > 0
    assert all(not p.requires_grad for n, p in lm.named_parameters() if "lora_" not in n)
    assert model.scheduler.mlp_head.weight.grad is not None  # the scheduler still trains


def test_lora_save_load_round_trip(tmp_path):
    model, _ = _with_lora("head")
    lora.save_lora(model, tmp_path)
    assert (tmp_path / lora.CONFIG_FILE).is_file() and (tmp_path / lora.WEIGHTS_FILE).is_file()
    fresh, _ = build_tiny("head", seed=0)
    lora.load_lora(fresh, tmp_path)
    fresh.eval()
    ids, mask = _inputs()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, budget=[1.0, 0.75, 0.625]).logits
        b = fresh(input_ids=ids, attention_mask=mask, budget=[1.0, 0.75, 0.625]).logits
    assert torch.equal(a, b)
    base = lora.base_state_dict(model)
    assert not any(".lora_" in k or ".base_layer." in k for k in base)
    assert set(base) == set(build_tiny("head", seed=0)[0].state_dict())


def test_lora_refuses_unknown_targets_and_dora():
    model, _ = build_tiny("layer")
    with pytest.raises(ValueError, match="target_modules"):
        lora.add_lora(model, target_modules=("q_proj", "embed_tokens"))
    with pytest.raises(ValueError, match="DoRA"):
        lora.add_lora(model, r=2, use_dora=True)


def test_pipeline_checkpoint_with_lora_loads_with_its_adapters(tmp_path):
    """pipelines.train.save_checkpoint writes base weights + adapter files; presets.load joins them again."""
    from adallava import presets
    from pipelines.train import save_checkpoint

    model, processor = _with_lora("head")
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), lambda s: 1.0)
    save_checkpoint(tmp_path / "step", model, processor, {}, sched, {"step": 1})
    assert (tmp_path / "step" / lora.CONFIG_FILE).is_file()
    loaded, _ = presets.load(tmp_path / "step")
    assert lora.has_lora(loaded)
    ids, mask = _inputs()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, budget=[1.0, 0.75, 0.625]).logits
        b = loaded(input_ids=ids, attention_mask=mask, budget=[1.0, 0.75, 0.625]).logits
    assert torch.equal(a, b)


def test_train_config_lora_keys_checked():
    from pipelines.train import validate

    with pytest.raises(ValueError, match="lora: unknown key.*'rank'"):
        validate(_adapt_cfg(lora={"rank": 8}))
    with pytest.raises(ValueError, match="stage adapt only"):
        validate(_adapt_cfg(stage="base", lora={"r": 8}))


def _adapt_cfg(**kw):
    from pipelines.config import TrainConfig

    return TrainConfig(**{"stage": "adapt", "global_batch_size": 32, "micro_batch_size": 16, "num_workers": 2, **kw})
