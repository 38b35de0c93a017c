"""First evidence on a real pretrained network: SmolLM2-135M-Instruct (the `smol` preset) under reduced budgets.

    python -m bench.bench_smol                      # ~15 min on 2 busy cores (load ~10); writes bench/results/smol.{json,png}
    python -m bench.bench_smol train_steps=5 eval_chunks=4 latency_reps=1 out=smol_quick   # smoke run, ~3 min

Text only (the language model, no image). Held-out text: Python's own reference documentation, which ships inside the
standard library (pydoc_data.topics: 79 topics of English prose with some code); topics are split into a training
set and a disjoint evaluation set (every 4th topic, sorted by name). Each evaluation chunk is `ctx` tokens of context
(not scored) and `cont` tokens of continuation (scored); the latency token sits between them, where AdaLLaVA puts it
(after the prompt, before the answer), so the scheduler sees the context.

Perplexity of the continuation at budgets 0.5, 0.6, ..., 1.0 (k = 0, 3, ..., 15 of the 15 schedulable layers) under
  (a) early exit: the first k schedulable layers run (layers 15 .. 15+k-1), the rest are skipped;
  (b) random skipping: k schedulable layers drawn at random (one draw per seed for all chunks), mean over seeds;
  (c) AdaLLaVA: the scheduler picks k layers per chunk from the latency token's hidden state, after a short training
      run (below);
  (d) the full model (budget 1.0), and SmolLM2 alone (no latency token) as the reference.
All four share the same latency encoder (the trained one), so the plans are the only difference between them.

Training (c): a plain torch loop, model.train(), budget=None (one random budget per sample, Gumbel-sampled plans,
masked layers, the paper's recipe), LM loss on the continuation of training-split chunks. The language model is
frozen; only the scheduler and the latency encoder learn. Why: a few dozen steps on 2 CPU cores cannot fine-tune 135 M
parameters usefully, and a frozen LM keeps the comparison clean: every method then runs the same weights, and only
which layers run differs.

Latency: generate() at each budget (the scheduler's plan) on a ~256-token prompt: prefill seconds and decode ms/token
from generate's own timings, median of `latency_reps`. The machine is shared, so the load average is recorded.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from adallava import perplexity as _ppl
from adallava.perplexity import batches, text_chunks  # noqa: F401  (the benchmark's held-out text)

RESULTS = Path(__file__).parent / "results"
BUDGETS = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


@dataclass
class BenchConfig:
    ctx: int = 48  # context tokens per chunk (not scored; the scheduler reads them through the latency token)
    cont: int = 48  # continuation tokens per chunk (scored)
    eval_chunks: int = 12  # held-out chunks (12 x 48 = 576 scored tokens; all methods score the same tokens)
    eval_batch: int = 12
    random_seeds: int = 2  # random-skipping draws per budget
    train_steps: int = 60
    train_batch: int = 2  # small batches, more steps: what the scheduler learns first is a ranking of layers
    train_ctx: int = 32  # shorter training chunks: a step costs a full forward and a backward through 30 layers
    train_cont: int = 32
    lr: float = 3e-3
    max_train_s: float = 360.0  # stop training early on a slow machine (the steps done are reported)
    latency_prompt: int = 256
    latency_new_tokens: int = 16
    latency_reps: int = 5
    latency_only: int = 0  # 1: re-measure latency only, into the existing <out>.json (the perplexity part is kept)
    seed: int = 0
    cache_dir: str = ""  # "" -> ~/.cache/adallava/smol
    out: str = "smol"


def parse(argv) -> BenchConfig:
    cfg, kinds = BenchConfig(), {f.name: f.type for f in fields(BenchConfig)}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in kinds:
            raise SystemExit(f"bad argument {arg!r}: expected key=value with key in {sorted(kinds)}")
        cast = {"int": int, "float": float, "str": str}[kinds[key]]
        try:
            setattr(cfg, key, cast(value))
        except ValueError:
            raise SystemExit(f"bad value for {key}: {value!r} is not a {kinds[key]}") from None
    return cfg


# ------------------------------------------------------------------------------------------------------------ eval
# The held-out text and the perplexity helpers live in adallava.perplexity (pipelines.evaluate uses them too).


def nll(model, chunks, cfg, budget, plan_fn=None):
    return _ppl.nll(model, chunks, cfg.ctx, cfg.eval_batch, budget, plan_fn)


def nll_plain(model, chunks, cfg):
    return _ppl.nll_plain(model, chunks, cfg.ctx, cfg.eval_batch)


def layer_plan(model, batch, layers):
    return _ppl.layer_plan(model.config, batch, layers)


def k_for(model, budget):
    return _ppl.k_for(model.config, budget)


# ------------------------------------------------------------------------------------------------------------ train


def train_scheduler(model, chunks, cfg):
    import torch
    from tqdm import tqdm

    trainable = [p for n, p in model.named_parameters() if n.startswith(("scheduler.", "latency_encoder."))]
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(("scheduler.", "latency_encoder.")))
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(chunks), generator=gen).tolist()
    model.train()
    losses, t0, step = [], time.perf_counter(), 0
    bar = tqdm(range(cfg.train_steps), desc="train scheduler", file=sys.stderr)
    for step in bar:
        idx = [order[(step * cfg.train_batch + j) % len(order)] for j in range(cfg.train_batch)]
        ids = torch.tensor([chunks[i] for i in idx])
        labels = ids.clone()
        labels[:, : cfg.train_ctx] = -100
        out = model(input_ids=ids, labels=labels)  # budget=None in train(): one random budget per sample
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if time.perf_counter() - t0 > cfg.max_train_s:
            break
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"steps": len(losses), "seconds": time.perf_counter() - t0, "losses": losses}


# ------------------------------------------------------------------------------------------------------------ latency


def latency(model, tokenizer, cfg):
    """Prefill ms and decode ms/token per budget. The machine is shared: other processes' bursts inflate single
    measurements several-fold, so repetitions go round-robin over the budgets (a burst hits all budgets alike) and
    the minimum (the least-disturbed run) is the headline number, with the median beside it."""
    import torch
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics)[1::4])
    ids = tokenizer(text, add_special_tokens=False).input_ids[: cfg.latency_prompt]
    ids = torch.tensor([ids])
    model.generate(input_ids=ids[:, :32], budget=1.0, max_new_tokens=2)  # warm-up
    pre, dec, ran = {b: [] for b in BUDGETS}, {b: [] for b in BUDGETS}, {}
    for _ in range(cfg.latency_reps):
        for b in BUDGETS:
            out = model.generate(input_ids=ids, budget=b, max_new_tokens=cfg.latency_new_tokens, eos_token_id=[],
                                 return_dict_in_generate=True)  # fmt: skip
            n = int(out.num_generated[0])
            pre[b].append(1e3 * out.timings["prefill_s"])
            dec[b].append(1e3 * out.timings["decode_s"] / max(n - 1, 1))  # n tokens: n-1 decode forwards
            ran[b] = float(out.execution_plan.sum())
    return [{"budget": b, "prefill_ms": min(pre[b]), "prefill_ms_median": statistics.median(pre[b]),
             "decode_ms_per_token": min(dec[b]), "decode_ms_per_token_median": statistics.median(dec[b]),
             "layers_run": ran[b], "reps": cfg.latency_reps} for b in BUDGETS]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ main


def main(argv=None):
    cfg = parse(sys.argv[1:] if argv is None else argv)
    import math

    import torch
    from tqdm import tqdm

    from adallava.smol import build_smol

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    if cfg.latency_only:
        path = RESULTS / f"{cfg.out}.json"
        results = json.loads(path.read_text())
        model, processor = build_smol(cache_dir=cfg.cache_dir or None, seed=cfg.seed)
        results["latency"] = latency(model, processor.tokenizer, cfg)
        results["latency_machine"] = {"loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                                      "wall_s": time.perf_counter() - t_start}  # fmt: skip
        path.write_text(json.dumps(results, indent=1))
        print_table(results)
        plot(results, RESULTS / f"{cfg.out}.png")
        return
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model, processor = build_smol(cache_dir=cfg.cache_dir or None, seed=cfg.seed)
    build_s = time.perf_counter() - t0
    tok = processor.tokenizer
    eval_chunks = text_chunks(tok, cfg.ctx, cfg.cont, "eval")[: cfg.eval_chunks]
    train_chunks = text_chunks(tok, cfg.train_ctx, cfg.train_cont, "train")
    S = model.config.num_schedulable_layers
    ppl = lambda r: math.exp(r[0] / r[1])  # noqa: E731

    results = {"config": asdict(cfg), "build_s": build_s, "eval_tokens_scored": None}
    r = nll_plain(model, eval_chunks, cfg)
    results["eval_tokens_scored"] = r[1]
    results["smollm2_ppl"] = ppl(r)
    results["full_ppl_untrained_latency_encoder"] = ppl(nll(model, eval_chunks, cfg, 1.0))
    print(f"SmolLM2 alone: ppl {results['smollm2_ppl']:.2f}; full model with an untrained latency token: "
          f"{results['full_ppl_untrained_latency_encoder']:.2f}", flush=True)  # fmt: skip

    results["train"] = train_scheduler(model, train_chunks, cfg)
    print(f"trained {results['train']['steps']} steps in {results['train']['seconds']:.0f} s; loss "
          f"{results['train']['losses'][0]:.3f} -> {statistics.mean(results['train']['losses'][-5:]):.3f} (last 5)",
          flush=True)  # fmt: skip

    rows, same = [], {}
    jobs = [(b, m) for b in BUDGETS for m in ("early_exit", "random", "adallava")]
    for b, method in tqdm(jobs, desc="evaluate", file=sys.stderr):
        k = k_for(model, b)
        if k in (0, S):  # no layer or every layer: all methods run the same plan, evaluate it once
            if k not in same:
                same[k] = [nll(model, eval_chunks, cfg, b, lambda B: layer_plan(model, B, range(k)))]
            res = same[k]
        elif method == "early_exit":
            res = [nll(model, eval_chunks, cfg, b, lambda B: layer_plan(model, B, range(k)))]
        elif method == "random":
            draws = [torch.randperm(S, generator=torch.Generator().manual_seed(cfg.seed + s))[:k].tolist()
                     for s in range(cfg.random_seeds)]  # fmt: skip
            res = [nll(model, eval_chunks, cfg, b, lambda B, d=d: layer_plan(model, B, d)) for d in draws]
        else:
            res = [nll(model, eval_chunks, cfg, b)]
        values = [ppl(x) for x in res]
        rows.append({"budget": b, "k": k, "method": method, "ppl": statistics.mean(values), "ppl_min": min(values),
                     "ppl_max": max(values)})  # fmt: skip
    # which layers the trained scheduler keeps (first eval chunk; the plan depends on the context)
    with torch.no_grad():
        ids, labels = next(batches(eval_chunks, cfg.ctx, cfg.eval_batch))
        picks = {}
        for b in BUDGETS[1:-1]:
            plan = model(input_ids=ids, labels=labels, budget=b).plan[:, :, 0, 0]
            picks[str(b)] = {"first_chunk": (plan[0].nonzero().flatten() + model.config.num_prefix_layers).tolist(),
                             "distinct_plans_in_batch": int(torch.unique(plan, dim=0).shape[0])}  # fmt: skip
    results["scheduler_picks"] = picks
    results["perplexity"] = rows
    results["latency"] = latency(model, tok, cfg)
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads":
                          torch.get_num_threads(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}  # fmt: skip
    results["wall_s"] = time.perf_counter() - t_start

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{cfg.out}.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    plot(results, RESULTS / f"{cfg.out}.png")
    print(f"wrote {RESULTS / cfg.out}.json/.png; wall {results['wall_s']:.0f} s")


def print_table(res):
    by = {(r["budget"], r["method"]): r for r in res["perplexity"]}
    lat = {r["budget"]: r for r in res["latency"]}
    print(f"\nperplexity on {res['eval_tokens_scored']} held-out tokens (SmolLM2 alone: {res['smollm2_ppl']:.2f})")
    print(f"{'budget':>6} {'k':>3} {'early exit':>11} {'random':>18} {'AdaLLaVA':>9} {'prefill ms':>11} "
          f"{'decode ms/tok':>14}   (latency: min of {lat[1.0].get('reps', '?')} runs)")  # fmt: skip
    for b in BUDGETS:
        e, r, a = by[(b, "early_exit")], by[(b, "random")], by[(b, "adallava")]
        rnd = f"{r['ppl']:.3g} [{r['ppl_min']:.3g}-{r['ppl_max']:.3g}]"
        print(f"{b:>6.1f} {e['k']:>3} {e['ppl']:>11.4g} {rnd:>18} {a['ppl']:>9.4g} {lat[b]['prefill_ms']:>11.0f} "
              f"{lat[b]['decode_ms_per_token']:>14.1f}")  # fmt: skip


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method, style in (("early_exit", "o-"), ("random", "s--"), ("adallava", "^-")):
        rows = [r for r in res["perplexity"] if r["method"] == method]
        ax1.plot([r["budget"] for r in rows], [r["ppl"] for r in rows], style, label=method)
    ax1.axhline(res["smollm2_ppl"], color="gray", ls=":", label="SmolLM2 alone")
    ax1.set_yscale("log")
    ax1.set_xlabel("budget")
    ax1.set_ylabel("perplexity (held-out Python docs)")
    ax1.legend()
    ax1.set_title("SmolLM2-135M-Instruct, real weights")
    lat = res["latency"]
    ax2.plot([r["budget"] for r in lat], [r["prefill_ms"] for r in lat], "o-", label=f"prefill ({res['config']['latency_prompt']} tok)")
    ax2b = ax2.twinx()
    ax2b.plot([r["budget"] for r in lat], [r["decode_ms_per_token"] for r in lat], "s--", color="C1", label="decode")
    ax2.set_xlabel("budget")
    ax2.set_ylabel("prefill ms")
    ax2b.set_ylabel("decode ms / token")
    ax2.set_title("measured latency, min of runs (shared 2-core CPU)")
    ax2.legend(ax2.get_legend_handles_labels()[0] + ax2b.get_legend_handles_labels()[0],
               ax2.get_legend_handles_labels()[1] + ax2b.get_legend_handles_labels()[1], loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
