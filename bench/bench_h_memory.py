"""AdaLLaVA-H memory per request: what a generate() holds besides the model and its KV cache.

    python -m bench.bench_h_memory            # analytic at Vicuna-7B shape + measured on small shapes (CPU, ~1 min)

Before this change, a partly used layer kept sliced *copies* of its weights (q/k/v rows, o columns, gate/up rows,
down columns) for the whole generate, one set per distinct row pattern per layer, and on MHA models an identity K/V
index copied every partial layer's whole K/V cache at every decode step. Now a group keeps only index tensors (int64)
and slices at each call (a transient copy of one layer's slice, freed after the call); K/V are indexed only when a
query head shares a K/V head with a dropped one (GQA), never on MHA.

Analytic (7B, fp16, 32 layers / 16 prefix, 32 heads x 128, MLP 11008, plans from the real sampler on random logits):
  held_before = sum over partial (layer, distinct pattern) of the sliced weight bytes
  held_now    = the index tensors' bytes (q rows, K/V rows, neurons: 8 bytes each)
  kv_copy_per_step_before = for each partial layer: 2 (K, V) x heads x head_dim x context x 2 bytes (MHA identity map)
Measured (small shapes, float32, CPU): generate() on a batch of mixed budgets; every tensor reachable from the
request's DecodeState row groups is summed by kind (KV cache vs everything else), and compared with what the
per-request copies would have held for the same plans.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BUDGETS = [0.6, 0.75, 0.85]


def _slice_bytes(pattern, head_dim, hidden, neuron_sizes, n_rep, elem):
    """Bytes of the sliced copies one partial (layer, pattern) used to hold, and of its index tensors now."""
    heads, groups = pattern[0].bool(), pattern[1].bool()
    n_q = int(heads.sum())
    n_kv = len({int(h) // n_rep for h in heads.nonzero().flatten()})
    n_neurons = sum(s for s, on in zip(neuron_sizes, groups.tolist()) if on)
    copies = (n_q * head_dim * hidden * 2 + n_kv * head_dim * hidden * 2 + 3 * n_neurons * hidden) * elem
    indices = (n_q * head_dim + (n_kv * head_dim if n_q else 0) + n_neurons) * 8 + (8 * n_q if n_kv != n_q else 0)
    return copies, indices, n_q


def analytic_7b(batch_sizes=(1, 8), seed=0):
    import torch

    from adallava.scheduler import sample_head_plan

    L, P, H, d, D, I, elem = 32, 16, 32, 128, 4096, 11008, 2
    r = 8
    units, prefix_units = L * H // r, P * H // r
    sizes = [I // H + (1 if g < I % H else 0) for g in range(H)]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in BUDGETS:
        for batch in batch_sizes:
            logits = torch.randn(batch, L - P, 2, H, generator=g)
            k = torch.full((batch,), int(units * b + 1e-6) - prefix_units)
            plan = sample_head_plan(logits, k, r, 5.0, False, None)
            before = now = 0
            kv_heads_partial = 0
            for layer in range(L - P):
                on = plan[:, layer] > 0.5
                full = on.flatten(1).all(1)
                partial = on.flatten(1).any(1) & ~full
                if not partial.any():
                    continue
                for pattern in torch.unique(on[partial].flatten(1), dim=0):
                    c, i, n_q = _slice_bytes(pattern.view(2, H), d, D, sizes, 1, elem)
                    before, now = before + c, now + i
                kv_heads_partial += int(on[partial][:, 0].sum())
            ctx = 700  # ~576 image + text tokens
            rows.append({"budget": b, "batch": batch, "held_before_GiB": before / 2**30, "held_now_MiB": now / 2**20,
                         "held_before_GiB_per_request": before / batch / 2**30,
                         "kv_copy_per_step_before_MiB": 2 * kv_heads_partial * d * ctx * elem / 2**20,
                         "kv_copy_per_step_now_MiB": 0.0})  # fmt: skip
    return rows


def measured_small(batch_sizes=(1, 3, 8)):
    import torch

    from adallava import modeling
    from adallava.presets import build_tiny

    states = []
    rows = []
    original = modeling.DecodeState

    def recording(*args, **kwargs):  # keep a handle on the request's DecodeState
        states.append(original(*args, **kwargs))
        return states[-1]

    modeling.DecodeState = recording
    try:
        for text_model in ("llama", "mistral"):
            model, _ = build_tiny("head", text_model=text_model, hidden_size=256, intermediate_size=688,
                                  num_attention_heads=8, num_key_value_heads=8 if text_model == "llama" else 2)  # fmt: skip
            cfg = model.config
            layer_bytes = sum(p.numel() * p.element_size() for p in model._layers[0].parameters())
            grid = [x / (cfg.units_per_layer * cfg.num_layers) for x in range(cfg.units_per_layer * cfg.num_prefix_layers,
                                                                                cfg.units_per_layer * cfg.num_layers + 1)]
            for batch in batch_sizes:
                budgets = [grid[1 + (i * 5) % (len(grid) - 2)] for i in range(batch)]  # partial layers, mixed plans
                ids = torch.randint(5, 100, (batch, 24), generator=torch.Generator().manual_seed(batch))
                states.clear()
                out = model.generate(ids, budget=budgets, max_new_tokens=4, return_dict_in_generate=True)
                state = states[-1]
                kv = other = copies_before = 0
                identity_kv_maps = sliced = 0
                d, D = model._layers[0].self_attn.head_dim, cfg.text_config.hidden_size
                sizes = model._neuron_group_sizes
                for i, groups in state.groups.items():
                    for grp in groups:
                        for t in (grp.k, grp.v):
                            kv += 0 if t is None else t.numel() * t.element_size()
                        w = grp.weights
                        for t in (w.kv_map, w.q_rows, w.kv_rows, w.neurons, grp.rows):
                            other += 0 if t is None else t.numel() * t.element_size()
                        if w.q_rows is not None or (w.neurons is not None):
                            sliced += 1
                            heads = torch.zeros(cfg.num_switches)
                            heads[(w.q_rows[::d] // d) if w.q_rows is not None else []] = 1
                            groups_on = torch.zeros(cfg.num_switches)
                            if w.neurons is not None:
                                idx = model._neuron_group_index("cpu")[w.neurons].unique()
                                groups_on[idx] = 1
                            c, _, _ = _slice_bytes(torch.stack([heads, groups_on]), d, D, sizes, model._n_rep, 4)
                            copies_before += c
                            if w.kv_map is not None and torch.equal(w.kv_map, torch.arange(len(w.kv_map))):
                                identity_kv_maps += 1
                rows.append({"text_model": text_model, "batch": batch, "budgets": budgets,
                             "sliced_groups": sliced, "held_now_bytes": other, "kv_cache_bytes": kv,
                             "held_before_bytes": copies_before, "held_before_layers": copies_before / layer_bytes,
                             "identity_kv_maps": identity_kv_maps,
                             "tokens": out.sequences[:, -4:].tolist()})  # fmt: skip
    finally:
        modeling.DecodeState = original
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS / "h_memory.json"))
    args = p.parse_args(argv)
    load_start = os.getloadavg()
    results = {"machine": platform.processor() or platform.machine(), "load_average_start": load_start,
               "analytic_7b_fp16": analytic_7b(), "measured_small_fp32": measured_small(),
               "load_average_end": os.getloadavg()}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("7B fp16 (analytic): budget batch | held before (GiB, per request) | held now (MiB, whole batch) | "
          "K/V copied per decode step before -> now (MiB)")
    for r in results["analytic_7b_fp16"]:
        print(f"  {r['budget']:.2f} {r['batch']:>5} | {r['held_before_GiB_per_request']:8.2f} | {r['held_now_MiB']:8.2f} | "
              f"{r['kv_copy_per_step_before_MiB']:8.1f} -> {r['kv_copy_per_step_now_MiB']:.0f}")
    print("small shapes (measured, fp32): model batch | sliced groups | held now (bytes) | held before (bytes, layers' "
          "worth) | KV cache (bytes) | identity K/V maps")
    for r in results["measured_small_fp32"]:
        print(f"  {r['text_model']:>7} {r['batch']:>3} | {r['sliced_groups']:>4} | {r['held_now_bytes']:>9} | "
              f"{r['held_before_bytes']:>10} ({r['held_before_layers']:.2f}) | {r['kv_cache_bytes']:>9} | "
              f"{r['identity_kv_maps']}")
    print(f"load average: start {load_start}, end {results['load_average_end']}; wrote {args.out}")


if __name__ == "__main__":
    main()
