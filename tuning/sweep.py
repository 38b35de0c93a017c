"""Ray Tune sweeps of the loss weights that trade accuracy across budgets (adallava.objective.LossWeights), plus the
learning rate, the Gumbel temperature tau and the budget distribution, tracked in MLflow.

    python -m tuning.sweep --config tuning/configs/tiny.yaml                         # the evidence sweep (~20 min)
    python -m tuning.sweep --config tuning/configs/smoke.yaml num_samples=2          # a quick look
    python -m tuning.sweep --config tuning/configs/tiny.yaml name=<sweep name>       # resume an interrupted sweep
    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"ADALLAVA_HOME": "'$PWD'"}}' \\
        -- python -m tuning.sweep --config tuning/configs/tiny.yaml                  # on a running cluster

Each trial is a real training run: pipelines.train (Ray Train's TorchTrainer) runs *inside* the Tune trial, the way
Ray 2.60 intends it (Tuner(trainer) is deprecated), with TuneReportCallback forwarding the workers' reports to Tune.
The trial adapts the same trained base (init_from) with its sampled weights; every `val_every` steps rank 0 reports the
plain next-token loss on a fixed validation batch averaged over the budget grid (val_loss, independent of the loss
weights, so trials compare), which ASHA stops trials on. A trial that finishes is scored on the validation split:
objective val_auc = mean accuracy over the model's budget grid, with the accuracy at the lowest and the full budget.

MLflow: a parent run for the sweep; each trial's training run is its child (tag mlflow.parentRunId) with the params,
val_loss during training, its accuracy-vs-budget curve (metric val_accuracy over step = budget in permille, JSON and
PNG) and its checkpoint location. At the end the parent gets a plot of every trial's curve and the winner exported as
a pipelines train config (YAML) that trains it: python -m pipelines.train --config <exported>.
The same `name` resumes an interrupted sweep (Tuner.restore): finished trials are kept, the rest run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from pipelines.common import init_ray, mlflow_experiment  # sets the loopback-only Ray environment before Ray loads
from pipelines.config import as_dict, project_path, resolve_storage_path, tracking_uri

from .config import LOSS_KEYS, SweepConfig, default_point, is_distribution, load_sweep_config, validate

STATE_FILE = "sweep_state.json"  # beside Tune's experiment state: the parent MLflow run, so a resume reuses it


# ---------------------------------------------------------------------------------------------------------------
# the search space


def param_space(cfg: SweepConfig) -> dict:
    """Tune's param_space from the checked search space (constants stay constants)."""
    from ray import tune

    kinds = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    space = {}
    for key, spec in cfg.search_space.items():
        if not is_distribution(spec):
            space[key] = spec
            continue
        kind, args = next(iter(spec.items()))
        space[key] = tune.choice(args) if kind == "choice" else kinds[kind](*args)
    return space


def fixed_points(cfg: SweepConfig, defaults: dict) -> list[dict]:
    """The fixed trials, every searched key filled in (missing ones: the paper's value). Only keys with a
    distribution: constants come from param_space, and Optuna refuses points with other keys than its space."""
    keys = [k for k, spec in cfg.search_space.items() if is_distribution(spec)]
    for point in cfg.fixed_trials:
        for k, v in point.items():
            if k in cfg.search_space and not is_distribution(cfg.search_space[k]) and v != cfg.search_space[k]:
                raise ValueError(f"fixed_trials: {k}={v!r} contradicts the constant search_space.{k}")
    return [{k: point.get(k, defaults[k]) for k in keys} for point in cfg.fixed_trials]


def trial_train_dict(base: dict, params: dict) -> dict:
    """A trial's TrainConfig values: the sweep's base with the sampled lr, tau and loss weights."""
    out = dict(base)
    if "lr" in params:
        out["lr"] = float(params["lr"])
    if "gumbel_tau" in params:
        out["gumbel_tau"] = float(params["gumbel_tau"])
    out["loss_weights"] = {k: params[k] for k in LOSS_KEYS if k in params}
    return out


def is_paper_default(params: dict, defaults: dict) -> bool:
    return all(params[k] == defaults[k] for k in params)


# ---------------------------------------------------------------------------------------------------------------
# scoring: the accuracy-vs-budget curve


def budget_curve(checkpoint: str, data_json: str, max_examples: int = -1, batch_size: int = 100,
                 max_new_tokens: int = 4) -> dict:  # fmt: skip
    """Accuracy of the AdaLLaVA checkpoint at each budget of its grid on a split -> {budgets, accuracy, auc (mean over
    the grid), acc_min, acc_full, n, skipped}. The same generation and scoring as pipelines.evaluate."""
    from types import SimpleNamespace

    import torch

    from adallava import presets
    from adallava.budget import budget_grid
    from adallava.data import EvalCollator, load_llava_json
    from pipelines.evaluate import generate_batches, summarise

    model, processor = presets.load(checkpoint)
    model.eval()
    ds = load_llava_json(data_json, None)
    n = len(ds) if max_examples < 0 else min(max_examples, len(ds))
    collator = EvalCollator(processor)
    items = [ds[i] for i in range(n)]
    batches = [b for b in (collator(items[s : s + batch_size]) for s in range(0, n, batch_size)) if b[0] is not None]
    budgets = [float(b) for b in budget_grid(model.config)]
    acc = []
    with torch.inference_mode():
        for b in budgets:
            rows = generate_batches(model, processor.tokenizer, batches, "adallava", b,
                                    SimpleNamespace(max_new_tokens=max_new_tokens), None)  # fmt: skip
            acc.append(summarise(rows)["accuracy"])
    scored = sum(len(m) for _, m in batches)
    return {"budgets": budgets, "accuracy": acc, "auc": sum(acc) / len(acc), "acc_min": acc[0], "acc_full": acc[-1],
            "n": scored, "skipped": n - scored}  # fmt: skip


def plot_curves(curves: list[tuple[str, dict, dict]], path: Path, title: str) -> Path:
    """curves: (label, curve, style kwargs) -> one PNG of accuracy vs budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2 + 0.18 * len(curves)))
    for label, curve, style in curves:
        ax.plot(curve["budgets"], [100 * a for a in curve["accuracy"]], marker="o", label=label, **style)
    ax.set(xlabel="budget (fraction of decoder layers)", ylabel="validation accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below the axes: curves stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend below the axes can be wider than the figure
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# one trial (runs in a Tune trial process)


def run_trial(config: dict, setup: dict) -> None:
    from mlflow import MlflowClient
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines import train
    from pipelines.config import TrainConfig

    trial_id = tune.get_context().get_trial_id()
    params = {k: config[k] for k in setup["searched"]}
    cfg = TrainConfig(**trial_train_dict(setup["train"], params))
    # the same trial restarted after an interruption resumes its Train run from the latest checkpoint
    cfg.name = f"{setup['name']}-{trial_id}"
    cfg.storage_path = setup["trials_storage"]
    cfg.mlflow_tracking_uri, cfg.experiment = setup["tracking_uri"], setup["experiment"]
    paper = is_paper_default(params, setup["defaults"])
    tags = {"mlflow.parentRunId": setup["parent_run_id"],
            "sweep": setup["name"], "trial_id": trial_id, "paper_defaults": str(paper).lower()}  # fmt: skip
    outcome = train.run(cfg, callbacks=[TuneReportCallback()], tags=tags)

    curve = budget_curve(str(outcome.final_checkpoint), setup["val_json"], setup["eval_examples"],
                         setup["eval_batch_size"], setup["max_new_tokens"])  # fmt: skip
    out_dir = Path(setup["trials_storage"]) / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"trial_id": trial_id, "params": params, "paper_defaults": paper, "curve": curve,
              "checkpoint": str(outcome.final_checkpoint), "mlflow_run_id": outcome.mlflow_run_id}  # fmt: skip
    (out_dir / "curve.json").write_text(json.dumps(record, indent=1))
    label = "paper defaults" if paper else describe(params)
    plot_curves([(label, curve, {})], out_dir / "curve.png", f"trial {trial_id}: val AUC {curve['auc']:.3f}")

    client = MlflowClient(setup["tracking_uri"])
    run_id = outcome.mlflow_run_id
    for k, v in params.items():
        client.log_param(run_id, f"search.{k}", v)
    for b, a in zip(curve["budgets"], curve["accuracy"]):
        client.log_metric(run_id, "val_accuracy", a, step=int(round(1000 * b)))  # x axis: budget in permille
    for k in ("auc", "acc_min", "acc_full"):
        client.log_metric(run_id, f"val_{k}", curve[k])
    client.log_artifact(run_id, str(out_dir / "curve.json"))
    client.log_artifact(run_id, str(out_dir / "curve.png"))
    client.set_tag(run_id, "checkpoint", str(outcome.final_checkpoint))
    tune.report({"val_auc": curve["auc"], "val_acc_min": curve["acc_min"], "val_acc_full": curve["acc_full"],
                 "val_curve": curve["accuracy"], "step": cfg.max_steps, "final_checkpoint": str(outcome.final_checkpoint),
                 "mlflow_run_id": run_id, "paper_defaults": paper,
                 # Tune checks every result for the scheduler's metric: the last one of the training run
                 "val_loss": (outcome.result.metrics or {}).get("val_loss")})  # fmt: skip


def describe(params: dict) -> str:
    """Short label of a trial's values (alpha/beta only when budgets are beta-distributed, where they mean something)."""
    skip = {"budget_alpha", "budget_beta"} if params.get("budget_dist") == "uniform" else set()
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items() if k not in skip)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------------------------
# the driver


def _interrupt_callback(after: int):
    from ray import tune

    class InterruptAfter(tune.Callback):
        """Sends this process SIGINT (Tune's own 'stop and save' path, as Ctrl+C) when the `after`-th trial of the
        experiment finishes. Counts trials restored as finished too, so a resumed sweep is not interrupted again."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            done = {t.trial_id for t in trials if t.status == "TERMINATED"} | {trial.trial_id}
            if len(done) == after:
                print(f"[sweep] interrupt_after_trials={after}: interrupting the sweep", flush=True)
                os.kill(os.getpid(), signal.SIGINT)

    return InterruptAfter()


def build_tuner(cfg: SweepConfig, trainable, exp_path: Path, defaults: dict, max_steps: int):
    """A new Tuner, or the interrupted one restored (the same name)."""
    from ray import tune

    if tune.Tuner.can_restore(str(exp_path)):
        print(f"[sweep] resuming {exp_path} (finished trials are kept)", flush=True)
        return tune.Tuner.restore(str(exp_path), trainable, resume_unfinished=True, restart_errored=True), True
    points = fixed_points(cfg, defaults)
    scheduler = None
    if cfg.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            # A trial at its last step must not be stopped: it still has to be scored on the validation split. So
            # every rung lies below the last step (ASHA's rungs are grace * rf^k <= max_t) and reaching max_t stops
            # nothing (stop_last_trials=False).
            time_attr="step", metric="val_loss", mode="min", max_t=max_steps - 1, grace_period=cfg.asha_grace_steps,
            reduction_factor=cfg.asha_reduction_factor, stop_last_trials=False,
        )  # fmt: skip
    if cfg.searcher == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        class FinalOptunaSearch(OptunaSearch):
            """Optuna (TPE) told each trial's final val_auc; the training reports before it carry val_loss only."""

            def on_trial_result(self, trial_id, result):
                if self.metric in result:
                    super().on_trial_result(trial_id, result)

        # Tune otherwise checks every report for the searcher's metric, which only the final (scored) one has
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        search = ConcurrencyLimiter(
            FinalOptunaSearch(metric="val_auc", mode="max", points_to_evaluate=points or None, seed=cfg.seed),
            max_concurrent=cfg.max_concurrent_trials,
        )
    else:
        from ray.tune.search import BasicVariantGenerator

        # its own max_concurrent: Tune's max_concurrent_trials does not reach a BasicVariantGenerator passed in
        search = BasicVariantGenerator(points_to_evaluate=points or None, random_state=cfg.seed,
                                       max_concurrent=cfg.max_concurrent_trials)  # fmt: skip
    callbacks = [_interrupt_callback(cfg.interrupt_after_trials)] if cfg.interrupt_after_trials > 0 else []
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            search_alg=search, scheduler=scheduler, num_samples=cfg.num_samples,
            time_budget_s=cfg.time_budget_s,  # concurrency: set on the search algorithm above
        ),
        run_config=tune.RunConfig(
            name=exp_path.name, storage_path=str(exp_path.parent), callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=0), verbose=1,
        ),
    )  # fmt: skip
    return tuner, False


def run(cfg: SweepConfig) -> dict:
    """Run (or resume) the sweep; returns the summary written to <sweep dir>/sweep_results.json."""
    import mlflow
    from ray import tune

    train_cfg = validate(cfg)
    defaults = default_point(train_cfg)
    name = cfg.name or f"{train_cfg.preset}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Path(resolve_storage_path(cfg.storage_path))
    exp_path = storage / name
    exp_path.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.mlflow_tracking_uri)
    exp_id = mlflow_experiment(uri, cfg.experiment)
    client = mlflow.MlflowClient(uri)

    from pipelines.train import prepare_dataset

    prepare_dataset(train_cfg)  # the bundled data, generated once here rather than by two trials at the same time
    val_json = str(prepare_dataset(train_cfg, "validation")[0])
    test_json = str(prepare_dataset(train_cfg, "test")[0])

    state_file = exp_path / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("parent_run_id"):
        parent = state["parent_run_id"]
        client.update_run(parent, status="RUNNING")
    else:
        parent = client.create_run(exp_id, run_name=name, tags={"sweep": name, "kind": "sweep",
                                                                "tune.path": str(exp_path)}).info.run_id  # fmt: skip
        for k, v in as_dict(cfg).items():
            client.log_param(parent, k, json.dumps(v) if isinstance(v, (dict, list)) else v)
        client.log_param(parent, "init_from_resolved", train_cfg.init_from)
        state = {"parent_run_id": parent, "name": name}
        state_file.write_text(json.dumps(state, indent=1))

    train_base = as_dict(train_cfg)
    train_base.update(report_every=cfg.val_every, progress=False, registered_model=None)  # the winner registers, not trials
    setup = {
        "name": name, "train": train_base, "searched": sorted(cfg.search_space), "defaults": defaults,
        "parent_run_id": parent, "tracking_uri": uri, "experiment": cfg.experiment,
        "trials_storage": str(storage / f"{name}-trials"), "val_json": val_json,
        "eval_examples": cfg.eval_examples, "eval_batch_size": cfg.eval_batch_size, "max_new_tokens": cfg.max_new_tokens,
    }  # fmt: skip
    started = init_ray(cfg.address)
    t0 = time.perf_counter()
    try:
        # The trial process only waits on its Train run (whose workers hold the CPUs/GPUs) and then scores the
        # checkpoint: it reserves no CPU (else 2 trials + 2 workers would not fit 2 cores) and max_concurrent_trials
        # bounds how many run at once. Tune refuses an empty request, so it asks for a little (logical) memory.
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                        {"cpu": 0, "memory": 256 * 2**20})  # fmt: skip
        tuner, resumed = build_tuner(cfg, trainable, exp_path, defaults, train_cfg.max_steps)
        grid = tuner.fit()
        wall = time.perf_counter() - t0
        # Trial objects carry the status a Result lacks (PENDING/RUNNING/PAUSED at the end = interrupted)
        trials = grid._experiment_analysis.trials
        saved = saved_trial_statuses(exp_path)
        summary = summarise_sweep(cfg, name, trials, saved, defaults, exp_path, wall, resumed)
        finished = len(saved) == cfg.num_samples and all(s in ("TERMINATED", "ERROR") for s in saved.values())
        summary["complete"] = finished
        if not finished:
            print(f"\n[sweep] interrupted with {summary['num_finished']} of {cfg.num_samples} trials finished; resume "
                  f"with the same command and name={name}", flush=True)  # fmt: skip
            client.set_tag(parent, "state", "interrupted")
            client.update_run(parent, status="KILLED")
            return summary
        finish_parent(cfg, client, parent, summary, exp_path, train_cfg, test_json)
        return summary
    finally:
        if started:
            import ray

            ray.shutdown()


def saved_trial_statuses(exp_path: Path) -> dict:
    """trial id -> status as Tune saved it (what Tuner.restore resumes from). After an interruption the in-memory
    trials read TERMINATED, but the saved state keeps the unfinished ones RUNNING/PENDING."""
    files = sorted(exp_path.glob("experiment_state-*.json"))
    if not files:
        return {}
    data = json.loads(files[-1].read_text())
    out = {}
    for entry in data.get("trial_data", []):
        trial = json.loads(entry[0] if isinstance(entry, list) else entry)
        out[trial["trial_id"]] = trial["status"]
    return out


def summarise_sweep(cfg, name, trials, saved, defaults, exp_path, wall, resumed) -> dict:
    """Every trial's parameters, status and (when scored) its curve, best first."""
    rows = []
    for trial in trials:
        m = trial.last_result or {}
        params = {k: trial.config.get(k) for k in sorted(cfg.search_space)}
        trial_id = trial.trial_id
        status = saved.get(trial_id, trial.status)
        row = {"trial_id": trial_id, "status": status, "params": params,
               "paper_defaults": is_paper_default(params, defaults), "steps": m.get("step"),
               "val_loss": m.get("val_loss"), "error": trial.error_file if status == "ERROR" else None}  # fmt: skip
        if "val_auc" in m:
            curve_file = Path(resolve_storage_path(cfg.storage_path)) / f"{name}-trials" / f"{name}-{trial_id}" / "curve.json"
            rec = json.loads(curve_file.read_text())
            row.update(val_auc=m["val_auc"], val_acc_min=m["val_acc_min"], val_acc_full=m["val_acc_full"],
                       curve=rec["curve"], checkpoint=m["final_checkpoint"], mlflow_run_id=m["mlflow_run_id"])  # fmt: skip
        else:
            row["stopped_early"] = status == "TERMINATED"
        rows.append(row)
    rows.sort(key=lambda r: -r.get("val_auc", -1.0))
    scored = [r for r in rows if "val_auc" in r]
    summary = {"name": name, "path": str(exp_path), "wall_s": wall, "resumed": resumed, "trials": rows,
               "num_trials": len(rows), "num_finished": sum(r["status"] in ("TERMINATED", "ERROR") for r in rows),
               "num_scored": len(scored), "best": scored[0] if scored else None}  # fmt: skip
    (exp_path / "sweep_results.json").write_text(json.dumps(summary, indent=1))
    return summary


def finish_parent(cfg, client, parent, summary, exp_path, train_cfg, test_json) -> None:
    """Comparison plot, the winner's train config, the table; children left RUNNING (stopped early) closed."""
    rows = summary["trials"]
    scored = [r for r in rows if "val_auc" in r]
    if not scored:
        client.set_tag(parent, "state", "no trial was scored")
        client.set_terminated(parent, "FAILED")
        raise RuntimeError(f"sweep {summary['name']}: no trial finished and was scored; see {exp_path}")
    best = scored[0]
    curves = []
    for r in scored:
        label = "paper defaults" if r["paper_defaults"] else describe(r["params"])
        style = {"lw": 1.0, "alpha": 0.6}
        if r is best:
            style = {"lw": 2.5, "color": "C3"}
        elif r["paper_defaults"]:
            style = {"lw": 2.0, "color": "k", "ls": "--"}
        curves.append((f"{r['trial_id']} AUC {r['val_auc']:.3f}: {label}"[:130], r["curve"], style))
    plot = plot_curves(curves, exp_path / "comparison.png", f"sweep {summary['name']}: accuracy vs budget per trial")
    exported = export_best(cfg, summary, best, train_cfg)
    summary["exported_config"] = str(exported)
    summary["comparison_plot"] = str(plot)
    if cfg.test_eval:
        summary["test"] = test_scores(cfg, scored, test_json)
    (exp_path / "sweep_results.json").write_text(json.dumps(summary, indent=1))
    table = format_table(summary)
    (exp_path / "table.txt").write_text(table + "\n")

    client.log_metric(parent, "best_val_auc", best["val_auc"])
    client.log_metric(parent, "best_val_acc_min", best["val_acc_min"])
    client.log_metric(parent, "best_val_acc_full", best["val_acc_full"])
    client.log_metric(parent, "num_trials", summary["num_trials"])
    client.log_metric(parent, "num_stopped_early", sum(bool(r.get("stopped_early")) for r in rows))
    client.log_metric(parent, "sweep_wall_s", summary["wall_s"])
    for k, v in best["params"].items():
        client.log_param(parent, f"best.{k}", v)
    client.set_tag(parent, "best_trial", best["trial_id"])
    client.set_tag(parent, "best_checkpoint", best["checkpoint"])
    client.log_artifact(parent, str(plot), artifact_path="plots")
    client.log_artifact(parent, str(exported))
    client.log_artifact(parent, str(exp_path / "sweep_results.json"))
    client.log_artifact(parent, str(exp_path / "table.txt"))
    # trials ASHA stopped (or interrupted and restarted) were killed inside their training run: close those runs
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)  # fmt: skip
    for child in children:
        if child.info.status == "RUNNING":
            client.set_tag(child.info.run_id, "stopped", "early stopped by ASHA or interrupted")
            client.set_terminated(child.info.run_id, "KILLED")
    client.set_tag(parent, "state", "complete")
    client.set_terminated(parent, "FINISHED")
    print("\n" + table)
    print(f"\ncomparison plot: {plot}\nwinner's train config: {exported}\n  python -m pipelines.train --config "
          f"{_rel(exported)}\nMLflow parent run {parent} (experiment {cfg.experiment!r})", flush=True)  # fmt: skip


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(project_path(".").resolve()))
    except ValueError:
        return str(p)


def export_best(cfg: SweepConfig, summary: dict, best: dict, train_cfg) -> Path:
    """The winner as a pipelines train config: the values that differ from TrainConfig's defaults."""
    import yaml

    from pipelines.config import TrainConfig

    values = trial_train_dict(as_dict(train_cfg), best["params"])
    defaults = as_dict(TrainConfig())
    skip = {"name", "storage_path", "mlflow_tracking_uri", "address", "fail_at_step", "fail_marker", "progress"}
    keep = {k: v for k, v in values.items() if k not in skip and v != defaults[k]}
    path = project_path(cfg.export_path) if cfg.export_path else Path(summary["path"]) / "best_train.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# The winner of Ray Tune sweep {summary['name']} (trial {best['trial_id']}): validation AUC "
        f"{best['val_auc']:.4f} (mean accuracy over the budget grid), {best['val_acc_min']:.3f} at the lowest budget, "
        f"{best['val_acc_full']:.3f} at full budget.\n"
        f"# Trains the winner (stage adapt from the same base, the same recipe):\n"
        f"#   python -m pipelines.train --config {_rel(path)}\n"
        f"# Written by python -m tuning.sweep; searched keys: {', '.join(sorted(best['params']))}.\n"
    )  # fmt: skip
    path.write_text(header + yaml.safe_dump(keep, sort_keys=False))
    return path


def test_scores(cfg, scored, test_json) -> list[dict]:
    """The best and the fixed (paper-default) trials on the test split: reported, never used to pick."""
    picks = [scored[0]] + [r for r in scored[1:] if r["paper_defaults"]]
    out = []
    for r in picks:
        curve = budget_curve(r["checkpoint"], test_json, -1, cfg.eval_batch_size, cfg.max_new_tokens)
        out.append({"trial_id": r["trial_id"], "paper_defaults": r["paper_defaults"], "curve": curve})
    return out


def format_table(summary: dict) -> str:
    rows = summary["trials"]
    keys = sorted(rows[0]["params"]) if rows else []
    head = f"{'trial':>11} {'val AUC':>8} {'acc@min':>8} {'acc@1.0':>8} {'val_loss':>8}  " + " ".join(f"{k:>12}" for k in keys)
    lines = [f"Sweep {summary['name']}: {summary['num_trials']} trials, {summary['wall_s'] / 60:.1f} min "
             f"(validation split; best first)", head, "-" * len(head)]  # fmt: skip
    for r in rows:
        auc = f"{r['val_auc']:>8.4f} {r['val_acc_min']:>8.3f} {r['val_acc_full']:>8.3f}" if "val_auc" in r else (
            f"{'stopped' if r.get('stopped_early') else (r['status'] or '?').lower():>8} {'':>8} {'':>8}")
        vl = f"{r['val_loss']:>8.4f}" if isinstance(r.get("val_loss"), float) else f"{'':>8}"
        mark = "*" if r["paper_defaults"] else " "
        lines.append(f"{r['trial_id']:>10}{mark} {auc} {vl}  " + " ".join(f"{_fmt(r['params'][k]):>12}" for k in keys))
    lines.append("* = the paper's defaults (every extra weight 0, uniform budgets, the train config's lr, tau 5)")
    for t in summary.get("test", []):
        c = t["curve"]
        lines.append(f"test split, trial {t['trial_id']}{' (paper defaults)' if t['paper_defaults'] else ''}: AUC "
                     f"{c['auc']:.4f}; " + ", ".join(f"{b:.3f}: {a:.3f}" for b, a in zip(c["budgets"], c["accuracy"])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tuning.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file (tuning/configs/*.yaml)")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. num_samples=4 train.max_steps=50 "
                                                     "'search_space.gamma={uniform: [-1, 1]}'")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        cfg = load_sweep_config(args.config, args.overrides)
        if args.address:
            cfg.address = args.address
        validate(cfg)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    summary = run(cfg)
    return 0 if summary.get("complete") else 3


if __name__ == "__main__":
    sys.exit(main())
