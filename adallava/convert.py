"""Official AdaLLaVA checkpoints (the LLaVA-repo format of github.com/zhuoyanxu/AdaLLaVA) -> this library's format.

    adallava convert SRC DST --vision-tower CLIP_DIR        # or: convert_official(SRC, DST, vision_tower=CLIP_DIR)
    model, processor = adallava.presets.load(DST)

SRC is an official checkpoint folder (ada-llava-{L,H}-v1.5-{7b,13b}[-prumerge[-plus]]): config.json with
model_type "ada_llava_llama" and the LLaVA fields (mm_*), weights as pytorch_model*.bin or model*.safetensors.
Its state dict maps as spec section 7 lists:

    model.embed_tokens / model.layers.* / model.norm   -> model.language_model.*
    lm_head                                             -> lm_head
    model.mm_projector.{0,2}                            -> model.multi_modal_projector.linear_{1,2}
    scheduler.mlp_head                                  -> scheduler.mlp_head           (same [S] / [S*2*H] layout)
    scheduler.scheduler_up_proj.net.{0,1,3}             -> latency_encoder.net.{0,1,3}  (LayerNorm, Linear, Linear)
    model.vision_tower.vision_tower.vision_model.*      -> model.vision_tower.*         (if saved; else CLIP_DIR)

and the config: scheduler_type L/H -> granularity layer/head, scheduler_rank -> group_size (H), num_prefix_layers,
token_selecting none/prumerge/prumerge+ -> token_selection, mm_vision_select_layer -> vision_feature_layer,
mm_vision_select_feature patch/cls_patch -> vision_feature_select_strategy default/full.

The official code marks images with input id -200; transformers' LLaVA needs an `<image>` token in the vocabulary: it
is appended (id = the official vocab size), with embedding and lm_head rows set to the mean of the others (as
transformers' own LLaVA conversion does; the embedding row is always replaced by image features). A tokenizer in SRC
gets the same token and is saved with a LlavaProcessor (CLIP_DIR's image processor, or CLIP-L/336 defaults) and the
vicuna_v1 chat template. Not converted: the official `pad` (expand2square) preprocessing (the processor center-crops).
Anything in the source that this mapping does not know is an error that names it; buffers that transformers
recomputes (rotary inv_freq) and CLIP's text half are dropped and listed in the returned summary.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

OFFICIAL_MODEL_TYPE = "ada_llava_llama"
IMAGE_TOKEN = "<image>"
# vicuna_v1 (LLaVA-1.5's conversation template), as a chat template for the processor
VICUNA_V1_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}A chat between a curious human and an artificial intelligence "
    "assistant. The assistant gives helpful, detailed, and polite answers to the human's questions. {% endif %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                "rope_scaling", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
                "head_dim")  # fmt: skip
_GRANULARITY = {"L": "layer", "H": "head"}
_TOKEN_SELECTION = {"none": "none", None: "none", "prumerge": "prumerge", "prumerge+": "prumerge+"}
_DROPPED = (re.compile(r"\.rotary_emb\.inv_freq$"),)


def _read_state_dict(directory: Path, prefix_filter=None) -> dict:
    """Every tensor of a checkpoint folder (safetensors or .bin shards)."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{directory}: no weights (*.safetensors or pytorch_model*.bin)")
    state = {}
    for f in files:
        part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
        state.update(part)
    return state


def _vision_config_and_weights(vision_tower: Path | None, official_state: dict, cfg: dict):
    """(CLIPVisionConfig, {our key: tensor}) from the source checkpoint if it holds the tower, else from a CLIP folder
    (a CLIPModel like openai/clip-vit-large-patch14-336, or a CLIPVisionModel). -> also the keys dropped."""
    from transformers import CLIPVisionConfig

    saved = {k[len("model.vision_tower.vision_tower.vision_model."):]: v for k, v in official_state.items()
             if k.startswith("model.vision_tower.vision_tower.vision_model.")}  # fmt: skip
    dropped = []
    if vision_tower is None:
        mm = cfg.get("mm_vision_tower")
        if mm and Path(mm).is_dir():
            vision_tower = Path(mm)
        else:
            raise ValueError(f"the vision tower ({mm!r}) is needed: pass vision_tower=<a local CLIP folder> "
                             "(e.g. a download of openai/clip-vit-large-patch14-336)")  # fmt: skip
    vt_cfg = json.loads((vision_tower / "config.json").read_text())
    if vt_cfg.get("model_type") == "clip":
        vision_config = CLIPVisionConfig(**vt_cfg["vision_config"])
    elif vt_cfg.get("model_type") == "clip_vision_model":
        vision_config = CLIPVisionConfig(**{k: v for k, v in vt_cfg.items() if k not in ("architectures", "model_type")})
    else:
        raise ValueError(f"{vision_tower}: a CLIP folder (model_type clip or clip_vision_model), got "
                         f"{vt_cfg.get('model_type')!r}")  # fmt: skip
    if not saved:
        vision_only = vt_cfg.get("model_type") == "clip_vision_model"  # transformers 5 saves it unprefixed
        for key, value in _read_state_dict(vision_tower).items():
            if key.startswith("vision_model."):
                saved[key[len("vision_model."):]] = value
            elif vision_only:
                saved[key] = value
            else:
                dropped.append(f"{vision_tower.name}:{key}")
    if cfg.get("mm_hidden_size") not in (None, vision_config.hidden_size):
        raise ValueError(f"mm_hidden_size={cfg['mm_hidden_size']} but the vision tower's hidden size is "
                         f"{vision_config.hidden_size}")  # fmt: skip
    return vision_config, {f"model.vision_tower.{k}": v for k, v in saved.items()}, dropped


def official_config(cfg: dict, vision_config):
    """The AdaLlavaConfig of an official config.json (as a dict); ValueError naming any field it cannot honour."""
    from transformers import LlamaConfig

    from .config import AdaLlavaConfig

    if cfg.get("model_type") != OFFICIAL_MODEL_TYPE:
        raise ValueError(f"not an official AdaLLaVA checkpoint: model_type {cfg.get('model_type')!r} "
                         f"(expected {OFFICIAL_MODEL_TYPE!r})")  # fmt: skip
    checks = {
        "scheduler_type": (cfg.get("scheduler_type", "L"), tuple(_GRANULARITY)),
        "token_selecting": (cfg.get("token_selecting", "none"), tuple(k for k in _TOKEN_SELECTION if k)),
        "mm_projector_type": (cfg.get("mm_projector_type", "mlp2x_gelu"), ("mlp2x_gelu",)),
        "mm_vision_select_feature": (cfg.get("mm_vision_select_feature", "patch"), ("patch", "cls_patch")),
        "mm_patch_merge_type": (cfg.get("mm_patch_merge_type", "flat"), ("flat",)),
        "mm_use_im_start_end": (bool(cfg.get("mm_use_im_start_end", False)), (False,)),
        "pretraining_tp": (cfg.get("pretraining_tp", 1), (1,)),
    }
    for name, (value, allowed) in checks.items():
        if value not in allowed:
            raise ValueError(f"official config {name}={value!r} is not supported (supported: {list(allowed)})")
    text = LlamaConfig(**{k: cfg[k] for k in _TEXT_FIELDS if k in cfg})
    official_vocab = text.vocab_size
    text.vocab_size = official_vocab + 1  # + <image>
    text.tie_word_embeddings = False
    granularity = _GRANULARITY[cfg.get("scheduler_type", "L")]
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return AdaLlavaConfig(
        text_config=text, vision_config=vision_config, image_token_index=official_vocab, image_seq_length=patches,
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if cfg.get("mm_vision_select_feature", "patch") == "patch" else "full",
        granularity=granularity, num_prefix_layers=cfg.get("num_prefix_layers", 16),
        group_size=cfg.get("scheduler_rank", 8) if granularity == "head" else None,
        token_selection=_TOKEN_SELECTION[cfg.get("token_selecting", "none")], tie_word_embeddings=False,
    )  # fmt: skip


def map_official_state_dict(official: dict) -> tuple[dict, list[str]]:
    """Official keys -> this library's keys (language model, projector, scheduler, latency encoder). The vision tower
    is left to _vision_config_and_weights. -> (mapped, dropped)."""
    rules = [
        (re.compile(r"^model\.(embed_tokens|layers|norm)\.(.*)$"), r"model.language_model.\1.\2"),
        (re.compile(r"^lm_head\.(.*)$"), r"lm_head.\1"),
        (re.compile(r"^model\.mm_projector\.0\.(.*)$"), r"model.multi_modal_projector.linear_1.\1"),
        (re.compile(r"^model\.mm_projector\.2\.(.*)$"), r"model.multi_modal_projector.linear_2.\1"),
        (re.compile(r"^scheduler\.mlp_head\.(.*)$"), r"scheduler.mlp_head.\1"),
        (re.compile(r"^scheduler\.scheduler_up_proj\.net\.([013])\.(.*)$"), r"latency_encoder.net.\1.\2"),
    ]
    mapped, dropped, unknown = {}, [], []
    for key, value in official.items():
        if key.startswith("model.vision_tower."):
            continue
        if any(p.search(key) for p in _DROPPED):
            dropped.append(key)
            continue
        for pattern, repl in rules:
            if pattern.match(key):
                mapped[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"official checkpoint keys this converter does not know: {unknown[:10]}")
    return mapped, dropped


def _append_mean_row(w: torch.Tensor) -> torch.Tensor:
    return torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype)], 0)


def convert_official(src, dst, vision_tower=None, dtype: str | None = None) -> dict:
    """Convert an official AdaLLaVA checkpoint folder into `dst` (save_pretrained format + processor when SRC has a
    tokenizer). dtype: "float16" / "bfloat16" / "float32" (default: the source's). Returns a summary dict."""
    from .modeling import AdaLlavaForConditionalGeneration

    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    official = _read_state_dict(src)
    vision_config, vision_state, dropped_vision = _vision_config_and_weights(
        None if vision_tower is None else Path(vision_tower), official, cfg
    )
    config = official_config(cfg, vision_config)
    state, dropped = map_official_state_dict(official)
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key not in state:
            raise ValueError(f"official checkpoint has no {key.replace('model.language_model.', 'model.')}")
        state[key] = _append_mean_row(state[key])
    state.update(vision_state)
    target_dtype = getattr(torch, dtype) if dtype else state["lm_head.weight"].dtype
    state = {k: v.to(target_dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = AdaLlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"converted weights do not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    model.config.dtype = target_dtype
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    for k, v in gen.items():
        setattr(model.generation_config, k, v)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    processor_saved = _save_processor(src, dst, config, None if vision_tower is None else Path(vision_tower))
    summary = {
        "granularity": config.granularity, "num_prefix_layers": config.num_prefix_layers,
        "group_size": config.group_size, "token_selection": config.token_selection,
        "image_token_id": config.image_token_id, "dtype": str(target_dtype).replace("torch.", ""),
        "tensors": len(state), "dropped": dropped + dropped_vision, "processor": processor_saved,
    }  # fmt: skip
    (dst / "conversion.json").write_text(json.dumps({"source": str(src), **summary}, indent=1))
    return summary


def _save_processor(src: Path, dst: Path, config, vision_tower: Path | None) -> bool:
    """Tokenizer (+ <image>) and a LlavaProcessor, when SRC has a tokenizer. -> whether one was written."""
    if not any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return False
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != config.image_token_id:
        raise ValueError(f"the tokenizer gave {IMAGE_TOKEN} id {image_id}, the model expects {config.image_token_id} "
                         "(tokenizer and config.json vocab_size disagree)")  # fmt: skip
    if vision_tower is not None and (vision_tower / "preprocessor_config.json").is_file():
        image_processor = CLIPImageProcessor.from_pretrained(vision_tower)
    else:
        size = config.vision_config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=VICUNA_V1_TEMPLATE,
        num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
    )  # fmt: skip
    processor.save_pretrained(dst)
    return True
