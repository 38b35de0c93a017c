"""Evaluation of an AdaLLaVA checkpoint on a budget grid, against the baselines the paper argues with.

    python -m pipelines.evaluate --config pipelines/configs/eval_tiny.yaml model=<adapted ckpt> base=<base ckpt>
    python -m pipelines.evaluate model=<adapted ckpt> budgets=[0.5,0.75,1.0] max_examples=100
    python -m pipelines.evaluate --config pipelines/configs/eval_tiny.yaml model=models:/adallava/3 base=<base ckpt>

For each budget (default: the model's own steps, adallava.budget.budget_grid): accuracy overall and per question
type, measured prefill and per-token latency (requests timed one at a time), analytic FLOPs, and the execution plans
chosen (how often each layer runs). Methods at the same budgets, from the same base:
  adallava     the adapted model; its scheduler picks the layers from image, question and budget
  early_exit   the base model running its first k schedulable layers (k = the budget's plan size)
  random_skip  the base model running k schedulable layers drawn at random per request (seeded)
  full         the base model with every layer (one point, budget 1.0)
  early_exit_trained   early exit on a checkpoint trained LayerSkip-style (stage layerskip, same steps and data as
                       adapt): evaluate ... early_exit_model=<dir>
  random_skip_trained  random skipping on a checkpoint trained LayerDrop-style (stage layerdrop): random_skip_model=<dir>
With perplexity_chunks > 0, also the perplexity of held-out text (adallava.perplexity) per method and budget, and of
each checkpoint's language model alone (no latency token).
Writes results.json and PNG plots (accuracy vs budget, accuracy vs measured latency, layer usage vs budget, a
qualitative figure), logs all of it to MLflow, and prints a table. A registered model (model=models:/<name>/<version>
or models:/<name>@<alias>) gets its accuracy per budget as tags on that model version.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from registry import RegistryError, is_registry_uri

from .common import mlflow_experiment
from .config import EvalConfig, as_dict, load_config, project_path, tracking_uri

METHOD_LABELS = {
    "adallava": "AdaLLaVA", "early_exit": "early exit", "random_skip": "random skipping", "full": "full model",
    "early_exit_trained": "early exit (LayerSkip-trained)", "random_skip_trained": "random skip (LayerDrop-trained)",
}  # fmt: skip
# the plan each baseline method runs, and the EvalConfig key of the checkpoint a trained one runs on
PLAN_OF = {"early_exit": "early_exit", "random_skip": "random_skip", "full": "full",
           "early_exit_trained": "early_exit", "random_skip_trained": "random_skip"}  # fmt: skip
TRAINED_CHECKPOINT = {"early_exit_trained": "early_exit_model", "random_skip_trained": "random_skip_model"}


def resolve_methods(cfg: EvalConfig) -> list[str]:
    """The methods to evaluate: cfg.methods, or the default set (the trained baselines whose checkpoints are given).
    A trained method without its checkpoint, or a checkpoint whose method is not evaluated, is an error."""
    given = [m for m, key in TRAINED_CHECKPOINT.items() if getattr(cfg, key)]
    if cfg.methods is None:
        return ["adallava", "early_exit", "random_skip", *given, "full"]
    unknown = [m for m in cfg.methods if m not in METHOD_LABELS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; known: {list(METHOD_LABELS)}")
    for m, key in TRAINED_CHECKPOINT.items():
        if m in cfg.methods and not getattr(cfg, key):
            raise ValueError(f"method {m} needs its checkpoint: {key}=<dir> (a stage {_STAGE_OF[m]} run)")
        if m not in cfg.methods and getattr(cfg, key):
            raise ValueError(f"{key} is given but method {m} is not in methods={cfg.methods}")
    return list(cfg.methods)


_STAGE_OF = {"early_exit_trained": "layerskip", "random_skip_trained": "layerdrop"}


# ---------------------------------------------------------------------------------------------------------------
# plans for the baselines


def baseline_plan(method: str, budget: float, batch: int, config, generator=None):
    """[batch, schedulable layers, 2, heads] 0/1 plan with the same number of units as the scheduler would run at
    `budget`: the first k units in layer order (early exit) or k random ones per request (random skipping). A unit
    is a whole layer (`layer` granularity) or group_size heads + group_size MLP neuron groups of a layer (`head`)."""
    import torch

    from adallava.budget import units_for_budget

    S, H = config.num_schedulable_layers, config.num_switches
    per_layer = config.units_per_layer
    gs = H // per_layer
    k = int(units_for_budget(torch.tensor([float(budget)], dtype=torch.float64), config)[0])
    plan = torch.zeros(batch, S, 2, H)
    for b in range(batch):
        if method == "early_exit":
            units = torch.arange(k)
        elif method == "random_skip":
            units = torch.randperm(S * per_layer, generator=generator)[:k]
        elif method == "full":
            units = torch.arange(S * per_layer)
        else:
            raise ValueError(f"no baseline plan for method {method!r}")
        for u in units.tolist():
            layer, g = divmod(u, per_layer)
            plan[b, layer, :, g * gs : (g + 1) * gs] = 1.0
    return plan


# ---------------------------------------------------------------------------------------------------------------
# running one method at one budget


def _eos_never():
    return -1  # an id no token has: latency runs generate exactly max_new_tokens


def generate_batches(model, tokenizer, batches, method, budget, cfg, generator):
    """Generate for every example; returns per-example dicts (prediction, correct, plan, flops)."""
    import torch

    from adallava.data import score_answer

    rows = []
    for batch, metas in batches:
        B = batch["input_ids"].shape[0]
        plan = None
        if method != "adallava":
            plan = baseline_plan(PLAN_OF[method], budget, B, model.config, generator)
        out = model.generate(
            **batch, budget=budget if method == "adallava" else 1.0, execution_plan=plan,
            max_new_tokens=cfg.max_new_tokens, return_dict_in_generate=True,
        )  # fmt: skip
        new = out.sequences[:, batch["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, meta in enumerate(metas):
            rows.append({
                "id": meta["id"], "question_type": meta["question_type"], "difficulty": meta.get("difficulty"),
                "question": meta["question"], "answer": meta["answer"], "prediction": texts[i].strip(),
                "correct": bool(score_answer(texts[i], meta["answer"])),
                "execution_plan": [round(float(x), 4) for x in out.execution_plan[i]],
                "flops": float(out.flops[i]),
            })  # fmt: skip
    return rows


def measure_latency(model, singles, method, budget, cfg, generator):
    """Median prefill seconds and per-token decode seconds over requests run one at a time."""
    import statistics

    prefill, per_token = [], []
    for batch in singles:
        plan = None if method == "adallava" else baseline_plan(PLAN_OF[method], budget, 1, model.config, generator)
        out = model.generate(
            **batch, budget=budget if method == "adallava" else 1.0, execution_plan=plan,
            max_new_tokens=cfg.max_new_tokens, eos_token_id=_eos_never(), return_dict_in_generate=True,
        )  # fmt: skip
        prefill.append(out.timings["prefill_s"])
        steps = int(out.num_generated[0]) - 1
        if steps > 0:
            per_token.append(out.timings["decode_s"] / steps)
    return statistics.median(prefill), statistics.median(per_token) if per_token else float("nan")


def summarise(rows):
    n = len(rows)
    by_type: dict[str, list] = {}
    for r in rows:
        by_type.setdefault(str(r["question_type"]), []).append(r["correct"])
    return {
        "accuracy": sum(r["correct"] for r in rows) / max(n, 1), "n": n,
        "accuracy_by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
        "n_by_type": {t: len(v) for t, v in sorted(by_type.items())},
        "flops": sum(r["flops"] for r in rows) / max(n, 1),
        "layer_usage": [sum(r["execution_plan"][j] for r in rows) / max(n, 1) for j in range(len(rows[0]["execution_plan"]))]
        if rows else [],
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------


def _local(model: str, cfg: EvalConfig) -> Path:
    """A checkpoint folder (relative to the project) or a registry URI (models:/<name>/<version> or @<alias>,
    downloaded once per version into the local cache) -> a local folder presets.load opens."""
    if is_registry_uri(model):
        from registry import local_model

        return Path(local_model(model, tracking_uri=tracking_uri(cfg.mlflow_tracking_uri)))
    return project_path(model)


def run(cfg: EvalConfig) -> dict:
    import mlflow
    import torch

    from adallava import presets
    from adallava.budget import budget_grid
    from adallava.data import EvalCollator, load_llava_json

    if not cfg.model:
        raise ValueError("model=<checkpoint dir> is required (the adapted AdaLLaVA checkpoint)")
    methods = resolve_methods(cfg)
    t_start = time.perf_counter()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    if is_registry_uri(cfg.model):  # an alias is read once: the version evaluated is the version tagged
        from registry import pinned_uri

        cfg = dataclasses.replace(cfg, model=pinned_uri(cfg.model, tracking_uri(cfg.mlflow_tracking_uri)))
    model_path, base_path = _local(cfg.model, cfg), _local(cfg.base or cfg.model, cfg)
    model, processor = presets.load(model_path)
    base = model
    if base_path != model_path:
        base, _ = presets.load(base_path)
    model.eval(), base.eval()
    models = {"adallava": model, "early_exit": base, "random_skip": base, "full": base}
    for m, key in TRAINED_CHECKPOINT.items():
        if m in methods:
            models[m] = presets.load(project_path(getattr(cfg, key)))[0].eval()
    tokenizer = processor.tokenizer
    budgets = [float(b) for b in (cfg.budgets or budget_grid(model.config))]

    # ---- data: collated once, images decoded once
    if cfg.dataset == "bundled":
        from adallava.data import generate_bundled

        data_json, image_root = Path(generate_bundled(project_path(cfg.data_dir))[cfg.split]), None
    else:
        data_json = project_path(cfg.dataset)
        image_root = project_path(cfg.image_root) if cfg.image_root else None
    ds = load_llava_json(data_json, image_root, on_bad=cfg.on_bad)
    n = len(ds) if cfg.max_examples < 0 else min(cfg.max_examples, len(ds))
    collator = EvalCollator(processor)
    items = [ds[i] for i in range(n)]
    batches = []
    for s in range(0, n, cfg.batch_size):
        batch, metas = collator(items[s : s + cfg.batch_size])
        if batch is not None:
            batches.append((batch, metas))
    kept = [it for it in items if it is not None]
    singles = [collator([it])[0] for it in kept[: cfg.latency_samples]]
    bad = {"dataset": ds.report.as_dict(), "collator": collator.report.as_dict()}

    # ---- every (method, budget)
    plan_methods = [m for m in methods if m != "full"]
    jobs = [(m, b) for m in plan_methods for b in budgets] + ([("full", 1.0)] if "full" in methods else [])
    results: dict[str, dict] = {m: {} for m in methods}
    examples: dict[str, dict] = {m: {} for m in methods}
    chunks = None
    if cfg.perplexity_chunks > 0:
        from adallava.perplexity import text_chunks

        chunks = text_chunks(tokenizer, cfg.perplexity_ctx, cfg.perplexity_cont, "eval")[: cfg.perplexity_chunks]
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    with torch.inference_mode():
        # one warm-up generation so the first timed request does not pay for lazy initialisation
        model.generate(**singles[0], max_new_tokens=2) if singles else None
        # a bar in a terminal (disable=None: tqdm turns itself off when stdout is not a TTY), a line per setting in logs
        lines = cfg.progress and not sys.stdout.isatty()
        for i, (method, b) in enumerate(tqdm(jobs, desc="evaluate", unit="setting", disable=None if cfg.progress else True,
                                             file=sys.stdout)):  # fmt: skip
            m = models[method]
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + int(round(b * 1000)))
            rows = generate_batches(m, tokenizer, batches, method, b, cfg, gen)
            summary = summarise(rows)
            lat_gen = torch.Generator().manual_seed(cfg.seed)
            summary["prefill_ms"], summary["per_token_ms"] = (
                1000 * x for x in measure_latency(m, singles, method, b, cfg, lat_gen)
            ) if singles else (float("nan"), float("nan"))
            summary["budget"] = b
            if chunks is not None:
                summary["perplexity"] = method_perplexity(m, method, b, chunks, cfg)
            results[method][f"{b:.4f}"] = summary
            examples[method][f"{b:.4f}"] = rows
            if lines:
                print(f"[evaluate] {i + 1}/{len(jobs)} {method} budget {b:.3f}: accuracy {100 * summary['accuracy']:.1f}%",
                      flush=True)  # fmt: skip

    # ---- outputs
    out_dir = project_path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "config": as_dict(cfg), "budgets": budgets, "num_examples": sum(len(m) for _, m in batches),
        "num_layers": model.config.num_layers, "num_prefix_layers": model.config.num_prefix_layers,
        "granularity": model.config.granularity, "results": results, "bad_records": bad,
    }  # fmt: skip
    if chunks is not None:
        from adallava.perplexity import nll_plain, perplexity

        report["perplexity_tokens"] = len(chunks) * cfg.perplexity_cont
        # each checkpoint's language model alone: what its training did to plain text ability
        alone = {"adallava": model, "base": base, **{m: models[m] for m in TRAINED_CHECKPOINT if m in methods}}
        report["perplexity_language_model_alone"] = {
            k: perplexity(nll_plain(v, chunks, cfg.perplexity_ctx, cfg.perplexity_batch)) for k, v in alone.items()
        }  # fmt: skip
    report["wall_s"] = time.perf_counter() - t_start
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    (out_dir / "predictions.json").write_text(json.dumps(examples, indent=0))
    plots = plot_results(report, out_dir)
    qual = qualitative_figure(model, processor, kept, budgets, cfg, out_dir)
    if qual is not None:
        plots.append(qual)
    report["plots"] = [str(p) for p in plots]
    report["table"] = format_table(report)
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))

    # ---- MLflow
    uri = tracking_uri(cfg.mlflow_tracking_uri)
    mlflow_experiment(uri, cfg.experiment)
    mlflow.set_experiment(cfg.experiment)
    tags = {"stage": "evaluate", "dataset": cfg.dataset, "split": cfg.split, "model": str(cfg.model),
            "base": str(cfg.base or cfg.model)}  # fmt: skip
    with mlflow.start_run(run_name=cfg.run_name or "evaluate", tags=tags) as mlrun:
        mlflow.log_params({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in as_dict(cfg).items()})
        for method, per_budget in results.items():
            for key, s in per_budget.items():
                step = int(round(s["budget"] * 1000))  # the budget in permille: curves over budget in the UI
                mlflow.log_metrics({
                    f"accuracy/{method}": s["accuracy"], f"prefill_ms/{method}": s["prefill_ms"],
                    f"per_token_ms/{method}": s["per_token_ms"], f"gflops/{method}": s["flops"] / 1e9,
                    **{f"accuracy_{t}/{method}": a for t, a in s["accuracy_by_type"].items()},
                    **({f"perplexity/{method}": s["perplexity"]} if "perplexity" in s else {}),
                }, step=step)  # fmt: skip
        for k, v in (report.get("perplexity_language_model_alone") or {}).items():
            mlflow.log_metric(f"perplexity_lm_alone/{k}", v)
        mlflow.log_artifact(str(out_dir / "results.json"))
        mlflow.log_artifact(str(out_dir / "predictions.json"))
        for p in plots:
            mlflow.log_artifact(str(p), artifact_path="plots")
        report["mlflow_run_id"] = mlrun.info.run_id
    if is_registry_uri(cfg.model) and "adallava" in results:  # the registered version carries its accuracy per budget
        from registry import attach_evaluation

        acc = {s["budget"]: s["accuracy"] for s in results["adallava"].values()}
        report["registered_model"] = attach_evaluation(cfg.model, acc, run_id=report["mlflow_run_id"], tracking_uri=uri)
    print(report["table"])
    print(f"\nresults: {out_dir / 'results.json'}; plots: {', '.join(p.name for p in plots)}")
    print(f"MLflow run {report['mlflow_run_id']} (experiment {cfg.experiment!r}, {uri})")
    return report


def method_perplexity(model, method: str, budget: float, chunks, cfg: EvalConfig) -> float:
    """Perplexity of the held-out chunks under `method` at `budget`: AdaLLaVA's scheduler, or the baseline's plan
    (random skipping: one seeded draw per row, as in the accuracy runs)."""
    import torch

    from adallava.perplexity import nll, perplexity

    if method == "adallava":
        return perplexity(nll(model, chunks, cfg.perplexity_ctx, cfg.perplexity_batch, budget))
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + int(round(budget * 1000)))
    plan_fn = lambda B: baseline_plan(PLAN_OF[method], budget, B, model.config, gen).to(model.device)  # noqa: E731
    return perplexity(nll(model, chunks, cfg.perplexity_ctx, cfg.perplexity_batch, 1.0, plan_fn))


# ---------------------------------------------------------------------------------------------------------------
# plots and the table


def plot_results(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    res = report["results"]
    styles = {"adallava": ("C0", "o-"), "early_exit": ("C3", "s--"), "random_skip": ("C2", "^:"), "full": ("k", "*"),
              "early_exit_trained": ("C1", "s-"), "random_skip_trained": ("C4", "^-")}  # fmt: skip
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, per in res.items():
        xs = [s["budget"] for s in per.values()]
        ys = [100 * s["accuracy"] for s in per.values()]
        colour, style = styles[method]
        if method == "full":
            ax.axhline(ys[0], color=colour, lw=0.8, ls="--")
            ax.plot(xs, ys, style, color=colour, ms=12, label=f"{METHOD_LABELS[method]} (base)")
        else:
            ax.plot(xs, ys, style, color=colour, label=METHOD_LABELS[method])
    ax.set(xlabel="budget (fraction of decoder layers)", ylabel="accuracy (%)", title="Accuracy vs budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "accuracy_vs_budget.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "prefill_ms", "measured prefill latency (ms)"),
                           (axes[1], "per_token_ms", "measured per-token latency (ms)")):  # fmt: skip
        for method, per in res.items():
            xs = [s[key] for s in per.values()]
            ys = [100 * s["accuracy"] for s in per.values()]
            colour, style = styles[method]
            ax.plot(xs, ys, style if method == "full" else style, color=colour, ms=12 if method == "full" else 6,
                    label=METHOD_LABELS[method])  # fmt: skip
            if method == "adallava":
                for s in per.values():
                    ax.annotate(f"{s['budget']:.2f}", (s[key], 100 * s["accuracy"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))  # fmt: skip
        ax.set(xlabel=label, ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Accuracy vs measured latency (one request at a time)")
    fig.tight_layout()
    paths.append(out_dir / "accuracy_vs_latency.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    if any("perplexity" in s for per in res.values() for s in per.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, per in res.items():
            xs = [s["budget"] for s in per.values()]
            ys = [s["perplexity"] for s in per.values()]
            colour, style = styles[method]
            ax.plot(xs, ys, style, color=colour, ms=12 if method == "full" else 6, label=METHOD_LABELS[method])
        for name, v in (report.get("perplexity_language_model_alone") or {}).items():
            if name == "adallava":
                ax.axhline(v, color="gray", ls=":", lw=1, label="language model alone (adapted)")
        ax.set_yscale("log")
        ax.set(xlabel="budget (fraction of decoder layers)", ylabel="perplexity (held-out text)",
               title="Perplexity vs budget")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "perplexity_vs_budget.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    if "adallava" in res:
        per = res["adallava"]
        usage = np.array([s["layer_usage"] for s in per.values()])
        budgets = [s["budget"] for s in per.values()]
        fig, ax = plt.subplots(figsize=(1.2 + 0.45 * usage.shape[1], 1.2 + 0.4 * len(budgets)))
        im = ax.imshow(usage, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(usage.shape[1]), [str(i) for i in range(usage.shape[1])])
        ax.set_yticks(range(len(budgets)), [f"{b:.3f}" for b in budgets])
        for i in range(usage.shape[0]):
            for j in range(usage.shape[1]):
                ax.text(j, i, f"{usage[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if usage[i, j] < 0.5 else "k")  # fmt: skip
        P = report["num_prefix_layers"]
        ax.axvline(P - 0.5, color="r", lw=1)
        ax.set(xlabel=f"decoder layer (0..{P - 1}: prefix, always on)", ylabel="budget",
               title="AdaLLaVA: how often each layer runs")  # fmt: skip
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        paths.append(out_dir / "layer_usage.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def qualitative_figure(model, processor, items, budgets, cfg: EvalConfig, out_dir: Path):
    """For a few examples (one per question type first): the image, the latency token's attention over its patches
    at the lowest and the full budget, and the plan and the answer at each budget."""
    if cfg.num_qualitative <= 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from adallava.data import EvalCollator, score_answer

    from adallava.attention import attention_map, latency_token_attention

    chosen, seen = [], set()
    for it in items:  # one per question type with an image, then any
        if it.get("image") is not None and it.get("question_type") not in seen:
            chosen.append(it)
            seen.add(it.get("question_type"))
        if len(chosen) == cfg.num_qualitative:
            break
    if not chosen:
        return None
    collator = EvalCollator(processor)
    P = model.config.num_prefix_layers
    show = sorted({budgets[0], budgets[-1]})
    fig, axes = plt.subplots(len(chosen), 2 + len(show), figsize=(4 + 2.6 * (1 + len(show)), 2.8 * len(chosen)),
                             squeeze=False)  # fmt: skip
    for r, item in enumerate(chosen):
        batch, metas = collator([item])
        img = np.asarray(item["image"].convert("RGB"))
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(f"{metas[0]['question'][:40]}\ngold: {metas[0]['answer']}", fontsize=8)
        for c, b in enumerate(show):
            att = latency_token_attention(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"], b)
            grid = attention_map(att)  # last prefix layer (what the scheduler reads), mean over heads
            ax = axes[r, 1 + c]
            ax.imshow(img)
            ax.imshow(grid.numpy(), cmap="inferno", alpha=0.6, extent=(0, img.shape[1], img.shape[0], 0),
                      interpolation="nearest")  # fmt: skip
            ax.set_title(f"latency-token attention\nlayer {P - 1}, budget {b:.2f}", fontsize=8)
        lines = []
        for b in budgets:
            out = model.generate(**batch, budget=b, max_new_tokens=cfg.max_new_tokens, return_dict_in_generate=True)
            text = processor.tokenizer.decode(out.sequences[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            on = out.execution_plan[0, P:]
            plan = "".join("#" if x > 0.99 else ("+" if x > 0 else ".") for x in on.tolist())
            mark = "ok" if score_answer(text, metas[0]["answer"]) else "x"
            lines.append(f"{b:.3f}  [{plan}]  {text.strip()[:18]!r} {mark}")
        ax = axes[r, -1]
        ax.axis("off")
        ax.text(0, 0.5, "budget  plan (# = layer runs)  answer\n" + "\n".join(lines), family="monospace",
                fontsize=8, va="center")  # fmt: skip
        for a in axes[r, :-1]:
            a.set_xticks([]), a.set_yticks([])
    fig.suptitle("AdaLLaVA: where the latency token looks, and the plan and answer at each budget", fontsize=10)
    fig.tight_layout()
    path = out_dir / "qualitative.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(report: dict) -> str:
    res = report["results"]
    methods = [m for m in ("adallava", "early_exit", "random_skip", "early_exit_trained", "random_skip_trained")
               if m in res]  # fmt: skip
    short = {"early_exit_trained": "EE LayerSkip", "random_skip_trained": "RS LayerDrop"}
    lines = [f"Accuracy (%) on {report['num_examples']} examples, and AdaLLaVA's measured cost per budget", ""]
    head = f"{'budget':>7} " + " ".join(f"{short.get(m, METHOD_LABELS[m]):>15}" for m in methods)
    head += f" {'prefill ms':>10} {'ms/token':>9} {'GFLOPs':>8}"
    lines += [head, "-" * len(head)]
    ref = res.get("adallava") or next(iter(res.values()))
    for key in ref:
        row = f"{float(key):>7.3f} " + " ".join(f"{100 * res[m][key]['accuracy']:>15.1f}" for m in methods)
        s = ref[key]
        row += f" {s['prefill_ms']:>10.2f} {s['per_token_ms']:>9.2f} {s['flops'] / 1e9:>8.3f}"
        lines.append(row)
    if "full" in res:
        s = next(iter(res["full"].values()))
        lines.append(f"full model (base, every layer): {100 * s['accuracy']:.1f}%  prefill {s['prefill_ms']:.2f} ms, "
                     f"{s['per_token_ms']:.2f} ms/token, {s['flops'] / 1e9:.3f} GFLOPs")  # fmt: skip
    if any("perplexity" in s for s in ref.values()):
        lines += ["", f"Perplexity of held-out text ({report.get('perplexity_tokens')} tokens)",
                  f"{'budget':>7} " + " ".join(f"{short.get(m, METHOD_LABELS[m]):>15}" for m in methods)]  # fmt: skip
        for key in ref:
            lines.append(f"{float(key):>7.3f} " + " ".join(f"{res[m][key]['perplexity']:>15.4g}" for m in methods))
        alone = report.get("perplexity_language_model_alone") or {}
        lines.append("language model alone: " + ", ".join(f"{k} {v:.4g}" for k, v in alone.items()))
    if "adallava" in res:
        types = list(next(iter(res["adallava"].values()))["accuracy_by_type"])
        lines += ["", "AdaLLaVA accuracy (%) per question type", f"{'budget':>7} " + " ".join(f"{t:>9}" for t in types)]
        for key, s in res["adallava"].items():
            lines.append(f"{float(key):>7.3f} " + " ".join(f"{100 * s['accuracy_by_type'][t]:>9.1f}" for t in types))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file (pipelines/configs/eval_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=runs/x/checkpoint_0000300")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(EvalConfig, args.config, args.overrides)
        if not cfg.model:
            raise ValueError("model=<checkpoint dir> is required")
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    try:
        run(cfg)
    except RegistryError as e:  # a models:/ URI that names no version: say which, no traceback
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
