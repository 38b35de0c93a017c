"""Continuous batching (adallava.engine) against static batches (generate() on a batch that runs to its longest member),
at the model level (no Ray, no HTTP: what the Serve replica's loop runs), with mixed max_tokens and mixed budgets.

    python -m bench.bench_serve_batching                 # tiny preset (what serve/configs/tiny.yaml serves), ~3 min
    python -m bench.bench_serve_batching --requests 24 --rate 0   # only the burst

Workload: `--requests` requests; every `--long-every`-th one asks for `--long` tokens, the others `--short`; budgets
cycle through the model's grid (each request its own plan); EOS is off so every request runs to its max_tokens. Two
arrival patterns: a burst (all at t = 0) and open-loop Poisson arrivals at `--rate` requests/s (0: skip), each
request's latency timed from its scheduled arrival. Both servers run the same single loop: static takes up to
`--batch` arrived requests and runs them to the longest; continuous admits arrived requests into free rows at every
decode step. Reports throughput (generated tokens/s over the makespan), latency p50/p95 over all requests and over
the short ones, and the load average beside each figure (this machine is shared: read ratios, not absolutes).
Writes bench/results/serve_batching.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))] if v else float("nan")


def workload(processor, grid, args):
    from PIL import Image

    rng = random.Random(args.seed)
    img = Image.new("RGB", (64, 64), (128, 64, 32))
    reqs = []
    for i in range(args.requests):
        q = ["What is in the image?", "Describe the picture.", "What colour is it?"][i % 3]
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
        n = args.long if i % args.long_every == 0 else args.short
        reqs.append({"id": f"r{i}", "prompt": prompt, "image": img, "max_tokens": n, "budget": grid[i % len(grid)]})
    t = 0.0
    for r in reqs:
        r["arrival"] = t
        if args.rate > 0:
            t += rng.expovariate(args.rate)
    return reqs


def run_static(model, processor, reqs, batch, burst):
    import torch

    pending = sorted(reqs, key=lambda r: r["arrival"])
    done, t0 = {}, time.perf_counter()
    while pending:
        now = time.perf_counter() - t0
        ready = [r for r in pending if burst or r["arrival"] <= now]
        if not ready:
            time.sleep(max(0.0, pending[0]["arrival"] - now))
            continue
        group = ready[:batch]
        for r in group:
            pending.remove(r)
        enc = processor(images=[r["image"] for r in group], text=[r["prompt"] for r in group], return_tensors="pt",
                        padding=True)  # fmt: skip
        with torch.inference_mode():
            model.generate(**enc, budget=[r["budget"] for r in group], max_new_tokens=max(r["max_tokens"] for r in group),
                           eos_token_id=-1)  # fmt: skip
        end = time.perf_counter() - t0
        for r in group:  # the whole batch answers when its longest row is done
            done[r["id"]] = end - (0.0 if burst else r["arrival"])
    return done, time.perf_counter() - t0


def run_continuous(model, processor, reqs, batch, burst):
    import torch

    from adallava.engine import Engine, Request

    engine = Engine(model, max_batch_size=batch, eos_token_id=-1)
    pending = sorted(reqs, key=lambda r: r["arrival"])
    done, t0 = {}, time.perf_counter()
    with torch.inference_mode():
        while pending or engine.has_work:
            now = time.perf_counter() - t0
            while pending and (burst or pending[0]["arrival"] <= now):
                r = pending.pop(0)
                enc = processor(images=[r["image"]], text=[r["prompt"]], return_tensors="pt")
                engine.add(Request(r["id"], enc["input_ids"], pixel_values=enc["pixel_values"], budget=r["budget"],
                                   max_new_tokens=r["max_tokens"]))  # fmt: skip
            if not engine.has_work:
                time.sleep(max(0.0, pending[0]["arrival"] - now))
                continue
            for ev in engine.step():
                if ev.finished is not None:
                    arrival = next(r["arrival"] for r in reqs if r["id"] == ev.request_id)
                    done[ev.request_id] = time.perf_counter() - t0 - (0.0 if burst else arrival)
    return done, time.perf_counter() - t0


def summarise(name, pattern, reqs, done, makespan, load_before):
    tokens = sum(r["max_tokens"] for r in reqs)
    short = [done[r["id"]] * 1000 for r in reqs if r["max_tokens"] != max(x["max_tokens"] for x in reqs)]
    lat = [done[r["id"]] * 1000 for r in reqs]
    return {"server": name, "arrivals": pattern, "requests": len(reqs), "tokens": tokens,
            "makespan_s": round(makespan, 3), "tokens_per_s": round(tokens / makespan, 2),
            "requests_per_s": round(len(reqs) / makespan, 3), "p50_ms": round(pct(lat, 0.5), 1),
            "p95_ms": round(pct(lat, 0.95), 1), "short_p50_ms": round(pct(short, 0.5), 1),
            "short_p95_ms": round(pct(short, 0.95), 1), "load_average_before": load_before,
            "load_average_after": os.getloadavg()}  # fmt: skip


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['server']}\n{r['arrivals']}" for r in rows]
    axes[0].bar(labels, [r["tokens_per_s"] for r in rows], color=["#888" if r["server"] == "static" else "#2a7"
                                                                   for r in rows])  # fmt: skip
    axes[0].set_ylabel("generated tokens / s")
    x = range(len(rows))
    axes[1].bar([i - 0.2 for i in x], [r["p50_ms"] for r in rows], width=0.4, label="p50")
    axes[1].bar([i + 0.2 for i in x], [r["p95_ms"] for r in rows], width=0.4, label="p95")
    axes[1].set_xticks(list(x), labels)
    axes[1].set_ylabel("latency ms (all requests)")
    axes[1].legend()
    fig.suptitle(f"continuous vs static batching, {results['model']}, batch {results['batch']}, "
                 f"max_tokens {results['short']} / {results['long']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=96)
    ap.add_argument("--long-every", type=int, default=4)
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second (0: burst only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "serve_batching.json"))
    args = ap.parse_args(argv)

    import torch

    from adallava.budget import budget_grid
    from adallava.presets import load

    torch.set_num_threads(args.threads)
    model, processor = load(args.model, seed=0) if args.model == "tiny" else load(args.model)
    model.eval()
    grid = [b for b in budget_grid(model.config) if b >= 0.5]
    reqs = workload(processor, grid, args)
    patterns = [("burst", True)] + ([(f"poisson {args.rate:g}/s", False)] if args.rate > 0 else [])
    # warm-up both paths once
    run_static(model, processor, reqs[:2], 2, True)
    run_continuous(model, processor, reqs[:2], 2, True)
    results = {"benchmark": "serve_batching", "command": "python -m bench.bench_serve_batching " + " ".join(argv or []),
               "model": args.model, "batch": args.batch, "short": args.short, "long": args.long,
               "long_every": args.long_every, "rate": args.rate, "requests": args.requests, "threads": args.threads,
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
               "level": "model (adallava.engine vs generate(); no Ray, no HTTP)", "runs": []}  # fmt: skip
    for pattern, burst in patterns:
        for name, fn in (("static", run_static), ("continuous", run_continuous)):
            load_before = os.getloadavg()
            done, makespan = fn(model, processor, reqs, args.batch, burst)
            results["runs"].append(summarise(name, pattern, reqs if burst else reqs, done, makespan, load_before))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"| server | arrivals | tokens/s | req/s | p50 ms | p95 ms | short p50 ms | short p95 ms | load avg (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['server']} | {r['arrivals']} | {r['tokens_per_s']} | {r['requests_per_s']} | {r['p50_ms']} | "
              f"{r['p95_ms']} | {r['short_p50_ms']} | {r['short_p95_ms']} | {r['load_average_before'][0]:.1f} |")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
