"""peft LoRA on the language model (the usual way to adapt a 7B model on few GPUs).

    add_lora(model, r=16, alpha=32)           # adapters on every decoder projection; the base LM is frozen
    ... train (mask mode) ...
    save_lora(model, directory)                # adapter_config.json + adapter_model.safetensors (peft's layout)
    load_lora(model, directory)                # the same adapters into a freshly loaded model
    merge_lora(model)                          # fold them into the weights (peft's own merge), back to plain Linears

The decoder loop (modeling.py) runs peft LoRA Linears itself in both modes: mask mode (training) and skip mode, where
a partly used layer's slice gets the matching slice of each adapter (B's rows, A's columns), so a sliced layer with
adapters equals the same slice of the merged weights. DoRA and other LoRA variants, and lora_bias, are refused.
"""

from __future__ import annotations

from pathlib import Path

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _language_model(model):
    return model.model.language_model


def has_lora(model) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in _language_model(model).modules())


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules=PROJECTIONS, **lora_kwargs):
    """Inject peft LoRA adapters into the language model's decoder projections (in place; returns the model). Only
    the adapters of the language model train; the rest of the model keeps its requires_grad."""
    from peft import LoraConfig, inject_adapter_in_model

    unknown = set(target_modules) - set(PROJECTIONS)
    if unknown:
        raise ValueError(f"LoRA target_modules {sorted(unknown)}: only the decoder projections {PROJECTIONS}")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none", **lora_kwargs)  # fmt: skip
    lm = _language_model(model)
    inject_adapter_in_model(config, lm)
    lm._adallava_lora_config = config
    from .modeling import check_layer_modules

    check_layer_modules(lm.layers)  # refuse variants the decoder loop does not run (DoRA, lora_bias)
    return model


_LM_PREFIX = "model.language_model."


def lora_state_dict(model, state_dict: dict | None = None) -> dict:
    """The adapters' tensors in peft's saved layout (keys without the adapter name). state_dict: the whole model's
    (e.g. gathered from FSDP); default: the model's own."""
    from peft.utils import get_peft_model_state_dict

    lm = _language_model(model)
    if state_dict is not None:
        state_dict = {k[len(_LM_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_LM_PREFIX)}
    lm.peft_config = {"default": lm._adallava_lora_config}
    try:
        return get_peft_model_state_dict(lm, state_dict=state_dict)
    finally:
        del lm.peft_config


def base_state_dict(model, state_dict: dict | None = None) -> dict:
    """The model's state dict (or the given one) with the adapters left out and the wrapped projections under their
    own names (what save_pretrained writes next to the adapter files)."""
    out = {}
    for key, value in (model.state_dict() if state_dict is None else state_dict).items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def save_lora(model, directory, state_dict: dict | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors into `directory` (presets.load applies them when present)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _language_model(model)._adallava_lora_config.save_pretrained(str(directory))
    tensors = lora_state_dict(model, state_dict)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_FILE))


def load_lora(model, directory):
    """Add the adapters saved in `directory` (save_lora's files) to the model; every saved tensor must load."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    config = LoraConfig.from_pretrained(str(directory))
    lm = _language_model(model)
    inject_adapter_in_model(config, lm)
    lm._adallava_lora_config = config
    saved = load_file(str(directory / WEIGHTS_FILE))
    lm.peft_config = {"default": config}
    try:
        result = set_peft_model_state_dict(lm, saved)
    finally:
        del lm.peft_config
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if ".lora_" in k]
    if unexpected or missing:
        raise ValueError(f"{directory}: adapters do not match the model: unexpected {unexpected[:5]}, missing {missing[:5]}")
    from .modeling import check_layer_modules

    check_layer_modules(lm.layers)
    return model


def merge_lora(model):
    """Fold the adapters into the projections' weights (peft's LoraLayer.merge) and put the plain Linears back."""
    from peft.tuners.lora import LoraLayer

    lm = _language_model(model)
    for name, module in list(lm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent), child, module.get_base_layer())
    if hasattr(lm, "_adallava_lora_config"):
        del lm._adallava_lora_config
    return model
