"""Does compute (wall-clock) really fall with the budget?  Prefill and decode latency per budget, scheduler overhead,
and mixed-budget batching, on a model shaped like a real LLaVA scaled to this machine.

    python -m bench.bench_budget_latency                 # CPU, ~8 min on 2 cores; writes bench/results/budget_latency.{json,png}
    python -m bench.bench_budget_latency --quick         # small shapes, a smoke run
    python -m bench.bench_budget_latency --device cuda --shape 7b --dtype float16   # on a GPU machine

Shapes: `cpu` = 32 layers, hidden 512, 8 heads, MLP 1376, vocab 32000, CLIP 336 px / patch 14 (576 image tokens)
+ 64 text tokens; `7b` = Vicuna-7B's language model (32 layers, hidden 4096, 32 heads, MLP 11008) with CLIP-L/14-336.
Random weights: latency does not depend on the values. Timings are the best of --repeats round-robin runs. Targets (issue 2): language-model prefill ratio <= b + 0.03
at every budget, scheduler + encoder overhead <= 0.5% of a full prefill, a mixed-budget batch of 8 x 32 tokens at
least 2x the throughput of the same 8 requests one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

BUDGETS = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
RESULTS = Path(__file__).parent / "results"


def build(shape: str, granularity: str, dtype, device):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig

    from adallava.config import AdaLlavaConfig
    from adallava.modeling import AdaLlavaForConditionalGeneration

    if shape == "7b":
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064)  # fmt: skip
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=336, patch_size=14)  # fmt: skip
    elif shape == "cpu":
        text = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=32, num_attention_heads=8,
                           num_key_value_heads=8, vocab_size=32000)  # fmt: skip
        vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                                  image_size=336, patch_size=14)  # fmt: skip
    else:  # quick
        text = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=16, num_attention_heads=8,
                           num_key_value_heads=8, vocab_size=8000)  # fmt: skip
        vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=112, patch_size=14)  # fmt: skip
    n_image = (vision.image_size // vision.patch_size) ** 2
    config = AdaLlavaConfig(vision_config=vision, text_config=text, image_token_index=text.vocab_size - 1,
                            image_seq_length=n_image, granularity=granularity)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = AdaLlavaForConditionalGeneration(config)
    return model.to(dtype).eval(), n_image


def make_inputs(model, n_image, n_text, batch, device):
    import torch

    cfg = model.config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, cfg.text_config.vocab_size - 2, (batch, n_text + n_image), generator=g)
    ids[:, 8 : 8 + n_image] = cfg.image_token_id  # 8 text tokens, the image, then the question
    size = cfg.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device, model.dtype)}


def timed(fn, repeats, sync, warmup=False):
    """Median wall-clock seconds of fn() over `repeats` runs (after a warm-up run if asked)."""
    if warmup:
        fn()
        sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_granularity(shape, granularity, dtype, device, repeats, decode_tokens, batch_size):
    import torch

    from adallava import budget as budget_mod

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model, n_image = build(shape, granularity, dtype, device)
    cfg = model.config
    n_text = 64 if shape != "quick" else 32
    inputs = make_inputs(model, n_image, n_text, 1, device)
    out = {"granularity": granularity, "prompt_tokens": n_image + n_text + 1, "budgets": {}}
    with torch.no_grad():
        embeds = model.embed_inputs(inputs["input_ids"], inputs["pixel_values"])
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)

        def lm_prefill(b):
            budget = torch.tensor([b], dtype=torch.float64)
            h, m, _, pos = model.insert_latency_token(embeds, mask, None, model.latency_token(budget))
            return model.decode(h, m.bool(), (m.cumsum(-1) - 1), budget, pos)

        # Round-robin over budgets, best of `repeats`: other processes on a shared machine slow single runs by
        # several times; interleaving exposes every budget to the same interference and the minimum discards it.
        lm_prefill(1.0)
        model.generate(**inputs, budget=1.0, max_new_tokens=2)
        lm_t = {b: [] for b in BUDGETS}
        e2e_t = {b: [] for b in BUDGETS}
        dec_t = {b: [] for b in BUDGETS}
        flops = {}
        for _ in range(repeats):
            for b in BUDGETS:
                lm_t[b].append(timed(lambda: lm_prefill(b), 1, sync))
                e2e_t[b].append(timed(lambda: model.generate(**inputs, budget=b, max_new_tokens=1), 1, sync))
                gen = model.generate(**inputs, budget=b, max_new_tokens=decode_tokens, eos_token_id=-1,
                                     return_dict_in_generate=True)  # fmt: skip
                dec_t[b].append(gen.timings["decode_s"] / (decode_tokens - 1))
                flops[b] = float(gen.flops[0])
        for b in BUDGETS:
            k = int(budget_mod.units_for_budget(torch.tensor([b]), cfg))
            executed = (cfg.num_prefix_layers * cfg.units_per_layer + k) / (cfg.num_layers * cfg.units_per_layer)
            out["budgets"][str(b)] = {
                "executed_fraction": executed, "lm_prefill_s": min(lm_t[b]), "e2e_prefill_s": min(e2e_t[b]),
                "decode_s_per_token": min(dec_t[b]), "flops": flops[b],
                "lm_prefill_s_all": lm_t[b], "e2e_prefill_s_all": e2e_t[b], "decode_s_per_token_all": dec_t[b],
            }  # fmt: skip
        full = out["budgets"]["1.0"]
        for row in out["budgets"].values():
            row["lm_prefill_ratio"] = row["lm_prefill_s"] / full["lm_prefill_s"]
            row["e2e_prefill_ratio"] = row["e2e_prefill_s"] / full["e2e_prefill_s"]
            row["decode_ratio"] = row["decode_s_per_token"] / full["decode_s_per_token"]

        # scheduler + latency encoder, once per request: encode the budget, read the token, sample the plan
        hidden = torch.randn(1, cfg.text_config.hidden_size, device=device, dtype=model.dtype)
        k = torch.tensor([cfg.units_per_layer * cfg.num_schedulable_layers // 2])

        def overhead():
            model.latency_token(torch.tensor([0.75], dtype=torch.float64))
            model.scheduler(hidden, k, group_size=cfg.group_size, tau=cfg.gumbel_tau, stochastic=False)

        t_over = min(timed(overhead, 1, sync, warmup=True) for _ in range(repeats * 10))
        out["overhead_s"] = t_over
        out["overhead_fraction_of_full_prefill"] = t_over / full["lm_prefill_s"]

        # mixed budgets: 8 requests (one budget each, spread over the range) together vs one by one
        grid = budget_mod.budget_grid(cfg)
        mixed = [grid[round(i * (len(grid) - 1) / (batch_size - 1))] for i in range(batch_size)]
        batch = make_inputs(model, n_image, n_text, batch_size, device)
        kw = dict(max_new_tokens=decode_tokens, eos_token_id=-1, return_dict_in_generate=True)
        # the better of two runs of each (batched, and the 8 one by one), same reason as above
        together = min((model.generate(**batch, budget=mixed, **kw) for _ in range(2)),
                       key=lambda o: o.timings["total_s"])  # fmt: skip
        alone = [min((model.generate(**{k_: v[i : i + 1] for k_, v in batch.items()}, budget=mixed[i], **kw)
                      for _ in range(2)), key=lambda o: o.timings["total_s"])
                 for i in range(batch_size)]  # fmt: skip
        same = all(torch.equal(a.sequences[0], together.sequences[i]) for i, a in enumerate(alone))
        tokens = batch_size * decode_tokens
        t_batch = together.timings["total_s"]
        t_alone = sum(a.timings["total_s"] for a in alone)
        out["mixed_batch"] = {
            "budgets": mixed, "requests": batch_size, "new_tokens_each": decode_tokens, "same_tokens_as_alone": same,
            "batched": {"prefill_s": together.timings["prefill_s"], "decode_s": together.timings["decode_s"],
                        "tokens_per_s": tokens / t_batch},
            "one_by_one": {"prefill_s": sum(a.timings["prefill_s"] for a in alone),
                           "decode_s": sum(a.timings["decode_s"] for a in alone), "tokens_per_s": tokens / t_alone},
            "throughput_ratio": t_alone / t_batch,
            "prefill_speedup": sum(a.timings["prefill_s"] for a in alone) / together.timings["prefill_s"],
            "decode_speedup": sum(a.timings["decode_s"] for a in alone) / together.timings["decode_s"],
        }  # fmt: skip
    return out


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results["runs"]:
        bs = [float(b) for b in r["budgets"]]
        rows = list(r["budgets"].values())
        axes[0].plot(bs, [x["lm_prefill_ratio"] for x in rows], "o-", label=f"{r['granularity']}: LM prefill")
        axes[0].plot(bs, [x["e2e_prefill_ratio"] for x in rows], "s--", label=f"{r['granularity']}: end-to-end prefill")
        axes[1].plot(bs, [x["decode_ratio"] for x in rows], "o-", label=f"{r['granularity']}: decode / token")
    for ax, title in zip(axes, ["prefill latency / full-budget prefill", "decode latency / full-budget decode"]):
        ax.plot([0.5, 1.0], [0.5, 1.0], "k:", label="ratio = budget")
        ax.set_xlabel("budget")
        ax.set_ylabel("latency ratio")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"adallava: latency vs budget ({results['shape']} shape, {results['device_name']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["cpu", "7b", "quick"], default="cpu")
    p.add_argument("--quick", action="store_true", help="same as --shape quick with fewer repeats")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--granularity", choices=["layer", "head", "both"], default="both")
    p.add_argument("--out", default=None, help="output stem (default bench/results/budget_latency[_<shape>_<device>])")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.repeats, args.decode_tokens = "quick", 1, 8
    import torch

    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    results = {"shape": args.shape, "device": args.device, "device_name": device_name, "dtype": args.dtype,
               "torch_threads": torch.get_num_threads(), "load_average_start": os.getloadavg(), "runs": []}  # fmt: skip
    grans = ["layer", "head"] if args.granularity == "both" else [args.granularity]
    for g in grans:
        print(f"[bench] {g} granularity ...", flush=True)
        results["runs"].append(run_granularity(args.shape, g, dtype, args.device, args.repeats, args.decode_tokens, 8))
    results["load_average_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    stem = args.out or str(RESULTS / ("budget_latency" if (args.shape, args.device) == ("cpu", "cpu")
                                      else f"budget_latency_{args.shape}_{args.device}"))  # fmt: skip
    Path(stem + ".json").write_text(json.dumps(results, indent=2))
    plot(results, stem + ".png")
    for r in results["runs"]:
        print(f"\n{r['granularity']} granularity, prompt {r['prompt_tokens']} tokens ({args.shape} shape, "
              f"{args.device} {args.dtype}):")  # fmt: skip
        print(f"{'budget':>6} {'ran':>6} {'LM prefill ms':>13} {'ratio':>6} {'e2e prefill ms':>14} {'ratio':>6} "
              f"{'decode ms/tok':>13} {'ratio':>6} {'GFLOPs':>8}")  # fmt: skip
        for b, x in r["budgets"].items():
            print(f"{float(b):>6.2f} {x['executed_fraction']:>6.3f} {x['lm_prefill_s'] * 1e3:>13.1f} "
                  f"{x['lm_prefill_ratio']:>6.3f} {x['e2e_prefill_s'] * 1e3:>14.1f} {x['e2e_prefill_ratio']:>6.3f} "
                  f"{x['decode_s_per_token'] * 1e3:>13.2f} {x['decode_ratio']:>6.3f} {x['flops'] / 1e9:>8.1f}")  # fmt: skip
        print(f"scheduler + encoder overhead: {r['overhead_s'] * 1e3:.3f} ms = "
              f"{100 * r['overhead_fraction_of_full_prefill']:.3f}% of a full LM prefill")  # fmt: skip
        m = r["mixed_batch"]
        print(f"mixed batch of {m['requests']} x {m['new_tokens_each']} tokens: {m['batched']['tokens_per_s']:.1f} "
              f"tok/s vs {m['one_by_one']['tokens_per_s']:.1f} one by one = {m['throughput_ratio']:.2f}x "
              f"(prefill {m['prefill_speedup']:.2f}x, decode {m['decode_speedup']:.2f}x); "
              f"same tokens as alone: {m['same_tokens_as_alone']}")  # fmt: skip
    print(f"load average (1/5/15 min) at start {results['load_average_start']}, at end {results['load_average_end']}")
    print(f"\nwrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
