"""Training recipes for the baselines AdaLLaVA is compared with, so that they get the same steps and data as the adapt
stage (a fair comparison: otherwise the baselines run the base model's weights while AdaLLaVA gets more training).

- early exit, trained LayerSkip-style. LayerSkip (Elhoushi et al., "LayerSkip: Enabling Early Exit Inference and
  Self-Speculative Decoding", ACL 2024, arXiv:2404.16710), section 4.1 of the paper:
    * layer dropout whose rate rises with depth: p_l = p_max * D(l), D(l) = exp(l * ln 2 / (L - 1)) - 1, which is 0 at
      the first layer and 1 at the last (their time curriculum S(t) is held at 1 here);
    * an early-exit loss through the model's shared final norm and lm_head at the exit layers:
      loss = sum_l e~(l) * CE(lm_head(norm(h_l))), e~(l) = e(l) / sum_i e(i),
      e(l) = e_scale * sum_{i=0..l} i for l < L - 1 and e(L - 1) = L - 1 + e_scale * sum_{i=0..L-2} i
      (later layers weigh more; the last layer weighs most).
  Exits: exactly the layers early exit stops after at inference, P - 1 + k for k = 0 .. S (P prefix layers, S
  schedulable ones; the paper's curriculum C(t, l), which enables a rotating subset of exits, is not used: with at
  most 16 exits every one of them is enabled at every step). Dropout applies to the schedulable layers only: the prefix
  always runs, in training as at inference (evaluate's early_exit runs the prefix and the first k schedulable layers).
- random skipping, trained LayerDrop-style. LayerDrop (Fan, Grave and Joulin, "Reducing Transformer Depth on Demand
  with Structured Dropout", ICLR 2020, arXiv:1909.11556): in training every layer is dropped independently with a
  fixed rate p; at inference a fixed-size subset of layers is kept to meet the target depth (they prune every other
  layer; we draw the subset at random per request, as evaluate's random_skip does). Here the schedulable layers (or,
  at head granularity, their units) are dropped; the default p = 0.5 is the mean fraction of schedulable layers that
  AdaLLaVA's uniform training budgets drop, so both see the same average depth.

Both run the model with budget 1.0 and an explicit execution plan (mask mode), so the scheduler is bypassed, exactly
as in evaluation. Pure torch: the pipelines call these from their training loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .modeling import IGNORE_INDEX

BASELINE_STAGES = ("layerskip", "layerdrop")  # pipelines' stage names: early exit and random skipping, trained


@dataclass
class BaselineArgs:
    layerskip_p_max: float = 0.1  # LayerSkip's maximum layer-dropout rate (at the last layer)
    layerskip_e_scale: float = 1.0  # LayerSkip's early-exit loss scale (0: only the last layer's loss)
    layerdrop_rate: float = 0.5  # LayerDrop's rate p per schedulable layer (unit at head granularity)

    def __post_init__(self):
        for name in ("layerskip_p_max", "layerdrop_rate"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if self.layerskip_e_scale < 0:
            raise ValueError(f"layerskip_e_scale must be >= 0, got {self.layerskip_e_scale}")


def baseline_args(values: dict | None) -> BaselineArgs:
    """BaselineArgs from a config mapping; an unknown key is an error naming it."""
    values = dict(values or {})
    known = set(BaselineArgs.__dataclass_fields__)
    if set(values) - known:
        raise ValueError(f"baseline_args: unknown key(s) {sorted(set(values) - known)}; known: {sorted(known)}")
    return BaselineArgs(**values)


# ------------------------------------------------------------------------------------------------------- LayerSkip


def layerskip_rates(config, p_max: float) -> torch.Tensor:
    """[S] dropout rate of each schedulable layer: p_max * (exp(l ln2 / (L-1)) - 1) at its absolute index l."""
    L, P = config.num_layers, config.num_prefix_layers
    idx = torch.arange(P, L, dtype=torch.float64)
    return p_max * (torch.exp(idx * math.log(2) / (L - 1)) - 1)


def layerskip_exit_layers(config) -> list[int]:
    """The layers early exit stops after at inference: P - 1 (budget P/L) .. L - 1 (the full model)."""
    return list(range(config.num_prefix_layers - 1, config.num_layers))


def layerskip_exit_weights(exit_layers: list[int], num_layers: int, e_scale: float) -> torch.Tensor:
    """Normalised early-exit loss weights e~(l) for the given exit layers (see the module docstring)."""
    L = num_layers
    e = []
    for layer in exit_layers:
        if layer < L - 1:
            e.append(e_scale * layer * (layer + 1) / 2)  # e_scale * sum_{i=0..l} i
        else:
            e.append(L - 1 + e_scale * (L - 2) * (L - 1) / 2)
    e = torch.tensor(e, dtype=torch.float64)
    return e / e.sum()


def _check_layer_granularity(config, what: str) -> None:
    if config.granularity != "layer":
        raise ValueError(f"{what} exits after whole layers: granularity 'layer' only, got {config.granularity!r}")


def layer_dropout_plan(rates: torch.Tensor, batch: int, config, generator=None) -> torch.Tensor:
    """[batch, S, 2, H] plan: schedulable layer j is dropped (all switches 0) with probability rates[j], per sample."""
    keep = (torch.rand(batch, len(rates), generator=generator, dtype=torch.float64) >= rates).float()
    return keep[:, :, None, None].expand(batch, len(rates), 2, config.num_switches).contiguous()


def layerskip_loss(model, batch: dict, args: BaselineArgs, generator=None, unwrapped=None):
    """LayerSkip's training loss -> (loss, parts). model: what to call (the model, or its DDP wrapper with .config);
    unwrapped: the AdaLlavaForConditionalGeneration itself (default: model), whose final norm and lm_head the early
    exits share."""
    cfg = model.config
    unwrapped = model if unwrapped is None else unwrapped
    _check_layer_granularity(cfg, "LayerSkip's early-exit loss")
    B = batch["input_ids"].shape[0]
    plan = layer_dropout_plan(layerskip_rates(cfg, args.layerskip_p_max), B, cfg, generator)
    exits = layerskip_exit_layers(cfg)
    plan = plan.to(batch["input_ids"].device)
    out = model(**batch, budget=1.0, execution_plan=plan, plan_mode="mask", exit_layers=exits)
    weights = layerskip_exit_weights(exits, cfg.num_layers, args.layerskip_e_scale)
    labels = out.labels[:, 1:]
    sel = labels != IGNORE_INDEX
    target = labels[sel]
    norm, lm_head = unwrapped.model.language_model.norm, unwrapped.lm_head
    loss = out.logits.new_zeros((), dtype=torch.float32)
    parts = {}
    for layer, w in zip(exits, weights.tolist()):
        if layer == cfg.num_layers - 1:
            logits = out.logits[:, :-1][sel]
        else:
            logits = lm_head(norm(out.exit_hidden_states[layer][:, :-1][sel]))
        ce = F.cross_entropy(logits.float(), target) if target.numel() else logits.sum() * 0.0
        parts[f"exit_{layer}"] = float(ce.detach())
        loss = loss + w * ce
    parts["loss"] = float(loss.detach())
    return loss, parts


# ------------------------------------------------------------------------------------------------------- LayerDrop


def layerdrop_plan(config, batch: int, rate: float, generator=None) -> torch.Tensor:
    """[batch, S, 2, H] plan: every schedulable unit (a whole layer at layer granularity; group_size heads + neuron
    groups at head granularity, the units evaluate's random_skip draws) dropped independently with probability rate."""
    S, H, u = config.num_schedulable_layers, config.num_switches, config.units_per_layer
    keep = (torch.rand(batch, S, u, generator=generator, dtype=torch.float64) >= rate).float()
    return keep.repeat_interleave(H // u, dim=-1)[:, :, None, :].expand(batch, S, 2, H).contiguous()


def layerdrop_loss(model, batch: dict, args: BaselineArgs, generator=None):
    """LayerDrop's training loss (the plain next-token loss under random unit dropping) -> (loss, parts)."""
    B = batch["input_ids"].shape[0]
    plan = layerdrop_plan(model.config, B, args.layerdrop_rate, generator).to(batch["input_ids"].device)
    out = model(**batch, budget=1.0, execution_plan=plan, plan_mode="mask")
    return out.loss, {"loss": float(out.loss.detach()), "kept": float(plan.mean())}


def baseline_loss(stage: str, model, batch: dict, args: BaselineArgs, generator=None, unwrapped=None):
    """The training loss of a baseline stage ("layerskip" or "layerdrop") -> (loss, parts)."""
    if stage == "layerskip":
        return layerskip_loss(model, batch, args, generator, unwrapped)
    if stage == "layerdrop":
        return layerdrop_loss(model, batch, args, generator)
    raise ValueError(f"no baseline training recipe for stage {stage!r}; known: {list(BASELINE_STAGES)}")
