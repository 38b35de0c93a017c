"""Analytic FLOPs of a request under an execution plan (multiply-add = 2 FLOPs, as LLM-Viewer counts).

Counted: each decoder layer's projections, attention matmuls and MLP, scaled by the heads, key/value heads and neuron
groups that run; lm_head for each generated token; the latency encoder and scheduler (once per request); and, when the
request has images, the vision tower and projector. Norms, RoPE and softmax are left out (under 1% at these shapes).
"""

from __future__ import annotations

import dataclasses

import torch


def layer_flops_parts(hidden, head_dim, n_q, n_kv, n_neurons, n_new, n_ctx_start):
    """(attention, MLP) FLOPs of one decoder layer on n_new tokens whose first attends to n_ctx_start + 1 keys."""
    proj = 2 * n_new * hidden * head_dim * (2 * n_q + 2 * n_kv)  # q, o + k, v
    # keys seen by the new tokens: (n_ctx_start+1) + ... + (n_ctx_start+n_new)
    keys = n_new * n_ctx_start + n_new * (n_new + 1) / 2
    attn = 2 * 2 * n_q * head_dim * keys  # QK^T and AV
    mlp = 3 * 2 * n_new * hidden * n_neurons
    return proj + attn, mlp


def layer_flops(hidden, head_dim, n_q, n_kv, n_neurons, n_new, n_ctx_start):
    """One decoder layer on n_new tokens whose first attends to n_ctx_start + 1 keys (causal)."""
    return sum(layer_flops_parts(hidden, head_dim, n_q, n_kv, n_neurons, n_new, n_ctx_start))


def _active_sizes(config, plan):
    """Per row and layer: (query heads, key/value heads, neurons) that run. plan [B, S, 2, H] -> three [B, L] tensors."""
    text = config.text_config
    H, n_kv_total = text.num_attention_heads, text.num_key_value_heads
    n_rep = H // n_kv_total
    B = plan.shape[0]
    on = plan.detach().float().cpu() > 0.5
    heads = on[:, :, 0]  # [B, S, H]
    q = heads.sum(-1).double()
    kv = heads.view(B, -1, n_kv_total, n_rep).any(-1).sum(-1).double()
    sizes = torch.tensor([len(g) for g in torch.tensor_split(torch.arange(text.intermediate_size), H)]).double()
    neurons = (on[:, :, 1].double() * sizes).sum(-1)
    P = config.num_prefix_layers
    full = torch.ones(B, P, dtype=torch.float64)
    return (
        torch.cat([full * H, q], 1),
        torch.cat([full * n_kv_total, kv], 1),
        torch.cat([full * text.intermediate_size, neurons], 1),
    )


def vision_flops_parts(config) -> tuple[float, float]:
    """(CLIP-style vision tower, 2-layer projector) FLOPs for one image."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2 + 1
    patch_embed = 2 * (n - 1) * 3 * v.patch_size**2 * v.hidden_size
    per_layer = 2 * n * v.hidden_size * (4 * v.hidden_size + 2 * v.intermediate_size) + 4 * n * n * v.hidden_size
    h = config.text_config.hidden_size
    projector = 2 * config.image_seq_length * (v.hidden_size * h + h * h)
    return float(patch_embed + v.num_hidden_layers * per_layer), float(projector)


def vision_flops(config) -> float:
    return sum(vision_flops_parts(config))


def scheduler_flops(config) -> float:
    h = config.text_config.hidden_size
    out = config.num_schedulable_layers * (1 if config.granularity == "layer" else 2 * config.num_switches)
    return float(2 * (config.latency_embed_dim * h + h * h) + 2 * h * out)


def flops_breakdown(config, plan, prompt_len, num_generated, num_images=None, pruned_len=None) -> list[dict]:
    """Per request: {"prefill": {vision_tower, projector, scheduler, attention, mlp, lm_head}, "decode": {attention,
    mlp, lm_head}, "layers": [attention + MLP FLOPs of each decoder layer, prefill + decode], "total"}.

    Prefill runs prompt_len tokens (latency token included); then one decode step per generated token after the
    first; lm_head once per generated token. pruned_len [B]: tokens left after FastV drops image tokens at layer
    config.fastv_k (the layers from there on see only those). Attention and MLP count only the heads, key/value heads
    and neuron groups the plan ran.
    """
    text = config.text_config
    hidden, head_dim = text.hidden_size, getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q, kv, neurons = _active_sizes(config, plan)
    prompt_len = prompt_len.detach().cpu().double()
    num_generated = num_generated.detach().cpu().double()
    vt, proj = vision_flops_parts(config)
    lm_head = 2 * hidden * text.vocab_size
    out = []
    for b in range(plan.shape[0]):
        g = float(num_generated[b])
        steps = max(g - 1, 0)
        images = 0.0 if num_images is None else float(num_images[b])
        pre = {"vision_tower": images * vt, "projector": images * proj, "scheduler": scheduler_flops(config),
               "attention": 0.0, "mlp": 0.0, "lm_head": lm_head * min(g, 1.0)}  # fmt: skip
        dec = {"attention": 0.0, "mlp": 0.0, "lm_head": lm_head * steps}
        layers = []
        for layer in range(config.num_layers):
            n = float(prompt_len[b]) if pruned_len is None or layer < config.fastv_k else float(pruned_len[b])
            args = (hidden, head_dim, float(q[b, layer]), float(kv[b, layer]), float(neurons[b, layer]))
            a, m = layer_flops_parts(*args, n_new=n, n_ctx_start=0)
            da, dm = layer_flops_parts(*args, n_new=steps, n_ctx_start=n) if steps else (0.0, 0.0)
            pre["attention"] += a
            pre["mlp"] += m
            dec["attention"] += da
            dec["mlp"] += dm
            layers.append(a + m + da + dm)
        out.append({"prefill": pre, "decode": dec, "layers": layers,
                    "total": sum(pre.values()) + sum(dec.values())})  # fmt: skip
    return out


def request_flops(config, plan, prompt_len, num_generated, num_images=None, pruned_len=None) -> torch.Tensor:
    """FLOPs of each request [B] (float64): the totals of flops_breakdown."""
    parts = flops_breakdown(config, plan, prompt_len, num_generated, num_images, pruned_len)
    return torch.tensor([p["total"] for p in parts], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Roofline estimate for named hardware (the paper's "prefill time" is LLM-Viewer's roofline on a V100, spec 3).

HARDWARE = {
    # peak dense fp16/bf16 tensor FLOP/s, memory bandwidth bytes/s (vendor datasheets)
    "V100": {"flops": 112e12, "bandwidth": 900e9},
    "A100": {"flops": 312e12, "bandwidth": 2039e9},
    "H100": {"flops": 989e12, "bandwidth": 3350e9},
    "H200": {"flops": 989e12, "bandwidth": 4800e9},
}


def roofline_prefill_seconds(config, plan, prompt_len: int, hardware: str = "V100", bytes_per_value: int = 2) -> float:
    """Roofline prefill time of one request (batch 1): each decoder layer's linear layers and attention matmuls take
    max(FLOPs / peak, bytes moved / bandwidth); lm_head on the last position. Only relative figures mean much."""
    if hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}: one of {sorted(HARDWARE)}")
    peak, bw = HARDWARE[hardware]["flops"], HARDWARE[hardware]["bandwidth"]
    text = config.text_config
    hidden, head_dim = text.hidden_size, getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q, kv, neurons = _active_sizes(config, plan[:1])
    n = float(prompt_len)

    def op(flops, bytes_):
        return max(flops / peak, bytes_ / bw)

    total = 0.0
    for layer in range(config.num_layers):
        nq, nkv, ni = float(q[0, layer]), float(kv[0, layer]), float(neurons[0, layer])
        if nq:
            for out_features in (nq * head_dim, nkv * head_dim, nkv * head_dim):  # q, k, v
                total += op(2 * n * hidden * out_features, bytes_per_value * (hidden * out_features + n * (hidden + out_features)))
            total += op(2 * n * nq * head_dim * hidden, bytes_per_value * (nq * head_dim * hidden + n * (nq * head_dim + hidden)))
            total += op(2 * 2 * nq * head_dim * n * (n + 1) / 2, bytes_per_value * (3 * n * nq * head_dim + nq * n * n))
        if ni:
            total += 2 * op(2 * n * hidden * ni, bytes_per_value * (hidden * ni + n * (hidden + ni)))  # gate, up
            total += op(2 * n * ni * hidden, bytes_per_value * (ni * hidden + n * (hidden + ni)))  # down
    total += op(2 * hidden * text.vocab_size, bytes_per_value * hidden * text.vocab_size)
    return total


# ----------------------------------------------------------------------------------------------------------------
# Measured cost tables: what a budget costs in milliseconds on *this* device, and the budget that meets a target.


def _device_name(device) -> str:
    import platform

    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


def model_signature(config) -> str:
    t, v = config.text_config, config.vision_config
    return (f"{t.model_type}-L{t.num_hidden_layers}-h{t.hidden_size}-H{t.num_attention_heads}-kv{t.num_key_value_heads}"
            f"-I{t.intermediate_size}-V{t.vocab_size}|vis-{v.image_size}px-p{v.patch_size}-h{v.hidden_size}"
            f"-L{v.num_hidden_layers}|P{config.num_prefix_layers}")  # fmt: skip


@torch.no_grad()
def profile_latency(model, seq_lens=(64, 256, 640), repeats: int = 3, images: bool = True) -> dict:
    """Measure, on the model's device, the latency of the parts of a prefill at each sequence length: one whole
    decoder layer, its attention block alone, the vision tower + projector (per image), the latency encoder +
    scheduler, lm_head + final norm. Returns a JSON-able cost table keyed by device and model signature.

    Predicted prefill = fixed parts + sum over layers of (attention fraction x attention time + MLP fraction x
    (layer - attention) time); see predict_prefill_ms.
    """
    import statistics
    import time

    dev = model.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg = model.config
    hidden = cfg.text_config.hidden_size
    layer = model.model.language_model.layers[cfg.num_prefix_layers]

    def timed(fn):
        fn()
        sync()
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            runs.append(time.perf_counter() - t)
        return statistics.median(runs) * 1e3

    full_w = model.full_layer_weights(layer)
    attn_only = dataclasses.replace(full_w, mlp=False)
    rows = []
    for n in seq_lens:
        h = torch.randn(1, n, hidden, device=dev, dtype=model.dtype)
        pos = torch.arange(n, device=dev)[None]
        cos, sin = model.model.language_model.rotary_emb(h, pos)
        masks = model._attention_masks(torch.ones(1, n, dtype=torch.bool, device=dev), pos[0], n)
        mask = masks[None]  # the full-attention mask (key None); sliding-window layers cost no more
        rows.append({
            "seq_len": n,
            "layer_ms": timed(lambda: model._run_layer(layer, full_w, h, cos, sin, mask)),
            "attention_ms": timed(lambda: model._run_layer(layer, attn_only, h, cos, sin, mask)),
        })  # fmt: skip
    hidden_one = torch.randn(1, hidden, device=dev, dtype=model.dtype)
    k = torch.tensor([cfg.units_per_layer * cfg.num_schedulable_layers // 2])

    def scheduler_call():
        model.latency_token(torch.tensor([0.75], dtype=torch.float64))
        model.scheduler(hidden_one, k, group_size=cfg.group_size, tau=cfg.gumbel_tau, stochastic=False)

    head_ms = timed(lambda: model.lm_head(model.model.language_model.norm(hidden_one)))
    vision_ms = 0.0
    if images:
        size = cfg.vision_config.image_size
        pixels = torch.randn(1, 3, size, size, device=dev, dtype=model.dtype)
        vision_ms = timed(lambda: model.model.get_image_features(pixel_values=pixels, return_dict=True))
    return {
        "device": _device_name(dev), "model": model_signature(cfg), "dtype": str(model.dtype).replace("torch.", ""),
        "granularity": cfg.granularity, "num_layers": cfg.num_layers, "num_prefix_layers": cfg.num_prefix_layers,
        "units_per_layer": cfg.units_per_layer, "layers": rows, "scheduler_ms": timed(scheduler_call),
        "lm_head_ms": head_ms, "vision_ms_per_image": vision_ms,
    }  # fmt: skip


def _interp(rows, key, n):
    """Piecewise-linear in sequence length through the measured points, linear extrapolation beyond them."""
    xs = [r["seq_len"] for r in rows]
    ys = [r[key] for r in rows]
    if len(xs) == 1:
        return ys[0] * n / xs[0]
    i = 1
    while i < len(xs) - 1 and n > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (n - x0) / (x1 - x0))


def predict_prefill_ms(table: dict, budget: float, seq_len: int, num_images: int = 0) -> float:
    """Predicted prefill latency of one request at a budget, from a measured cost table. Layers are identical in
    shape, so a budget's cost is (prefix + k units) of layer time; `head` units count heads and neuron groups alike."""
    u, L, P = table["units_per_layer"], table["num_layers"], table["num_prefix_layers"]
    k = max(0, int(budget * u * L + 1e-6) - u * P)
    layer_ms = _interp(table["layers"], "layer_ms", seq_len)
    return (P + k / u) * layer_ms + table["scheduler_ms"] + table["lm_head_ms"] + num_images * table["vision_ms_per_image"]


def budget_for_latency(table: dict, latency_ms: float, seq_len: int, num_images: int = 0) -> float:
    """The largest budget on the model's grid whose predicted prefill latency meets latency_ms. Raises ValueError
    naming the achievable range when even the smallest budget cannot meet it."""
    if not isinstance(latency_ms, (int, float)) or isinstance(latency_ms, bool) or not latency_ms > 0:
        raise ValueError(f"latency_ms must be a positive number of milliseconds, got {latency_ms!r}")
    u, L, P = table["units_per_layer"], table["num_layers"], table["num_prefix_layers"]
    grid = [n / (u * L) for n in range(u * P, u * L + 1)]
    fits = [b for b in grid if predict_prefill_ms(table, b, seq_len, num_images) <= latency_ms]
    if not fits:
        lo = predict_prefill_ms(table, grid[0], seq_len, num_images)
        hi = predict_prefill_ms(table, 1.0, seq_len, num_images)
        raise ValueError(
            f"latency_ms={latency_ms:g} is below what this model can do for a {seq_len}-token prompt on "
            f"{table['device']}: {lo:.1f} ms (budget {grid[0]:g}) to {hi:.1f} ms (budget 1)"
        )
    return fits[-1]


def save_cost_table(table: dict, path) -> None:
    """Write atomically: a reader never sees half a table."""
    import json
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=2)
    os.replace(tmp, path)


def load_cost_table(path, model=None) -> dict:
    import json

    table = json.loads(open(path).read())
    if model is not None and table.get("model") != model_signature(model.config):
        raise ValueError(f"{path}: cost table is for model {table.get('model')!r}, not {model_signature(model.config)!r}")
    return table
