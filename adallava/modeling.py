"""AdaLlavaForConditionalGeneration: transformers' LLaVA with a latency encoder, a scheduler and gated decoder layers.

The whole forward pass is in this file (transformers' single-model-file policy). Data flow (DESIGN.md):

    ids + pixels -> embeddings with image features -> latency token inserted (spec 1.4) -> prefix layers
    -> scheduler reads the latency token -> execution plan, fixed for the request -> gated layers -> norm -> lm_head

The decoder loop is ours (spec 9.2): it reuses each Llama-style layer's weights (Llama/Vicuna, Mistral, Qwen2) and
runs them in one of two ways:
  * mask: every layer runs on every row; switches multiply head outputs before o_proj and neuron groups before
    down_proj. Training always masks, so the straight-through gradient exists and all data-parallel ranks run the
    same modules.
  * skip: at inference, a layer that a row does not use is not run for that row (no compute, no KV cache), and a
    partly used layer runs on weights sliced to its kept heads and neuron groups. Rows of a batch are grouped by the
    plan they share for each layer, so a batch may mix budgets.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from . import tokens
from . import budget as budgets
from . import cost
from .config import AdaLlavaConfig
from .scheduler import LatencyEncoder, Scheduler

IGNORE_INDEX = -100
# Arguments transformers' Trainer and generation utilities pass to forward that mean nothing here.
_IGNORED_FORWARD_KWARGS = {"return_dict", "use_cache", "num_items_in_batch", "output_attentions", "output_hidden_states"}


@dataclass
class AdaLlavaOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    execution_plan: torch.Tensor | None = None  # [B, num_layers]: fraction of each layer's units that ran
    plan: torch.Tensor | None = None  # [B, schedulable layers, 2, heads]: the switches (with ST gradients in training)
    budget: torch.Tensor | None = None  # [B]
    latency_token_position: torch.Tensor | None = None  # [B]
    labels: torch.Tensor | None = None  # labels aligned with logits (latency token inserted, IGNORE there)
    exit_hidden_states: dict | None = None  # {layer index: [B, T, D]} for forward(exit_layers=...), before the norm


@dataclass
class AdaLlavaGenerateOutput(ModelOutput):
    sequences: torch.LongTensor | None = None  # prompt ids as given + generated ids
    execution_plan: torch.Tensor | None = None  # [B, num_layers]
    flops: torch.Tensor | None = None  # [B] analytic FLOPs of each request (prefill + decode), float64
    budget: torch.Tensor | None = None  # [B]
    num_generated: torch.Tensor | None = None  # [B] tokens generated, EOS included
    plan: torch.Tensor | None = None
    timings: dict | None = None  # measured wall-clock seconds: prefill, decode (whole batch)
    flops_breakdown: list | None = None  # per request: prefill/decode FLOPs by part, per-layer FLOPs (cost.flops_breakdown)


# ----------------------------------------------------------------------------------------------------------------
# How one layer runs for one group of rows: every head and neuron, or only the kept heads / neuron groups. Only index
# tensors are kept; the weights are read from the layer's modules at each call (a partly used layer's slice is a
# transient copy, freed after the call), so what a request holds does not grow with rows x distinct plans.

# Language-model architectures whose decoder layer this loop reproduces exactly (tested against transformers' own
# model): attention = q/k/v/o projections + RoPE, MLP = down(act(gate) * up), two pre-norms. Anything else (Qwen3's
# q_norm/k_norm, Gemma's extra norms, ...) is refused at construction.
SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2")
_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The name of the per-layer method the decoder loop calls when a layer has one (model.bind_layer_forwards): a sharding
# wrapper (FSDP2's register_fsdp_forward_method) gathers the layer's parameters around it, as around a forward.
LAYER_METHOD = "adallava_forward"


def _is_peft_lora(module) -> bool:
    return type(module).__module__.startswith("peft.tuners.lora") and type(module).__name__ == "Linear"


def _base_linear(module):
    return module.base_layer if _is_peft_lora(module) else module


def _project(module, x, rows=None, cols=None, bias=True):
    """module(x) restricted to output features `rows` and input features `cols` (x already has only those). A plain
    nn.Linear, or a peft LoRA Linear: its active adapters are applied to the same slice (B's rows, A's columns), so the
    result equals the merged weights' slice."""
    base = _base_linear(module)
    w, b = base.weight, base.bias if bias else None
    if rows is not None:
        w = w.index_select(0, rows)
        b = None if b is None else b.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    y = F.linear(x, w, b)
    if base is module or module.disable_adapters or module.merged:
        return y
    for name in module.active_adapters:
        if name not in module.lora_A.keys():
            continue
        a_w, b_w = module.lora_A[name].weight, module.lora_B[name].weight
        if cols is not None:
            a_w = a_w.index_select(1, cols)
        if rows is not None:
            b_w = b_w.index_select(0, rows)
        xa = module.lora_dropout[name](x.to(a_w.dtype))
        y = y + (F.linear(F.linear(xa, a_w), b_w) * module.scaling[name]).to(y.dtype)
    return y


def check_architecture(text_config) -> None:
    """Refuse a language model this decoder loop would run wrongly (ValueError naming it)."""
    kind = getattr(text_config, "model_type", None)
    if kind not in SUPPORTED_TEXT_MODELS:
        raise ValueError(f"language model architecture {kind!r} ({type(text_config).__name__}) is not supported: "
                         f"AdaLLaVA's decoder loop reproduces {', '.join(SUPPORTED_TEXT_MODELS)} layers only")  # fmt: skip
    if float(getattr(text_config, "attention_dropout", 0.0) or 0.0) != 0.0:
        raise ValueError(f"attention_dropout={text_config.attention_dropout} is not supported (the decoder loop runs "
                         "attention without dropout): set it to 0")  # fmt: skip


def check_layer_modules(layers, where: str = "model.language_model.layers") -> None:
    """Every decoder layer must be the plain structure the loop reads: extra submodules (q_norm, ...), projections that
    are not nn.Linear or a peft LoRA Linear over one (quantised, custom wrappers), and forward hooks on modules whose
    forward the loop does not call are refused by name."""
    for i, layer in enumerate(layers):
        name = f"{where}.{i}"
        parts = {"": layer, ".self_attn": layer.self_attn, ".mlp": layer.mlp}
        for suffix, allowed in (("", _LAYER_CHILDREN), (".self_attn", _ATTN_CHILDREN), (".mlp", _MLP_CHILDREN)):
            extra = {n for n, _ in parts[suffix].named_children()} - allowed
            if extra:
                raise ValueError(f"{name}{suffix} has submodules {sorted(extra)} that AdaLLaVA's decoder loop would "
                                 f"not run ({type(parts[suffix]).__name__}): unsupported architecture")  # fmt: skip
        for suffix, module in parts.items():
            if suffix == "" and _is_fsdp_unit(module):  # FSDP2's own hooks, run around LAYER_METHOD as well
                continue
            if module._forward_hooks or module._forward_pre_hooks:
                raise ValueError(f"{name}{suffix} has forward hooks, which AdaLLaVA's decoder loop would never fire "
                                 "(it runs the layer's weights itself): remove them")  # fmt: skip
        for proj in _PROJECTIONS:
            parent = layer.self_attn if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
            module = getattr(parent, proj)
            base = _base_linear(module)
            full = f"{name}.{'self_attn' if parent is layer.self_attn else 'mlp'}.{proj}"
            if type(base) is not torch.nn.Linear:
                raise ValueError(f"{full} is a {type(module).__module__}.{type(module).__name__}: AdaLLaVA's decoder "
                                 "loop runs plain nn.Linear projections or peft LoRA Linears over one")  # fmt: skip
            for m, what in ((module, full), (base, f"{full}.base_layer")):
                if m._forward_hooks or m._forward_pre_hooks:
                    raise ValueError(f"{what} has forward hooks, which AdaLLaVA's decoder loop would never fire: "
                                     "remove them")  # fmt: skip
            if base is not module:
                for adapter in module.active_adapters:
                    if adapter in getattr(module, "lora_variant", {}) or module.use_dora.get(adapter, False):
                        raise ValueError(f"{full}: LoRA variant (DoRA, ...) of adapter {adapter!r} is not supported")
                    if adapter in module.lora_B.keys() and module.lora_B[adapter].bias is not None:
                        raise ValueError(f"{full}: LoRA adapter {adapter!r} has lora_bias, which is not supported")


def _is_fsdp_unit(layer) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(layer, FSDPModule) and getattr(layer, LAYER_METHOD, None) is not None


@dataclass
class _LayerWeights:
    """Which heads / neurons of one layer run for a group of rows (None: all). n_q = 0: attention skipped."""

    layer: torch.nn.Module
    n_q: int  # query heads that run (0: attention skipped)
    n_kv: int  # key/value heads computed
    kv_map: torch.Tensor | None  # for each query head, its K/V head among the computed ones (None: no index needed)
    q_rows: torch.Tensor | None = None  # q_proj output rows = o_proj input columns of the kept heads
    kv_rows: torch.Tensor | None = None  # k_proj / v_proj output rows of the computed K/V heads
    neurons: torch.Tensor | None = None  # kept MLP neurons (gate/up rows, down columns)
    mlp: bool = True  # the MLP block runs

    # The (base) weights as this group runs them; transient copies for a partial layer (inspection and tests).
    def _w(self, proj, rows=None, cols=None):
        w = _base_linear(proj).weight
        w = w if rows is None else w.index_select(0, rows)
        return w if cols is None else w.index_select(1, cols)

    @property
    def q_w(self):
        return self._w(self.layer.self_attn.q_proj, rows=self.q_rows) if self.n_q else None

    @property
    def k_w(self):
        return self._w(self.layer.self_attn.k_proj, rows=self.kv_rows) if self.n_q else None

    @property
    def v_w(self):
        return self._w(self.layer.self_attn.v_proj, rows=self.kv_rows) if self.n_q else None

    @property
    def o_w(self):
        return self._w(self.layer.self_attn.o_proj, cols=self.q_rows) if self.n_q else None

    @property
    def g_w(self):
        return self._w(self.layer.mlp.gate_proj, rows=self.neurons) if self.mlp else None

    @property
    def u_w(self):
        return self._w(self.layer.mlp.up_proj, rows=self.neurons) if self.mlp else None

    @property
    def d_w(self):
        return self._w(self.layer.mlp.down_proj, cols=self.neurons) if self.mlp else None


def _full_weights(layer, n_rep: int) -> _LayerWeights:
    a = layer.self_attn
    n_q = _base_linear(a.q_proj).weight.shape[0] // a.head_dim
    return _LayerWeights(layer, n_q, n_q // n_rep, None)  # GQA: SDPA's enable_gqa, no repeated K/V copy


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU index tensor onto the model's device without a host sync (pinned, non-blocking on CUDA)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _sliced_weights(layer, heads_on: torch.Tensor, groups_on: torch.Tensor, n_rep: int, neuron_groups) -> _LayerWeights:
    """The heads and MLP neuron groups switched on (heads_on [H], groups_on [G]: CPU bools; neuron_groups: CPU index
    tensors). A query head always runs with its key/value head (grouped-query attention): the K/V heads computed are
    those of the kept query heads, and kv_map points each kept query head at its own (None when it is the identity)."""
    d = layer.self_attn.head_dim
    dev = _base_linear(layer.self_attn.q_proj).weight.device
    q_heads = heads_on.nonzero().flatten()
    kv_heads = torch.unique(q_heads // n_rep)
    kv_map = None
    per_kv = torch.bincount(q_heads // n_rep)[kv_heads] if len(q_heads) else None
    if per_kv is not None and bool((per_kv != per_kv[0]).any()):  # uneven: index; else SDPA's enable_gqa (no copy)
        kv_map = _to_device(torch.searchsorted(kv_heads, q_heads // n_rep), dev)
    rows = lambda heads: _to_device((heads[:, None] * d + torch.arange(d)).flatten(), dev)  # noqa: E731
    groups = groups_on.nonzero().flatten().tolist()
    neurons = _to_device(torch.cat([neuron_groups[g] for g in groups]), dev) if groups else None
    return _LayerWeights(
        layer, len(q_heads), len(kv_heads), kv_map,
        q_rows=rows(q_heads) if len(q_heads) else None, kv_rows=rows(kv_heads) if len(q_heads) else None,
        neurons=neurons, mlp=bool(groups),
    )  # fmt: skip


@dataclass
class _Group:
    """Rows of the batch that run one layer the same way, with their KV cache for that layer."""

    rows: torch.Tensor | None  # None: every row of the batch
    weights: _LayerWeights
    k: torch.Tensor | None = None  # [rows, n_kv, capacity, head_dim]
    v: torch.Tensor | None = None


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class DecodeState:
    """What a request keeps between decode steps: its plan, its row groups per layer and their KV caches.

    The plan is computed once at prefill and fixed for the whole request (spec 2.4); skipped layers hold no cache.
    """

    capacity: int
    key_valid: torch.Tensor  # [B, capacity] bool: slot holds a real (non-padding) token
    length: int = 0  # slots filled
    plan: torch.Tensor | None = None
    groups: dict[int, list[_Group]] = field(default_factory=dict)
    # After FastV drops image tokens at layer fastv_k, later layers use their own, shorter slot space.
    key_valid_post: torch.Tensor | None = None
    length_post: int = 0


# ----------------------------------------------------------------------------------------------------------------


class AdaLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = AdaLlavaConfig
    config: AdaLlavaConfig

    def __init__(self, config: AdaLlavaConfig):
        check_architecture(config.text_config)
        super().__init__(config)
        check_layer_modules(self._layers)
        hidden = config.text_config.hidden_size
        self.latency_encoder = LatencyEncoder(hidden, config.latency_embed_dim)
        self.scheduler = Scheduler(hidden, config.num_schedulable_layers, config.num_switches, config.granularity)
        for module in (self.latency_encoder, self.scheduler):
            module.apply(self._init_weights)
        text = config.text_config
        self._n_rep = text.num_attention_heads // text.num_key_value_heads
        # MLP neuron groups: as many as heads, contiguous; the first (I mod G) groups hold one extra neuron (spec 1.6).
        # (Plain ints: from_pretrained builds the model on the meta device.)
        base, extra = divmod(text.intermediate_size, config.num_switches)
        self._neuron_group_sizes = [base + 1] * extra + [base] * (config.num_switches - extra)
        self._neuron_index = {}  # device -> [I] neuron -> its group (mask mode), built once per device

    # ---------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_llava(cls, model_or_path, granularity: str = "layer", num_prefix_layers: int | None = None, **kwargs):
        """Wrap a plain LLaVA (a llava-hf checkpoint directory or a LlavaForConditionalGeneration) with a freshly
        initialised latency encoder and scheduler. Extra keyword arguments are AdaLlavaConfig fields, or, for a path,
        from_pretrained arguments (torch_dtype, device_map, ...)."""
        ada_fields = {"group_size", "gumbel_tau", "latency_embed_dim"}
        ada_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in ada_fields}
        if isinstance(model_or_path, LlavaForConditionalGeneration):
            base_config = model_or_path.config
        else:
            base_config = AutoConfig.from_pretrained(model_or_path)
        config_dict = base_config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            config_dict.pop(key, None)
        config = AdaLlavaConfig(
            **config_dict, granularity=granularity, num_prefix_layers=num_prefix_layers, **ada_kwargs
        )
        if not isinstance(model_or_path, LlavaForConditionalGeneration):
            return cls.from_pretrained(model_or_path, config=config, **kwargs)
        model = cls(config).to(device=model_or_path.device, dtype=model_or_path.dtype)
        missing, unexpected = model.load_state_dict(model_or_path.state_dict(), strict=False)
        ours = ("latency_encoder.", "scheduler.")
        missing = [k for k in missing if not k.startswith(ours)]
        if missing or unexpected:
            raise ValueError(f"not a LLaVA this model can wrap: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model

    # ---------------------------------------------------------------------------------------------- inputs

    @property
    def _layers(self):
        return self.model.language_model.layers

    def embed_inputs(self, input_ids=None, pixel_values=None, inputs_embeds=None, image_sizes=None):
        """Text embeddings with the projected image features scattered into the `<image>` positions."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            feats = self.model.get_image_features(
                pixel_values=pixel_values.to(self.dtype), image_sizes=image_sizes, return_dict=True
            ).pooler_output
            feats = torch.cat(list(feats), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            where = self.model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=feats)
            inputs_embeds = inputs_embeds.masked_scatter(where, feats)
        return inputs_embeds

    def latency_token(self, budget: torch.Tensor) -> torch.Tensor:
        """[B] budgets -> [B, hidden] latency-token embeddings."""
        return self.latency_encoder(budgets.encoder_input(budget, self.config))

    @staticmethod
    def latency_token_index(T: int, pos: torch.Tensor):
        """For a length-T sequence getting one token inserted at pos [B]: (source index [B, T+1], is-latency mask)."""
        j = torch.arange(T + 1, device=pos.device)[None]
        return (j - (j > pos[:, None]).long()).clamp(max=T - 1), j == pos[:, None]

    @classmethod
    def insert_latency_token(cls, embeds, attention_mask, labels, latency_embeds):
        """Insert one latency token per row (spec 1.4): right after the last IGNORE label among real tokens (before the
        final answer) in training, at the end of the prompt when there are no labels. Returns embeds, mask, labels
        (IGNORE at the token) and the token's position, all with sequence length T + 1."""
        B, T, D = embeds.shape
        idx = torch.arange(T, device=embeds.device)
        if labels is None:
            pos = torch.full((B,), T, device=embeds.device, dtype=torch.long)
        else:
            ignore = (labels == IGNORE_INDEX) & attention_mask.bool()
            pos = torch.where(ignore, idx, -1).max(-1).values + 1
        src, is_lat = cls.latency_token_index(T, pos)
        out = embeds.gather(1, src[..., None].expand(-1, -1, D))
        out = torch.where(is_lat[..., None], latency_embeds[:, None].to(out.dtype), out)
        mask = attention_mask.gather(1, src).masked_fill(is_lat, 1)
        new_labels = None if labels is None else labels.gather(1, src).masked_fill(is_lat, IGNORE_INDEX)
        return out, mask, new_labels, pos

    def prepare_inputs(self, input_ids=None, pixel_values=None, attention_mask=None, labels=None, inputs_embeds=None,
                       image_sizes=None):  # fmt: skip
        """Embeddings, attention mask, labels and image-token mask [B, T] of a batch. With PruMerge(+), each image
        brings only its selected (and merged) patches: the unused placeholders are dropped and rows packed right."""
        cfg = self.config
        if cfg.token_selection not in ("prumerge", "prumerge+") or pixel_values is None:
            embeds = self.embed_inputs(input_ids, pixel_values, inputs_embeds, image_sizes)
            if attention_mask is None:
                attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            if input_ids is not None:
                image_mask = input_ids == cfg.image_token_id
            else:
                image_mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            return embeds, attention_mask, labels, image_mask
        if input_ids is None:
            raise ValueError("PruMerge needs input_ids to find each image's <image> placeholders")
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError("PruMerge selects patches by the CLS token's attention: vision_feature_select_strategy "
                             "must be 'default'")  # fmt: skip
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.get_input_embeddings()(input_ids)
        hs, cls_attn, keys = tokens.cls_attention_and_keys(
            self.model.vision_tower, pixel_values.to(self.dtype), cfg.vision_feature_layer
        )
        feats = hs[cfg.vision_feature_layer][:, 1:]
        reduced, valid = tokens.prumerge(feats, cls_attn, keys, plus=cfg.token_selection == "prumerge+")
        placeholder = input_ids == cfg.image_token_id
        if int(placeholder.sum()) != valid.numel():
            raise ValueError(f"{int(placeholder.sum())} <image> placeholder tokens for {valid.shape[0]} images of "
                             f"{valid.shape[1]} patches each")  # fmt: skip
        projected = self.model.multi_modal_projector(reduced[valid]).to(embeds.dtype)
        used = torch.zeros_like(placeholder)
        used[placeholder] = valid.flatten()
        embeds = embeds.masked_scatter(used[..., None], projected)
        index, kept = tokens.pack_right((~placeholder | used) & attention_mask.bool())
        embeds = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        if labels is not None:
            labels = labels.gather(1, index).masked_fill(~kept, IGNORE_INDEX)
        return embeds, kept.long(), labels, used.gather(1, index) & kept

    def resolve_budget(self, budget, batch_size: int) -> torch.Tensor:
        """Validated budgets [B] (float64). In training with no budget given: one random step per sample (spec 2.5);
        at inference with no budget: the full model."""
        if budget is None:
            if self.training:
                return budgets.sample_training_budgets(batch_size, self.config)
            budget = 1.0
        return budgets.validate_budget(budget, batch_size, self.config)

    # ---------------------------------------------------------------------------------------------- decoder loop

    def _attention_masks(self, key_valid, q_slots, n_keys):
        """Boolean [B, 1, Tq, n_keys] masks (full causal, and sliding-window if the model has one): causal over slot
        indices, no padding keys. Every query may attend to itself, so padding queries never see an empty row (which
        would put NaN into the residual stream)."""
        k_slots = torch.arange(n_keys, device=key_valid.device)
        q = q_slots[..., None] if q_slots.dim() == 2 else q_slots[None, :, None]  # q_slots [Tq], or [B, Tq] per row
        causal = k_slots <= q  # [1 or B, Tq, n_keys]
        diag = k_slots == q
        valid = key_valid[:, None, :n_keys]
        masks = {None: ((causal & valid) | diag)[:, None]}
        text = self.config.text_config
        window = getattr(text, "sliding_window", None)
        if window and getattr(text, "use_sliding_window", True):
            near = k_slots > q - window
            masks[window] = ((causal & near & valid) | diag)[:, None]
        return masks

    def _layer_window(self, i):
        text = self.config.text_config
        window = getattr(text, "sliding_window", None)
        if not window or not getattr(text, "use_sliding_window", True):
            return None
        layer_types = getattr(text, "layer_types", None)
        if layer_types is not None and layer_types[i] != "sliding_attention":
            return None
        return window

    def _run_layer(self, layer, w: _LayerWeights, h, cos, sin, mask, group=None, slot=0, head_mask=None, mlp_mask=None):
        """One Llama-style decoder layer on h [b, T, D]. head_mask [b, H] / mlp_mask [b, G]: training-style switches
        (mask mode); w: full or sliced weights (skip mode); group: holds this layer's KV cache for these rows.
        slot: the cache slot of the first new token, the same for every row; or a [b] tensor of per-row slots for one
        decode token per row (continuous batching, adallava.engine), with the mask's key length bounding the cache."""
        attn, mlp = layer.self_attn, layer.mlp
        d = attn.head_dim
        b, T, _ = h.shape
        if w.n_q:
            x = layer.input_layernorm(h)
            q = _project(attn.q_proj, x, rows=w.q_rows).view(b, T, w.n_q, d).transpose(1, 2)
            k = _project(attn.k_proj, x, rows=w.kv_rows).view(b, T, w.n_kv, d).transpose(1, 2)
            v = _project(attn.v_proj, x, rows=w.kv_rows).view(b, T, w.n_kv, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if group is not None and group.k is not None:
                if torch.is_tensor(slot):  # T == 1, each row at its own slot
                    rows = torch.arange(b, device=k.device)
                    group.k[rows, :, slot] = k[:, :, 0]
                    group.v[rows, :, slot] = v[:, :, 0]
                    n_keys = mask.shape[-1]
                else:
                    group.k[:, :, slot : slot + T] = k
                    group.v[:, :, slot : slot + T] = v
                    n_keys = slot + T
                k, v = group.k[:, :, :n_keys], group.v[:, :, :n_keys]
            if w.kv_map is not None:
                k, v = k.index_select(1, w.kv_map), v.index_select(1, w.kv_map)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                               enable_gqa=k.shape[1] != q.shape[1]).transpose(1, 2)  # fmt: skip
            if head_mask is not None:
                o = o * head_mask[:, None, :, None]
            o = _project(attn.o_proj, o.reshape(b, T, -1), cols=w.q_rows, bias=False)
            o_b = _base_linear(attn.o_proj).bias
            if o_b is not None:  # a bias runs with the attention block: not at all if every head is off
                o = o + o_b * (1.0 if head_mask is None else head_mask.amax(-1)[:, None, None])
            h = h + o
        if w.mlp:
            x = layer.post_attention_layernorm(h)
            a = mlp.act_fn(_project(mlp.gate_proj, x, rows=w.neurons)) * _project(mlp.up_proj, x, rows=w.neurons)
            if mlp_mask is not None:
                a = a * mlp_mask[:, self._neuron_group_index(a.device)][:, None, :]
            o = _project(mlp.down_proj, a, cols=w.neurons, bias=False)
            d_b = _base_linear(mlp.down_proj).bias
            if d_b is not None:
                o = o + d_b * (1.0 if mlp_mask is None else mlp_mask.amax(-1)[:, None, None])
            h = h + o
        return h

    def _neuron_group_index(self, device) -> torch.Tensor:
        """[I]: the neuron group of each MLP neuron, on `device` (built once: no host sync per layer)."""
        key = str(device)
        if key not in self._neuron_index:
            sizes = torch.tensor(self._neuron_group_sizes)
            self._neuron_index[key] = torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(device)
        return self._neuron_index[key]

    def bind_layer_forwards(self) -> None:
        """Give each decoder layer a method LAYER_METHOD that runs it as the decoder loop does, so that a per-layer
        sharding wrapper can gather its parameters around that call (FSDP2: register_fsdp_forward_method)."""
        for layer in self._layers:
            object.__setattr__(layer, LAYER_METHOD, functools.partial(self._run_layer, layer))

    def _layer_fn(self, layer):
        fn = getattr(layer, LAYER_METHOD, None)
        return fn if fn is not None else functools.partial(self._run_layer, layer)

    def full_layer_weights(self, layer) -> _LayerWeights:
        """How a layer runs with every head and neuron (for cost profiling: adallava.cost.profile_latency)."""
        return _full_weights(layer, self._n_rep)

    def _groups_for_layer(self, layer, plan_layer, with_cache, capacity, batch):
        """Split the rows of a batch by how they run one layer: skipped rows are left out, rows with every switch on
        run the full layer, rows with the same partial pattern share one set of kept-head / neuron indices.
        plan_layer [B, 2, H]: best on the CPU (decode passes the plan's CPU copy, so grouping costs no host sync)."""
        on = (plan_layer > 0.5).cpu()  # [B, 2, H]
        dev = self.device
        full = on.flatten(1).all(1)
        partial = on.flatten(1).any(1) & ~full
        groups = []
        if bool(full.all()):
            groups.append(_Group(None, _full_weights(layer, self._n_rep)))
        elif bool(full.any()):
            groups.append(_Group(_to_device(full.nonzero().flatten(), dev), _full_weights(layer, self._n_rep)))
        if bool(partial.any()):
            rows = partial.nonzero().flatten()
            patterns, inverse = torch.unique(on[rows].flatten(1), dim=0, return_inverse=True)
            bounds = [0, *itertools.accumulate(self._neuron_group_sizes)]
            neuron_groups = [torch.arange(a, b) for a, b in zip(bounds, bounds[1:])]
            for j, pattern in enumerate(patterns):
                pattern = pattern.view(2, -1)
                w = _sliced_weights(layer, pattern[0], pattern[1], self._n_rep, neuron_groups)
                groups.append(_Group(_to_device(rows[inverse == j], dev), w))
        if with_cache:
            a = layer.self_attn
            for g in groups:
                n = batch if g.rows is None else len(g.rows)
                if g.weights.n_q:
                    shape = (n, g.weights.n_kv, capacity, a.head_dim)
                    g.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
                    g.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return groups

    def decode(self, h, key_valid, position_ids, budget, latency_pos=None, *, state=None, plan=None, mode="skip",
               generator=None, image_mask=None, selection=None, exit_hidden=None):  # fmt: skip
        """Run the language model's layers on h [B, T, D] -> (final-norm hidden states, plan).

        key_valid [B, >= past+T]: which key slots are real tokens; position_ids [B, T]. The plan comes from (in order):
        `plan`, `state.plan`, or the scheduler at the input of layer num_prefix_layers (needs latency_pos and budget).
        mode "mask" runs every layer on every row with switches as multipliers (training); "skip" skips and slices.
        With a state, KV caches live in it and the new tokens take slots state.length .. state.length+T-1.
        With token_selection="fastv" and image_mask [B, T] (a prefill), image tokens are dropped after layer fastv_k;
        `selection` (a dict, optional) receives "index" [B, T'] (which input positions the output rows are) and
        "valid" [B, T'].
        `exit_hidden` (a dict {layer index: None}, optional) receives each named layer's output hidden states
        (before the final norm): the early-exit losses of LayerSkip-style training (adallava.baselines).
        """
        cfg = self.config
        lm = self.model.language_model
        B, T, _ = h.shape
        past = state.length if state is not None else 0
        q_slots = torch.arange(past, past + T, device=h.device)
        masks = self._attention_masks(key_valid, q_slots, past + T)
        cos, sin = lm.rotary_emb(h, position_ids)
        if plan is None and state is not None:
            plan = state.plan
        if past == 0:  # a prefill or a training forward: refuse what the loop would silently bypass
            check_layer_modules(self._layers)
        stochastic = self.training
        plan_cpu = None  # the plan's CPU copy for row grouping in skip mode: one host sync per request, not per layer
        full_on = torch.ones(B, 2, cfg.num_switches)
        prefill_fastv = cfg.token_selection == "fastv" and image_mask is not None and bool(image_mask.any())
        post_segment = state is not None and state.key_valid_post is not None
        h_prev = None
        for i, layer in enumerate(self._layers):
            if i == cfg.fastv_k and prefill_fastv:
                scores = self._latency_attention(self._layers[i - 1], h_prev, cos, sin, masks, latency_pos, i - 1)
                index, valid = tokens.fastv_keep(scores, image_mask, key_valid[:, past : past + T], cfg.fastv_ratio)
                h = h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))
                cos = cos.gather(1, index[..., None].expand(-1, -1, cos.shape[-1]))
                sin = sin.gather(1, index[..., None].expand(-1, -1, sin.shape[-1]))
                latency_pos = None if latency_pos is None else (index == latency_pos[:, None]).long().argmax(1)
                T2 = index.shape[1]
                if selection is not None:
                    selection.update(index=index, valid=valid)
                if state is not None:
                    state.key_valid_post = torch.zeros(B, state.capacity, dtype=torch.bool, device=h.device)
                    state.key_valid_post[:, :T2] = valid
                    kv_post = state.key_valid_post
                else:
                    kv_post = valid
                past = 0
                masks = self._attention_masks(kv_post, torch.arange(T2, device=h.device), T2)
            elif i == cfg.fastv_k and post_segment:  # a decode step after a FastV prefill
                past = state.length_post
                state.key_valid_post[:, past : past + T] = True
                masks = self._attention_masks(state.key_valid_post, torch.arange(past, past + T, device=h.device),
                                              past + T)  # fmt: skip
            mask = masks[self._layer_window(i)]
            if i == cfg.fastv_k - 1 and prefill_fastv:
                h_prev = h
            if i == cfg.num_prefix_layers and plan is None:
                if latency_pos is None:
                    raise ValueError("no plan: the scheduler needs the latency token position and the budget")
                k = budgets.units_for_budget(budget, cfg).to(h.device)
                plan, _ = self.scheduler(
                    h[torch.arange(B, device=h.device), latency_pos], k, group_size=cfg.group_size,
                    tau=cfg.gumbel_tau, stochastic=stochastic, generator=generator,
                )  # fmt: skip
                if state is not None:
                    state.plan = plan
            if i < cfg.num_prefix_layers or mode == "mask":
                p = None if i < cfg.num_prefix_layers else plan[:, i - cfg.num_prefix_layers]
                w = _full_weights(layer, self._n_rep)
                group = None
                if state is not None:
                    if i not in state.groups:
                        state.groups[i] = self._groups_for_layer(layer, full_on, True, state.capacity, B)
                    group = state.groups[i][0]
                args = (w, h, cos, sin, mask, group, past, None if p is None else p[:, 0], None if p is None else p[:, 1])
                run = self._layer_fn(layer)
                if self.training and getattr(layer, "gradient_checkpointing", False):
                    h = checkpoint(run, *args, use_reentrant=False)
                else:
                    h = run(*args)
                if exit_hidden is not None and i in exit_hidden:
                    exit_hidden[i] = h
                continue
            # skip mode, schedulable layer
            if plan_cpu is None and not (state is not None and i in state.groups):
                plan_cpu = plan.detach().cpu()
            if state is not None:
                if i not in state.groups:
                    state.groups[i] = self._groups_for_layer(
                        layer, plan_cpu[:, i - cfg.num_prefix_layers], True, state.capacity, B
                    )
                groups = state.groups[i]
            else:
                groups = self._groups_for_layer(layer, plan_cpu[:, i - cfg.num_prefix_layers], False, 0, B)
            for g in groups:
                if g.rows is None:
                    h = self._run_layer(layer, g.weights, h, cos, sin, mask, g, past)
                else:
                    out = self._run_layer(layer, g.weights, h[g.rows], cos[g.rows], sin[g.rows], mask[g.rows], g, past)
                    h = h.index_copy(0, g.rows, out)
            if exit_hidden is not None and i in exit_hidden:
                exit_hidden[i] = h
        if state is not None:
            if prefill_fastv or post_segment:
                state.length += T
                state.length_post = past + h.shape[1]
            else:
                state.length = past + T
        return lm.norm(h), plan

    def _latency_attention(self, layer, h_in, cos, sin, masks, latency_pos, layer_idx):
        """[B, T]: the attention the latency token pays to each token in `layer` (input h_in), averaged over heads.
        FastV's criterion, with the latency token (the last prompt token) as the query."""
        a = layer.self_attn
        d = a.head_dim
        B, T, _ = h_in.shape
        rows = torch.arange(B, device=h_in.device)
        x = layer.input_layernorm(h_in)
        q = _project(a.q_proj, x[rows, latency_pos]).view(B, -1, 1, d)
        k = _project(a.k_proj, x).view(B, T, -1, d).transpose(1, 2)
        cq, sq = cos[rows, latency_pos][:, None, None], sin[rows, latency_pos][:, None, None]
        q = q * cq + rotate_half(q) * sq
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)).squeeze(2) * a.scaling  # [B, H, T]
        allowed = masks[self._layer_window(layer_idx)][rows, 0, latency_pos]  # [B, T]
        return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)

    def execution_plan_fractions(self, plan: torch.Tensor) -> torch.Tensor:
        """[B, S, 2, H] switches -> [B, num_layers]: fraction of each layer's units that ran (prefix layers: 1)."""
        B = plan.shape[0]
        prefix = torch.ones(B, self.config.num_prefix_layers, device=plan.device)
        return torch.cat([prefix, plan.detach().float().mean((-1, -2))], dim=1)

    # ---------------------------------------------------------------------------------------------- forward

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, labels=None, budget=None,
                inputs_embeds=None, image_sizes=None, execution_plan=None, plan_mode=None, generator=None,
                logits_to_keep: int = 0, exit_layers=None, **kwargs):  # fmt: skip
        """Training and scoring forward. budget: a float or one per row (random per sample in training when None).
        plan_mode: "mask" (training default) or "skip" (inference default). execution_plan: a [B, S, 2, H] plan to
        run instead of the scheduler's. exit_layers: layer indices whose output hidden states (before the final norm)
        come back in `exit_hidden_states` (early-exit losses, adallava.baselines)."""
        unknown = set(kwargs) - _IGNORED_FORWARD_KWARGS
        if unknown:  # a misspelt budget= must not silently run the full model
            raise TypeError(f"unexpected forward arguments: {sorted(unknown)}")
        embeds, attention_mask, labels, image_mask = self.prepare_inputs(
            input_ids, pixel_values, attention_mask, labels, inputs_embeds, image_sizes
        )
        B, T = embeds.shape[:2]
        budget = self.resolve_budget(budget, B)
        lat = self.latency_token(budget.to(embeds.device))
        h, mask, labels, lat_pos = self.insert_latency_token(embeds, attention_mask, labels, lat)
        src, is_lat = self.latency_token_index(T, lat_pos)
        image_mask = image_mask.gather(1, src) & ~is_lat
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        mode = plan_mode or ("mask" if self.training else "skip")
        selection = {}
        exit_hidden = None
        if exit_layers is not None:
            bad = [i for i in exit_layers if not 0 <= int(i) < self.config.num_layers]
            if bad:
                raise ValueError(f"exit_layers {bad}: layer indices must be in [0, {self.config.num_layers - 1}]")
            if self.config.token_selection == "fastv":
                raise ValueError("exit_layers with token_selection='fastv': layers after fastv_k see fewer rows")
            exit_hidden = {int(i): None for i in exit_layers}
        hidden, plan = self.decode(
            h, mask.bool(), position_ids, budget, lat_pos, plan=execution_plan, mode=mode, generator=generator,
            image_mask=image_mask, selection=selection, exit_hidden=exit_hidden,
        )  # fmt: skip
        if selection and labels is not None:  # FastV dropped image tokens: labels follow the rows that remain
            labels = labels.gather(1, selection["index"]).masked_fill(~selection["valid"], IGNORE_INDEX)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        return AdaLlavaOutput(
            loss=loss, logits=logits, execution_plan=self.execution_plan_fractions(plan), plan=plan, budget=budget,
            latency_token_position=lat_pos, labels=labels, exit_hidden_states=exit_hidden,
        )  # fmt: skip

    # ---------------------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, budget=None, *, max_new_tokens=20,
                 do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=None,
                 use_cache=True, return_dict_in_generate=False, streamer=None, generator=None, execution_plan=None,
                 inputs_embeds=None, image_sizes=None, latency_ms=None, **kwargs):  # fmt: skip
        """Generate with one execution plan per request, chosen at prefill from image, question and budget and kept
        for every decode step. budget: one float or one per request in [num_prefix_layers/num_layers, 1] (default 1).

        latency_ms: a prefill latency target (one or one per request) mapped through the model's measured cost table
        (model.cost_table, see adallava.cost.profile_latency) to the largest budget that meets it; with a budget as
        well, the smaller of the two runs (both are caps).

        Returns the token ids (prompt + new), or with return_dict_in_generate=True an AdaLlavaGenerateOutput carrying
        execution_plan [B, num_layers], flops [B] and measured timings.
        """
        if kwargs:
            raise TypeError(f"unsupported generate arguments: {sorted(kwargs)}")
        if self.training:
            raise RuntimeError("generate() runs the inference path: call model.eval() first")
        gen = self.generation_config
        eos = eos_token_id if eos_token_id is not None else gen.eos_token_id
        eos_ids = torch.tensor([] if eos is None else (eos if isinstance(eos, list) else [eos]), device=self.device)
        pad = pad_token_id if pad_token_id is not None else (gen.pad_token_id if gen.pad_token_id is not None else 0)
        _sync(self.device)
        t0 = time.perf_counter()
        embeds, attention_mask, _, image_mask = self.prepare_inputs(
            input_ids, pixel_values, attention_mask, None, inputs_embeds, image_sizes
        )
        B, T = embeds.shape[:2]
        budget = budgets.validate_budget(1.0 if budget is None else budget, B, self.config)
        if latency_ms is not None:
            budget = torch.minimum(budget, self.budget_for_latency(latency_ms, input_ids, attention_mask))
        # Left-align every prompt (stable sort puts padding first), so that all prompts end at the same slot and the
        # latency token is appended at the end of each prompt (spec 1.4).
        order = torch.sort(attention_mask.long(), dim=1, stable=True).indices
        embeds = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
        attention_mask = attention_mask.gather(1, order)
        image_mask = image_mask.gather(1, order)
        lat = self.latency_token(budget.to(embeds.device))
        h, mask, _, lat_pos = self.insert_latency_token(embeds, attention_mask, None, lat)
        image_mask = torch.cat([image_mask, torch.zeros_like(image_mask[:, :1])], 1)
        prompt_len = h.shape[1]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        capacity = prompt_len + max_new_tokens
        key_valid = torch.zeros(B, capacity, dtype=torch.bool, device=h.device)
        key_valid[:, :prompt_len] = mask.bool()
        state = DecodeState(capacity=capacity, key_valid=key_valid, plan=execution_plan) if use_cache else None
        selection = {}
        hidden, plan = self.decode(h, key_valid, position_ids, budget, lat_pos, state=state, plan=execution_plan,
                                   image_mask=image_mask, selection=selection)  # fmt: skip
        logits = self.lm_head(hidden[:, -1])
        _sync(self.device)  # CUDA runs asynchronously: the timer must wait for the prefill's kernels
        t_prefill = time.perf_counter() - t0

        new_tokens, next_pos = [], position_ids[:, -1] + 1
        finished = torch.zeros(B, dtype=torch.bool, device=h.device)
        num_generated = torch.zeros(B, dtype=torch.long, device=h.device)
        all_h, all_pos = h, position_ids
        for step in range(max_new_tokens):
            token = self._next_token(logits, do_sample, temperature, top_k, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
            num_generated += (~finished).long()
            new_tokens.append(token)
            if streamer is not None:
                streamer.put(token.cpu())
            finished |= torch.isin(token, eos_ids)
            if finished.all() or step == max_new_tokens - 1:
                break
            emb = self.get_input_embeddings()(token)[:, None]
            slot = prompt_len + step
            key_valid[:, slot] = True
            if state is not None:
                hidden, _ = self.decode(emb, key_valid, next_pos[:, None], budget, state=state)
            else:  # recompute the whole sequence under the same plan (reference path for tests)
                all_h = torch.cat([all_h, emb], dim=1)
                all_pos = torch.cat([all_pos, next_pos[:, None]], dim=1)
                image_mask = torch.cat([image_mask, torch.zeros_like(image_mask[:, :1])], 1)
                hidden, _ = self.decode(all_h, key_valid[:, : slot + 1], all_pos, budget, lat_pos, plan=plan,
                                        image_mask=image_mask)  # fmt: skip
            logits = self.lm_head(hidden[:, -1])
            next_pos = next_pos + 1
        if streamer is not None:
            streamer.end()
        _sync(self.device)
        t_total = time.perf_counter() - t0
        generated = torch.stack(new_tokens, 1) if new_tokens else torch.zeros(B, 0, dtype=torch.long, device=h.device)
        prompt_ids = input_ids if input_ids is not None else torch.zeros(B, 0, dtype=torch.long, device=h.device)
        sequences = torch.cat([prompt_ids, generated], dim=1)
        if not return_dict_in_generate:
            return sequences
        num_images = None
        if pixel_values is not None and input_ids is not None:
            num_images = (input_ids == self.config.image_token_id).sum(1) // self.config.image_seq_length
        pruned = selection["valid"].sum(1) if selection else None
        breakdown = cost.flops_breakdown(self.config, plan, mask.sum(1), num_generated, num_images, pruned)
        flops = torch.tensor([p["total"] for p in breakdown], dtype=torch.float64)
        return AdaLlavaGenerateOutput(
            sequences=sequences, execution_plan=self.execution_plan_fractions(plan), flops=flops, budget=budget,
            num_generated=num_generated, plan=plan, flops_breakdown=breakdown,
            timings={"prefill_s": t_prefill, "decode_s": t_total - t_prefill, "total_s": t_total},
        )  # fmt: skip

    def budget_for_latency(self, latency_ms, input_ids, attention_mask) -> torch.Tensor:
        """[B] budgets meeting per-request prefill latency targets, from self.cost_table (ValueError if none)."""
        table = getattr(self, "cost_table", None)
        if table is None:
            raise ValueError("latency_ms needs a cost table: model.cost_table = adallava.cost.profile_latency(model)")
        B = attention_mask.shape[0]
        targets = latency_ms if isinstance(latency_ms, (list, tuple)) else [latency_ms] * B
        if len(targets) != B:
            raise ValueError(f"got {len(targets)} latency_ms targets for a batch of {B}: give one, or one per request")
        seq_lens = (attention_mask.sum(1) + 1).tolist()  # + the latency token
        if input_ids is not None:
            n_images = ((input_ids == self.config.image_token_id).sum(1) // self.config.image_seq_length).tolist()
        else:
            n_images = [0] * B
        return torch.tensor(
            [cost.budget_for_latency(table, t, int(n), int(i)) for t, n, i in zip(targets, seq_lens, n_images)],
            dtype=torch.float64,
        )

    @staticmethod
    def _next_token(logits, do_sample, temperature, top_k, top_p, generator):
        if not do_sample or temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, idx = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
            logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


AutoModelForImageTextToText.register(AdaLlavaConfig, AdaLlavaForConditionalGeneration)
# Checkpoints saved by plain transformers name weights as LLaVA does (e.g. `language_model.lm_head`): load them the same way.
if get_checkpoint_conversion_mapping("ada_llava") is None:
    register_checkpoint_conversion_mapping("ada_llava", get_checkpoint_conversion_mapping("llava"))
