"""registry/: a checkpoint registered as a model version, resolved back by version and by alias into a cache folder
keyed by the version (a second resolve downloads nothing), every missing name/version/alias an error naming the URI,
and pipelines.evaluate on a registry URI tagging that version with its accuracy per budget. MLflow on sqlite, no Ray."""

import json
from pathlib import Path

import pytest

from registry import RegistryError, attach_evaluation, local_model, parse_uri, pinned_uri, register_checkpoint, resolve


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store with one run whose `model/` artifacts are a tiny checkpoint, registered twice."""
    import mlflow

    from adallava import presets

    root = tmp_path_factory.mktemp("registry")
    ckpt = root / "ckpt"
    model, processor = presets.build_tiny(seed=0)
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=(root / "mlruns").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.log_artifacts(run_id, str(ckpt), artifact_path="model")
    v1 = register_checkpoint(run_id, "adallava", tags={"preset": "tiny", "granularity": "layer"}, tracking_uri=uri)
    v2 = register_checkpoint(run_id, "adallava", tags={"preset": "tiny"}, tracking_uri=uri)
    client.set_registered_model_alias("adallava", "prod", v2.version)
    return {"root": root, "uri": uri, "run_id": run_id, "client": client, "v1": v1, "v2": v2, "ckpt": ckpt}


def test_register_creates_versions_with_run_and_tags(store):
    v1, v2 = store["v1"], store["v2"]
    assert (str(v1.version), str(v2.version)) == ("1", "2")
    got = store["client"].get_model_version("adallava", "1")
    assert got.run_id == store["run_id"] and got.source == f"runs:/{store['run_id']}/model"
    assert got.tags == {"preset": "tiny", "granularity": "layer"}


def test_version_and_alias_resolve_into_a_cache_keyed_by_version(store, tmp_path, monkeypatch):
    import mlflow

    from adallava import presets

    by_version = Path(local_model("models:/adallava/2", store["uri"], cache_dir=tmp_path))
    by_alias = Path(local_model("models:/adallava@prod", store["uri"], cache_dir=tmp_path))
    assert by_alias == by_version and by_version.parts[-2:] == ("adallava", "2")
    assert json.loads((by_version / "config.json").read_text()) == json.loads((store["ckpt"] / "config.json").read_text())
    assert not list(by_version.parent.glob("*.partial*"))
    model, _ = presets.load(by_version)
    assert model.config.granularity == "layer"
    # a restart finds the folder: no second download
    calls = []
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda **kw: calls.append(kw))
    assert local_model("models:/adallava/2", store["uri"], cache_dir=tmp_path) == str(by_version)
    assert calls == []
    # not a registry URI: returned as given
    assert local_model("tiny") == "tiny" and local_model("/some/dir") == "/some/dir"
    # an alias is pinned to the version it names now
    assert pinned_uri("models:/adallava@prod", store["uri"]) == "models:/adallava/2"


@pytest.mark.parametrize(
    "uri, message",
    [
        ("models:/nope/1", r"models:/nope/1: no registered model named 'nope'"),
        ("models:/adallava/9", r"models:/adallava/9: model 'adallava' has no version 9"),
        ("models:/adallava@staging", r"models:/adallava@staging: model 'adallava' has no alias 'staging'"),
    ],
)
def test_missing_name_version_or_alias_names_the_uri(store, uri, message, tmp_path):
    with pytest.raises(RegistryError, match=message):
        resolve(uri, store["uri"])
    with pytest.raises(RegistryError, match=message):
        local_model(uri, store["uri"], cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-downloaded


@pytest.mark.parametrize("uri", ["models:/adallava", "models:/adallava/latest", "models:/a/b/1", "models:/@prod"])
def test_malformed_registry_uri_is_refused_by_name(uri):
    with pytest.raises(RegistryError, match=f"registry URI '{uri}'"):
        parse_uri(uri)


def test_missing_store_and_missing_artifacts_are_errors(store, tmp_path):
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    with pytest.raises(RegistryError, match=r"models:/adallava/1: no MLflow database at .*none\.db"):
        resolve("models:/adallava/1", missing)
    assert not (tmp_path / "none.db").exists()  # not created as a side effect
    empty_run = store["client"].create_run(store["client"].get_experiment_by_name("t").experiment_id).info.run_id
    with pytest.raises(RegistryError, match=f"run {empty_run} has no model/config.json artifact"):
        register_checkpoint(empty_run, "adallava", tracking_uri=store["uri"])


def test_attach_evaluation_tags_accuracy_per_budget(store):
    pinned = attach_evaluation("models:/adallava@prod", {0.5: 0.728, 1.0: 0.7825}, run_id="abc", tracking_uri=store["uri"])
    assert pinned == "models:/adallava/2"
    tags = store["client"].get_model_version("adallava", "2").tags
    assert (tags["accuracy/0.500"], tags["accuracy/1.000"], tags["evaluation_run_id"]) == ("72.8", "78.2", "abc")


def test_evaluate_a_registered_model_tags_its_version(store, tmp_path, monkeypatch):
    from adallava.data import generate_bundled
    from pipelines import evaluate
    from pipelines.config import EvalConfig

    monkeypatch.setenv("ADALLAVA_MODEL_CACHE", str(tmp_path / "cache"))
    data = generate_bundled(tmp_path / "data", seed=0, num_train=0, num_validation=0, num_test=6, progress=False)
    cfg = EvalConfig(model="models:/adallava/1", dataset=str(data["test"]), image_root=str(tmp_path / "data"),
                     max_examples=6, budgets=[0.5, 1.0], methods=["adallava"], latency_samples=1, num_qualitative=0,
                     output_dir=str(tmp_path / "eval"), mlflow_tracking_uri=store["uri"], experiment="t", progress=False)  # fmt: skip
    report = evaluate.run(cfg)
    assert report["registered_model"] == "models:/adallava/1"
    assert (tmp_path / "cache").is_dir() and list((tmp_path / "cache").glob("*/adallava/1/config.json"))
    tags = store["client"].get_model_version("adallava", "1").tags
    for key, s in report["results"]["adallava"].items():
        assert tags[f"accuracy/{float(key):.3f}"] == f"{100 * s['accuracy']:.1f}"
    assert tags["evaluation_run_id"] == report["mlflow_run_id"]
    run = store["client"].get_run(report["mlflow_run_id"])
    assert run.data.tags["model"] == "models:/adallava/1"
