"""Ray Tune sweeps on a real local Ray cluster: Train inside Tune trials, ASHA, MLflow parent/child runs on sqlite,
the comparison plot, the exported winner that trains, an interrupted sweep that resumes, a bad config refused.

One module-scoped cluster (2 CPUs); tiny data and a random-init tiny base (trials adapt it, never retrain it)."""

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

SMOKE = Path(__file__).resolve().parents[2] / "tuning" / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from adallava.data import generate_bundled
    from adallava.presets import build_tiny

    root = tmp_path_factory.mktemp("sweep")
    generate_bundled(root / "data", seed=0, num_train=48, num_validation=16, num_test=16, progress=False)
    model, processor = build_tiny(seed=0)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    return root


def _cfg(work, name, *overrides):
    from tuning.config import load_sweep_config

    return load_sweep_config(SMOKE, [
        f"name={name}", f"init_from={work / 'base'}", f"train.data_dir={work / 'data'}", "train.num_train=48",
        "train.num_validation=16", "train.num_test=16", f"storage_path={work / 'runs'}",
        f"mlflow_tracking_uri=sqlite:///{work / 'mlflow.db'}", "experiment=test-sweeps", "eval_examples=16",
        *overrides,
    ])  # fmt: skip


def _client(work):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")


def _runs(work, filter_string):
    client = _client(work)
    exp = client.get_experiment_by_name("test-sweeps")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string, max_results=100)


@pytest.fixture(scope="module")
def sweep(ray_cluster, work):
    from tuning import sweep

    return sweep.run(_cfg(work, "smoke", "num_samples=3"))


def test_sweep_writes_parent_and_child_runs_plot_and_exported_config(sweep, work):
    client = _client(work)
    assert sweep["complete"] and sweep["num_trials"] == 3
    parents = _runs(work, "tags.kind = 'sweep' and tags.sweep = 'smoke'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["state"] == "complete"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_train.yaml", "sweep_results.json", "table.txt", "plots"} <= arts
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == ["plots/comparison.png"]
    assert Path(sweep["comparison_plot"]).stat().st_size > 10_000
    assert parent.data.metrics["best_val_auc"] == sweep["best"]["val_auc"]

    children = _runs(work, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(r["trial_id"] for r in sweep["trials"])
    assert all(c.info.status in ("FINISHED", "KILLED", "FAILED") for c in children)  # none left RUNNING
    scored = [c for c in children if "val_auc" in c.data.metrics]
    assert scored and len(scored) == sweep["num_scored"]
    paper = [c for c in children if c.data.tags["paper_defaults"] == "true"]
    assert len(paper) == 1 and json.loads(paper[0].data.params["loss_weights"]) == {
        "gamma": 0.0, "distill": 0.0, "budget_dist": "uniform", "budget_alpha": 1.0, "budget_beta": 1.0}
    for child in scored:
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [500, 625, 750, 875, 1000]  # the tiny model's budget grid, in permille
        auc = sum(m.value for m in history) / len(history)
        assert child.data.metrics["val_auc"] == pytest.approx(auc)
        assert child.data.metrics["val_acc_min"] == history[0].value and child.data.metrics["val_acc_full"] == history[-1].value
        assert {"curve.json", "curve.png"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
        assert (Path(child.data.tags["checkpoint"]) / "config.json").is_file()
        assert {"search.gamma", "search.lr", "search.gumbel_tau"} <= set(child.data.params)
        # the intermediate metric ASHA acts on was logged during training
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")] == [3, 6]
    best = next(c for c in scored if c.info.run_id == sweep["best"]["mlflow_run_id"])
    assert best.data.metrics["val_auc"] == max(c.data.metrics["val_auc"] for c in scored)  # ties: any of them


def test_exported_config_trains_the_winner(sweep, work):
    from pipelines import train
    from pipelines.config import TrainConfig, load_config

    exported = Path(sweep["exported_config"])
    head = exported.read_text().splitlines()[:3]
    assert any(f"python -m pipelines.train --config {exported}" in line for line in head)
    best = sweep["best"]["params"]
    cfg = load_config(TrainConfig, exported, [
        "max_steps=2", "checkpoint_every=2", "val_every=0", "name=winner", f"storage_path={work / 'runs'}",
        f"mlflow_tracking_uri=sqlite:///{work / 'mlflow.db'}", "experiment=test-sweeps", "progress=false",
    ])  # fmt: skip
    assert cfg.stage == "adapt" and cfg.init_from == str(work / "base")
    assert cfg.loss_weights == {k: best[k] for k in cfg.loss_weights} and cfg.lr == best["lr"]
    out = train.run(cfg)
    assert train.read_state(out.final_checkpoint)["step"] == 2
    saved = json.loads((out.final_checkpoint / "config.json").read_text())
    assert saved["gumbel_tau"] == pytest.approx(best["gumbel_tau"])  # tau reached the model


def test_interrupted_sweep_resumes_keeping_finished_trials(ray_cluster, work):
    from tuning import sweep

    overrides = ("num_samples=2", "max_concurrent_trials=1", "scheduler=none", "interrupt_after_trials=1")
    first = sweep.run(_cfg(work, "resume", *overrides))
    assert not first["complete"] and first["num_scored"] == 1
    done = next(r for r in first["trials"] if "val_auc" in r)
    curve_file = work / "runs" / "resume-trials" / f"resume-{done['trial_id']}" / "curve.json"
    stamp = curve_file.stat().st_mtime_ns
    parent = _runs(work, "tags.kind = 'sweep' and tags.sweep = 'resume'")
    assert len(parent) == 1 and parent[0].data.tags["state"] == "interrupted"

    second = sweep.run(_cfg(work, "resume", *overrides))  # the same command
    assert second["complete"] and second["resumed"] and second["num_trials"] == 2 and second["num_scored"] == 2
    again = next(r for r in second["trials"] if r["trial_id"] == done["trial_id"])
    assert again["val_auc"] == done["val_auc"] and curve_file.stat().st_mtime_ns == stamp  # kept, not rerun
    parents = _runs(work, "tags.kind = 'sweep' and tags.sweep = 'resume'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same parent run, completed
    children = _runs(work, f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert [c.data.tags["trial_id"] for c in children].count(done["trial_id"]) == 1


def test_bad_config_is_rejected_before_any_trial(ray_cluster, work):
    from tuning import sweep

    cfg = _cfg(work, "bad", "search_space.budget_dist={choice: [uniform, gaussian]}")
    with pytest.raises(ValueError, match="search_space.budget_dist"):
        sweep.run(cfg)
    assert not (work / "runs" / "bad").exists()
    assert not _runs(work, "tags.sweep = 'bad'")
