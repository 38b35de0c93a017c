"""Training and evaluation pipelines on a real local Ray cluster (Ray Train V2, DDP over gloo) with MLflow on sqlite.

One module-scoped cluster; a 2-worker base run whose checkpoint the other tests start from."""

import json
import sqlite3
from pathlib import Path

import pytest
from tiny_training import tiny_train_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from adallava.data import generate_bundled

    root = tmp_path_factory.mktemp("pipelines")
    generate_bundled(root / "data", seed=0, num_train=48, num_validation=8, num_test=24)
    return root


def _cfg(work, **kw):
    return tiny_train_config(work, 48, 24, **kw)


def _metrics(db, run_id, key):
    con = sqlite3.connect(db)
    try:
        return con.execute("select step, value from metrics where run_uuid=? and key=? order by step",
                           (run_id, key)).fetchall()  # fmt: skip
    finally:
        con.close()


@pytest.fixture(scope="module")
def base_run(ray_cluster, work):
    from pipelines import train

    return train.run(_cfg(work, stage="base", name="base", max_steps=4, checkpoint_every=2, num_to_keep=2))


def test_two_worker_base_run_checkpoints_load_and_generate(base_run, work):
    import mlflow
    import torch

    from adallava import presets
    from pipelines.train import read_state

    final = base_run.final_checkpoint
    assert final is not None and final.parent == work / "runs" / "base"
    state = read_state(final)
    assert state["step"] == 4 and state["total_steps"] == 4 and state["stage"] == "base"
    # 2 workers x 4 per micro-batch x 1 accumulation step: 8 samples per step
    assert state["micro_batch"] == 4 and state["samples"] == 32
    assert sorted(p.name for p in final.parent.glob("checkpoint_0*")) == ["checkpoint_0000002", "checkpoint_0000004"]
    assert not list(final.parent.glob("*.partial"))
    model, processor = presets.load(final)
    batch = processor(images=[__import__("PIL.Image").Image.new("RGB", (32, 32), "red")],
                      text=["USER: <image>\nWhat colour is the shape? ASSISTANT:"], return_tensors="pt")  # fmt: skip
    out = model.generate(**batch, budget=0.625, max_new_tokens=3, return_dict_in_generate=True)
    assert out.sequences.shape[1] > batch["input_ids"].shape[1]
    assert torch.equal(out.execution_plan[0, 4:].sum(), torch.tensor(1.0))  # k(0.625) = 1 of 4 schedulable layers
    # the saved weights are the trained ones, not the random init
    fresh, _ = presets.build_tiny(seed=0)
    assert not torch.equal(fresh.lm_head.weight, model.lm_head.weight)

    db = str(work / "mlflow.db")
    run = mlflow.MlflowClient(f"sqlite:///{db}").get_run(base_run.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.tags["stage"], run.data.tags["preset"], run.data.tags["dataset"]) == ("base", "tiny", "bundled")
    assert run.data.params["num_workers"] == "2" and run.data.params["stage"] == "base"
    assert [s for s, _ in _metrics(db, base_run.mlflow_run_id, "loss")] == [1, 2, 3, 4]
    assert all(v > 0 for _, v in _metrics(db, base_run.mlflow_run_id, "samples_per_s"))
    arts = {a.path for a in mlflow.MlflowClient(f"sqlite:///{db}").list_artifacts(base_run.mlflow_run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/train_state.json"} <= arts
    assert "model/optimizer.pt" not in arts
    assert base_run.bad_records["skipped"] == 0 and base_run.bad_records["total_records"] == 48


def test_killed_worker_resumes_from_last_checkpoint(base_run, work, tmp_path):
    """A worker process dies at step 5 (os._exit, once); the group restarts and resumes from a checkpoint of this
    adapt run (every 2 steps), then finishes. The step-2 checkpoint is surely registered by then (report() blocks
    until the previous report is consumed); the step-4 one may still be in flight when the worker dies."""
    from pipelines import train
    from pipelines.train import read_state

    marker = tmp_path / "failed-once"
    out = train.run(_cfg(
        work, stage="adapt", name="adapt-resume", init_from=str(base_run.final_checkpoint), max_steps=6,
        checkpoint_every=2, max_failures=1, fail_at_step=5, fail_marker=str(marker),
    ))  # fmt: skip
    assert marker.exists() and "exited at step 5" in marker.read_text()
    resumed = out.result.metrics["resumed_from_step"]
    assert resumed in (2, 4) and out.result.metrics["step"] == 6
    state = read_state(out.final_checkpoint)
    assert state["step"] == 6 and state["micro_batch"] == 6  # data position carried over the restart
    assert state["run_id"] == out.mlflow_run_id
    steps = [s for s, _ in _metrics(str(work / "mlflow.db"), out.mlflow_run_id, "loss")]
    # one MLflow run across the restart: every step logged, the ones redone after the checkpoint twice
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
    assert all(steps.count(s) == 2 for s in range(resumed + 1, 5)) and steps.count(6) == 1


def test_unknown_init_and_missing_base_are_clear_errors(work):
    from pipelines import train

    with pytest.raises(ValueError, match="init_from"):
        train.validate(_cfg(work, stage="adapt"))
    with pytest.raises(FileNotFoundError, match="init_from"):
        train.validate(_cfg(work, stage="adapt", init_from=str(work / "nope")))


def test_evaluation_writes_json_plots_and_mlflow_run(base_run, work, tmp_path):
    import mlflow

    from pipelines import evaluate
    from pipelines.config import EvalConfig

    ckpt = str(base_run.final_checkpoint)
    cfg = EvalConfig(
        model=ckpt, base=ckpt, data_dir=str(work / "data"), max_examples=12, batch_size=8, max_new_tokens=3,
        latency_samples=2, num_qualitative=2, output_dir=str(tmp_path / "eval"), progress=False,
        mlflow_tracking_uri=f"sqlite:///{work / 'mlflow.db'}", experiment="test-eval",
    )  # fmt: skip
    report = evaluate.run(cfg)
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    budgets = [0.5, 0.625, 0.75, 0.875, 1.0]
    assert res["budgets"] == budgets
    for method in ("adallava", "early_exit", "random_skip"):
        assert [v["budget"] for v in res["results"][method].values()] == budgets
        for v in res["results"][method].values():
            # a count of correct answers out of 12 (not an average of something else), timings measured
            assert v["n"] == 12 and v["accuracy"] * 12 == pytest.approx(round(v["accuracy"] * 12), abs=1e-9)
            assert v["prefill_ms"] > 0 and v["per_token_ms"] > 0
            # every method runs exactly the budget's number of schedulable layers: 4 prefix + k(b)
            assert sum(v["layer_usage"]) == pytest.approx(8 * v["budget"])
    assert list(res["results"]["full"]) == ["1.0000"]
    usage = res["results"]["early_exit"]["0.7500"]["layer_usage"]
    assert usage == [1, 1, 1, 1, 1, 1, 0, 0]  # early exit = the first k schedulable layers
    flops = [v["flops"] for v in res["results"]["adallava"].values()]
    assert flops == sorted(flops) and flops[0] < flops[-1]
    for name in ("accuracy_vs_budget.png", "accuracy_vs_latency.png", "layer_usage.png", "qualitative.png"):
        assert (tmp_path / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = mlflow.MlflowClient(cfg.mlflow_tracking_uri)
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.tags["stage"] == "evaluate"
    assert "accuracy/adallava" in run.data.metrics and "prefill_ms/early_exit" in run.data.metrics
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/qualitative.png" in plots and "plots/layer_usage.png" in plots
    assert "AdaLLaVA" in report["table"] and "early exit" in report["table"]


def test_rerunning_with_the_same_name_resumes_from_the_latest_checkpoint(base_run, work):
    """A fresh train.run with the base run's name (the module's last test: it extends that run) starts from its
    step-4 checkpoint, not from scratch: it logs steps 5 and 6 only, and the data position and sample count carry on.
    The workers read the checkpoint where it is (local storage): no copy of it is left in the temporary folder (Ray's
    to_directory() left one there per resume, 1.6 GB for the smol preset)."""
    import tempfile

    from pipelines import train
    from pipelines.train import read_state

    copies = lambda: set(Path(tempfile.gettempdir()).glob("checkpoint_tmp_*"))  # noqa: E731
    before = copies()
    out = train.run(_cfg(work, stage="base", name="base", max_steps=6, checkpoint_every=2, num_to_keep=2))
    assert copies() - before == set()
    assert out.result.metrics["resumed_from_step"] == 4 and out.result.metrics["step"] == 6
    state = read_state(out.final_checkpoint)
    assert (state["step"], state["micro_batch"], state["samples"]) == (6, 6, 48)
    assert out.final_checkpoint.parent == base_run.final_checkpoint.parent
    assert [s for s, _ in _metrics(str(work / "mlflow.db"), out.mlflow_run_id, "loss")] == [5, 6]


def test_the_cluster_knows_its_own_state_api_whatever_else_runs_here(ray_cluster):
    """Ray Train's PlacementGroupCleaner (inside the cluster) asks the state API whether the controller is alive; with
    no address it scans the machine for "the" cluster and dies on "Found multiple active Ray instances" when another
    Ray runs here, leaking the placement groups of stopped trials. start_local_ray names its own dashboard instead."""
    import os

    import ray
    from ray._private.worker import _global_node
    from ray.util.state import list_actors

    address = os.environ["RAY_API_SERVER_ADDRESS"]
    assert address == "http://" + _global_node.webui_url  # this cluster's dashboard, not another one's

    @ray.remote(num_cpus=0)
    def seen_inside():  # what Train's own actors see: the raylet's workers inherit the address
        return os.environ.get("RAY_API_SERVER_ADDRESS"), len(list_actors(filters=[("state", "=", "ALIVE")]))

    inside, n_alive = ray.get(seen_inside.remote())
    assert inside == address and n_alive == len(list_actors(filters=[("state", "=", "ALIVE")]))
