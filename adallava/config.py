"""AdaLlavaConfig: a LlavaConfig plus the few numbers that make a LLaVA adaptive.

Defaults reproduce the paper (spec sections 1.1, 2.2, 2.5): half of the language model's layers are the always-on
prefix, block-level scheduling (AdaLLaVA-L), tau = 5, a 256-d sinusoidal budget encoding.
"""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlavaConfig

GRANULARITIES = ("layer", "head")


def default_group_size(num_heads: int) -> int:
    """Heads per scheduling unit for `head` granularity.

    The official code uses scheduler_rank = 8 for its models (32 heads -> 4 units per layer, 13B's 40 -> 5): 8 when
    it divides num_heads and leaves at least 4 units. Otherwise "about 4 units per layer": the smallest divisor of
    num_heads that is >= num_heads / 4 (4 -> 1, 8 -> 2, 9 -> 3, 14 -> 7).
    """
    if num_heads % 8 == 0 and num_heads >= 32:
        return 8
    for r in range(1, num_heads + 1):
        if num_heads % r == 0 and r * 4 >= num_heads:
            return r
    return num_heads


@strict
class AdaLlavaConfig(LlavaConfig):
    model_type = "ada_llava"

    # Layers 0..num_prefix_layers-1 always run; the scheduler reads the latency token at the input of the next one.
    # None -> half of the language model's layers (16 of 32 for Vicuna-7B, 20 of 40 for 13B).
    num_prefix_layers: int | None = None
    # "layer" = AdaLLaVA-L (whole decoder blocks), "head" = AdaLLaVA-H (attention heads + MLP neuron groups).
    granularity: Literal["layer", "head"] = "layer"
    # Heads (and MLP neuron groups) switched together as one unit in `head` granularity ("scheduler_rank" = 8 in the
    # official code for 32 heads). None -> default_group_size(num_attention_heads).
    group_size: int | None = None
    # Gumbel-softmax temperature of the straight-through surrogate; constant 5 in the official code.
    gumbel_tau: float = 5.0
    # Width of the sinusoidal budget encoding fed to the latency encoder's MLP.
    latency_embed_dim: int = 256
    # Visual-token selection that composes with any plan (spec 5): "fastv" drops the image tokens the latency token
    # attends to least after layer fastv_k; "prumerge" / "prumerge+" reduce the vision tower's patches before the
    # projector (CLS-attention outliers merged with their nearest neighbours; "+" adds spatially uniform patches).
    token_selection: Literal["none", "fastv", "prumerge", "prumerge+"] = "none"
    fastv_k: int = 2  # FastV's K: layers that see every image token (K=2 in the paper's table)
    fastv_ratio: float = 0.5  # FastV's R: fraction of image tokens dropped after layer K

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        text = self.text_config
        n_layers = text.num_hidden_layers
        if self.num_prefix_layers is None:
            self.num_prefix_layers = n_layers // 2
        if not 1 <= self.num_prefix_layers < n_layers:
            raise ValueError(
                f"num_prefix_layers must be in [1, {n_layers - 1}] for a {n_layers}-layer language model, "
                f"got {self.num_prefix_layers}"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        heads = text.num_attention_heads
        if self.group_size is None:
            self.group_size = default_group_size(heads)
        if self.group_size < 1 or heads % self.group_size:
            raise ValueError(f"group_size must divide num_attention_heads={heads}, got {self.group_size}")
        if self.latency_embed_dim % 2:
            raise ValueError(f"latency_embed_dim must be even, got {self.latency_embed_dim}")
        if self.token_selection not in ("none", "fastv", "prumerge", "prumerge+"):
            raise ValueError(f"token_selection must be none, fastv, prumerge or prumerge+, got {self.token_selection!r}")
        if not 1 <= self.fastv_k <= self.num_prefix_layers:
            raise ValueError(f"fastv_k must be in [1, num_prefix_layers={self.num_prefix_layers}], got {self.fastv_k}")
        if not 0.0 <= self.fastv_ratio < 1.0:
            raise ValueError(f"fastv_ratio (fraction of image tokens dropped) must be in [0, 1), got {self.fastv_ratio}")
        if not self.gumbel_tau > 0:
            raise ValueError(f"gumbel_tau must be > 0, got {self.gumbel_tau}")

    # Derived sizes, in one place.
    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_schedulable_layers(self) -> int:
        return self.num_layers - self.num_prefix_layers

    @property
    def num_switches(self) -> int:
        """Switches per layer and kind: one per attention head, and as many MLP neuron groups (spec 1.6)."""
        return self.text_config.num_attention_heads

    @property
    def units_per_layer(self) -> int:
        """Scheduling units per layer: 1 for `layer`, num_heads / group_size for `head`."""
        return 1 if self.granularity == "layer" else self.num_switches // self.group_size


AutoConfig.register("ada_llava", AdaLlavaConfig)
