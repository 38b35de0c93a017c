"""Open-loop Poisson load against the Serve app: load-aware budgets vs static baselines (not a test).

    python -m bench.bench_serve_load                          # tiny preset, about 6-8 min on 2 cores
    python -m bench.bench_serve_load model=/path/to/ckpt duration_s=20 slo_ms=1500

Steps: (1) measure the full-budget capacity C of one fixed replica (closed loop, saturated); (2) for each variant
(a) load-aware budgets, (b) static full budget + queueing, (c) static full budget + 429 shedding, (d) static minimum
budget, send Poisson arrivals at 0.5C, 1C, 2C for duration_s and record latency, status and the answer; (3) a load
step 1C -> 2C -> 1C against the load-aware app with autoscaling allowed (1..2 replicas), recording the budgets chosen
over time and the replica count. Questions come from the bundled evaluation set (adallava.data); effective accuracy
counts an answer only when it is correct AND within the SLO (429s and late answers count as misses). With the
random-init tiny preset accuracy is meaningless (the model answers noise), so the figures that matter are latency and
SLO attainment; pass model=<trained checkpoint> for accuracy. Writes bench/results/serve_load.json and .png.
"""

import asyncio
import base64
import json
import os
import random
import sys
import time
from pathlib import Path

DEFAULTS = dict(model="tiny", duration_s=12.0, slo_ms=1000.0, max_tokens=16, max_batch_size=8, port=8931, seed=0,
                num_questions=200, step_phase_s=10.0, out="bench/results/serve_load")  # fmt: skip


def parse(argv):
    cfg = dict(DEFAULTS)
    for a in argv:
        k, v = a.split("=", 1)
        if k not in cfg:
            sys.exit(f"unknown option {k!r}; known: {sorted(cfg)}")
        cfg[k] = type(cfg[k])(v)
    return cfg


def questions(n, seed):
    """[(messages, gold answer, question type)] from the bundled test split (images as data: URLs)."""
    try:
        from adallava.data import generate_bundled
    except ImportError:
        return None
    paths = generate_bundled("bench/results/serve_load_data", seed=seed, num_train=0, num_validation=0, num_test=n, progress=False)
    recs = json.loads(Path(paths["test"]).read_text())
    root = Path(paths["test"]).parent
    out = []
    for r in recs[:n]:
        q = r["conversations"][0]["value"].replace("<image>", "").strip()
        content = [{"type": "text", "text": q}]
        if r.get("image"):
            img = root / "images" / r["image"] if not (root / r["image"]).exists() else root / r["image"]
            url = "data:image/png;base64," + base64.b64encode(img.read_bytes()).decode()
            content = [{"type": "image_url", "image_url": {"url": url}}] + content
        out.append(([{"role": "user", "content": content}], r.get("answer") or r["conversations"][1]["value"],
                    r.get("question_type", "")))  # fmt: skip
    return out


VARIANTS = {
    "a_load_aware": {"floor": 0.5, "ceiling": 1.0, "reject": True},
    "b_full_queue": {"floor": 1.0, "ceiling": 1.0, "reject": False},
    "c_full_shed": {"floor": 1.0, "ceiling": 1.0, "reject": True},
    "d_min_budget": {"floor": 0.5, "ceiling": 0.5, "reject": False},
}


def deploy(cfg, policy, replicas=(1, 1)):
    from ray import serve

    from serve.app import build_app

    args = {
        "model": cfg["model"], "max_batch_size": cfg["max_batch_size"], "min_replicas": replicas[0],
        "max_replicas": replicas[1], "upscale_delay_s": 2.0, "downscale_delay_s": 30.0, "look_back_period_s": 3.0,
        "target_ongoing_requests": cfg["max_batch_size"],
        # the server's own target leaves half the SLO for the proxy, the ingress and prediction error
        "policy": {"slo_ms": cfg["slo_ms"] * 0.5, "tokens": cfg["max_tokens"], **policy},
        "limits": {"default_max_tokens": cfg["max_tokens"]},
    }  # fmt: skip
    serve.run(build_app(args), name="adallava", route_prefix="/")


async def one(client, item, cfg, t_sched, log):
    messages, gold, qtype = item
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": cfg["max_tokens"],
                                                             "temperature": 0})  # fmt: skip
        status, body = r.status_code, r.json()
    except Exception as e:  # a client-side failure counts as a miss
        status, body = 599, {"error": str(e)}
    lat = (time.perf_counter() - t0) * 1000
    rec = {"t": t_sched, "status": status, "latency_ms": lat, "gold": gold, "qtype": qtype}
    if status == 200:
        rec["text"] = body["choices"][0]["message"]["content"]
        rec["budget"] = body["adallava"]["budget"]
        rec["load"] = body["adallava"]["load"]["requests_per_replica"]
        rec["replicas"] = body["adallava"]["load"]["replicas"]
        rec["slowdown"] = body["adallava"]["load"].get("slowdown")  # the replica's measured/profiled batch time
    log.append(rec)


async def poisson(url, items, cfg, rate_schedule, seed):
    """rate_schedule: [(seconds, requests/s)]; open loop: arrivals never wait for answers."""
    import httpx

    rng = random.Random(seed)
    log, tasks = [], []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start, t_next, k = time.perf_counter(), 0.0, 0
        t_phase = 0.0
        for seconds, rate in rate_schedule:
            while True:
                t_next += rng.expovariate(rate)
                if t_next >= t_phase + seconds:
                    t_next = t_phase + seconds
                    break
                delay = start + t_next - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(client, items[k % len(items)], cfg, t_next, log)))
                k += 1
            t_phase += seconds
        await asyncio.gather(*tasks)
    return sorted(log, key=lambda r: r["t"])


async def capacity(url, items, cfg, seconds=10.0, concurrency=48):
    """Closed loop with many clients: completed requests per second of a saturated replica at full budget."""
    import httpx

    done, stop = [0], time.perf_counter() + seconds

    async def worker(i):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            while time.perf_counter() < stop:
                r = await c.post("/v1/chat/completions", json={"messages": items[i % len(items)][0],
                                                                "max_tokens": cfg["max_tokens"], "temperature": 0})  # fmt: skip
                done[0] += r.status_code == 200
                i += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done[0] / (time.perf_counter() - t0)


def summarize(log, slo_ms, score):
    import numpy as np

    n = len(log)
    ok = [r for r in log if r["status"] == 200]
    lat = np.array([r["latency_ms"] for r in ok]) if ok else np.array([float("nan")])
    in_slo = [r for r in ok if r["latency_ms"] <= slo_ms]
    out = {
        "requests": n, "ok": len(ok), "rejected_429": sum(r["status"] == 429 for r in log),
        "errors": sum(r["status"] not in (200, 429) for r in log),
        "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
        "slo_attainment": len(in_slo) / max(n, 1),
        "mean_budget": float(np.mean([r["budget"] for r in ok])) if ok else None,
        "median_slowdown": float(np.median([r["slowdown"] for r in ok])) if ok and ok[0].get("slowdown") else None,
    }  # fmt: skip
    if score is not None:
        correct = [r for r in ok if score(r["text"], r["gold"])]
        out["accuracy_served"] = len(correct) / max(len(ok), 1)
        out["effective_accuracy"] = sum(1 for r in correct if r["latency_ms"] <= slo_ms) / max(n, 1)
    return out


def main(argv=None):
    cfg = parse(sys.argv[1:] if argv is None else argv)
    for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                 "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}.items():  # fmt: skip
        os.environ.setdefault(k, v)
    import ray
    from ray import serve

    items = questions(cfg["num_questions"], cfg["seed"])
    score = None
    if items is None:
        print("adallava.data not available: text-only prompts, no accuracy")
        items = [([{"role": "user", "content": "Describe the picture."}], "", "")]
    else:
        from adallava.data import score_answer as score
    trained = cfg["model"] != "tiny"
    url = f"http://127.0.0.1:{cfg['port']}"
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": cfg["port"]})
    results = {"config": cfg, "machine": f"{os.cpu_count()} CPU cores, CPU only", "variants": {}}
    try:
        deploy(cfg, VARIANTS["b_full_queue"])
        cap = asyncio.run(capacity(url, items, cfg))
        results["capacity_rps"] = cap
        print(f"full-budget capacity of 1 replica: {cap:.1f} req/s (SLO {cfg['slo_ms']:.0f} ms)")
        for name, policy in VARIANTS.items():
            deploy(cfg, policy)
            results["variants"][name] = {}
            for mult in (0.5, 1.0, 2.0):
                log = asyncio.run(poisson(url, items, cfg, [(cfg["duration_s"], mult * cap)], cfg["seed"]))
                s = summarize(log, cfg["slo_ms"], score)
                results["variants"][name][str(mult)] = s
                print(f"{name:14s} {mult:>4}x  p50 {s['p50_ms']:7.0f}  p95 {s['p95_ms']:7.0f}  SLO {s['slo_attainment']:.2f}"
                      f"  429 {s['rejected_429']:4d}  budget {s['mean_budget'] or 0:.2f}  slowdown {s['median_slowdown'] or 0:.2f}"
                      + (f"  eff.acc {s['effective_accuracy']:.3f}" if score else ""), flush=True)  # fmt: skip
        # load step with autoscaling allowed
        deploy(cfg, VARIANTS["a_load_aware"], replicas=(1, 2))
        ph = cfg["step_phase_s"]
        log = asyncio.run(poisson(url, items, cfg, [(ph, cap), (ph, 2 * cap), (ph * 1.5, cap)], cfg["seed"] + 1))
        results["step"] = [{k: r.get(k) for k in ("t", "status", "latency_ms", "budget", "load", "replicas", "slowdown")}
                           for r in log]  # fmt: skip
        for lo, hi, label in ((0, ph, "1x"), (ph, 2 * ph, "2x"), (2 * ph, 3.5 * ph, "1x again")):
            win = [r for r in log if lo <= r["t"] < hi and r["status"] == 200]
            late = [r for r in win if r["t"] >= hi - 3]
            print(f"step {label:8s}: mean budget {sum(r['budget'] for r in win) / max(len(win), 1):.2f}, "
                  f"last 3 s {sum(r['budget'] for r in late) / max(len(late), 1):.2f}, "
                  f"max replicas seen {max((r['replicas'] for r in win), default=0)}, "
                  f"429s {sum(1 for r in log if lo <= r['t'] < hi and r['status'] == 429)}")  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()
    results["note"] = ("accuracy from a trained checkpoint" if trained else
                       "random-init tiny preset: accuracy is meaningless; read latency and SLO attainment only")  # fmt: skip
    out = Path(cfg["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    mults = ["0.5", "1.0", "2.0"]
    for name, by in results["variants"].items():
        ax[0].plot([float(m) for m in mults], [by[m]["p95_ms"] for m in mults], "o-", label=name)
        ax[1].plot([float(m) for m in mults], [by[m]["slo_attainment"] for m in mults], "o-", label=name)
    ax[0].axhline(results["config"]["slo_ms"], ls="--", c="k", lw=0.8)
    ax[0].set(xlabel="load (x full-budget capacity)", ylabel="p95 latency (ms)", yscale="log")
    ax[1].set(xlabel="load (x full-budget capacity)", ylabel="SLO attainment")
    ax[0].legend(fontsize=7)
    step = [r for r in results.get("step", []) if r["status"] == 200]
    if step:
        ax[2].plot([r["t"] for r in step], [r["budget"] for r in step], ".", ms=3, label="budget")
        ax2 = ax[2].twinx()
        ax2.plot([r["t"] for r in step], [r["replicas"] for r in step], "r-", lw=1, label="replicas")
        ax2.set_ylabel("replicas (load board)")
        ax[2].set(xlabel="time (s): 1x -> 2x -> 1x", ylabel="budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
