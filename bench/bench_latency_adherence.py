"""Budgets in milliseconds: profile the model on this device, then ask for prefill latency targets across its range
and measure what each request really took.

    python -m bench.bench_latency_adherence            # CPU-shaped LLaVA (32 layers, 576 image + 64 text tokens)
    python -m bench.bench_latency_adherence --quick    # small shapes, a smoke run
    python -m bench.bench_latency_adherence --device cuda --shape 7b --dtype float16

Targets (issue 4): measured prefill above the target (a violation) for under 5% of requests; the budget chosen
within one plan step of the best budget that would have met the target (the largest whose measured median prefill
is under it). Writes bench/results/latency_adherence[_<shape>_<device>].{json,png}, prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.bench_budget_latency import RESULTS, build, make_inputs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["cpu", "7b", "quick"], default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--granularity", choices=["layer", "head"], default="layer")
    p.add_argument("--targets", type=int, default=12, help="latency targets spread over the model's range")
    p.add_argument("--requests", type=int, default=5, help="requests per target")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.targets, args.requests = "quick", 6, 3
    import torch

    from adallava import budget as budget_mod
    from adallava import cost

    model, n_image = build(args.shape, args.granularity, getattr(torch, args.dtype), args.device)
    n_text = 64 if args.shape != "quick" else 32
    inputs = make_inputs(model, n_image, n_text, 1, args.device)
    seq = n_image + n_text + 1
    print(f"[bench] profiling {cost.model_signature(model.config)} ...", flush=True)
    table = cost.profile_latency(model, seq_lens=(seq // 4, seq // 2, seq, 2 * seq), repeats=5)
    model.cost_table = table

    def prefill_ms(**kw):
        return model.generate(**inputs, max_new_tokens=1, return_dict_in_generate=True, **kw).timings["prefill_s"] * 1e3

    # measured prefill per budget on the grid: what "the best budget that meets a target" is judged against
    grid = budget_mod.budget_grid(model.config)
    if len(grid) > 17:
        grid = grid[:: len(grid) // 16] + ([1.0] if grid[-1] != 1.0 else [])
    prefill_ms(budget=1.0)
    measured = {b: statistics.median(prefill_ms(budget=b) for _ in range(args.requests)) for b in grid}
    predicted = {b: cost.predict_prefill_ms(table, b, seq, 1) for b in grid}
    lo, hi = min(measured.values()), max(measured.values())
    targets = [lo * 0.98 + (hi * 1.1 - lo * 0.98) * i / (args.targets - 1) for i in range(args.targets)]
    step = 1 / (model.config.units_per_layer * model.config.num_layers)
    rows, violations, total, off_by_more = [], 0, 0, 0
    for t in targets:
        try:
            chosen = float(model.budget_for_latency(t, inputs["input_ids"], torch.ones_like(inputs["input_ids"]))[0])
        except ValueError:
            rows.append({"target_ms": t, "chosen": None, "best": None, "measured_ms": [], "violations": 0})
            continue
        runs = [prefill_ms(latency_ms=t) for _ in range(args.requests)]
        fits = [b for b, m in measured.items() if m <= t]
        best = max(fits) if fits else None
        v = sum(m > t for m in runs)
        violations += v
        total += len(runs)
        gap = None if best is None else round((best - chosen) / step)
        off_by_more += int(gap is not None and abs(gap) > 1)
        rows.append({"target_ms": t, "chosen": chosen, "best": best, "steps_from_best": gap, "measured_ms": runs,
                     "violations": v})  # fmt: skip
    result = {
        "shape": args.shape, "device": table["device"], "dtype": args.dtype, "granularity": args.granularity,
        "prompt_tokens": seq, "cost_table": table, "measured_prefill_ms_by_budget": measured,
        "predicted_prefill_ms_by_budget": predicted, "targets": rows,
        "violation_rate": violations / max(total, 1), "targets_more_than_one_step_from_best": off_by_more,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / ("latency_adherence" if (args.shape, args.device) == ("cpu", "cpu")
                      else f"latency_adherence_{args.shape}_{args.device}")  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    axes[0].plot(list(measured), list(measured.values()), "o-", label="measured (median)")
    axes[0].plot(list(predicted), list(predicted.values()), "s--", label="predicted from cost table")
    axes[0].set(xlabel="budget", ylabel="prefill ms", title="prefill latency per budget")
    for r in rows:
        if r["measured_ms"]:
            axes[1].scatter([r["target_ms"]] * len(r["measured_ms"]), r["measured_ms"], s=12, c="tab:blue")
    axes[1].plot([targets[0], targets[-1]], [targets[0], targets[-1]], "k:", label="measured = target")
    axes[1].set(xlabel="target prefill ms", ylabel="measured prefill ms", title="latency_ms adherence")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"adallava latency targets ({args.shape} shape, {table['device']})")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)

    print(f"\n{'target ms':>9} {'budget':>7} {'best':>6} {'steps off':>9} {'median ms':>9} {'violations':>10}")
    for r in rows:
        if r["chosen"] is None:
            print(f"{r['target_ms']:>9.1f}  unattainable (below the smallest budget's latency): ValueError")
            continue
        best = "-" if r["best"] is None else f"{r['best']:.3f}"
        print(f"{r['target_ms']:>9.1f} {r['chosen']:>7.3f} {best:>6} {str(r['steps_from_best']):>9} "
              f"{statistics.median(r['measured_ms']):>9.1f} {r['violations']:>5}/{len(r['measured_ms'])}")  # fmt: skip
    print(f"violation rate: {100 * result['violation_rate']:.1f}% of {total} requests (target < 5%); "
          f"targets more than one step from the best budget: {off_by_more} of {len(rows)}")  # fmt: skip
    print(f"wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
