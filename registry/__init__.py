"""The MLflow Model Registry side of a checkpoint's life: register a trained checkpoint as a new version of a
registered model, and turn `models:/<name>/<version>` or `models:/<name>@<alias>` back into a local
save_pretrained folder that `adallava.presets.load` opens.

    from registry import register_checkpoint, local_model
    mv = register_checkpoint(run_id, "adallava", tags={"preset": "tiny"})   # the run's `model/` artifacts
    path = local_model("models:/adallava@prod")                              # downloaded once per version

Its own package because both ends of the platform path need it: pipelines/ registers (train) and resolves
(evaluate), serve/ resolves (deploy), and serve/ must never import pipelines/; adallava/ stays free of MLflow. It
imports MLflow only inside functions, so importing it costs nothing.

The model version's source is `runs:/<run id>/model`, the save_pretrained folder that pipelines.train logs as the
run's artifacts: the registry points at those artifacts instead of copying them (a 7B checkpoint is 14 GB).
Downloads go to a cache folder keyed by the tracking URI, the name and the version (never the alias, which moves),
so a replica that restarts, or a second replica on the same node, finds the folder already there.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

SCHEME = "models:/"
ARTIFACT_PATH = "model"  # where pipelines.train logs the save_pretrained folder in its MLflow run
COMPLETE = ".adallava-download-complete"  # written last: a cache folder without it is a partial download
PROJECT_DIR = Path(os.environ.get("ADALLAVA_HOME") or Path(__file__).resolve().parent.parent)


class RegistryError(LookupError):
    """A registry URI that names no model version (missing name, version or alias), or a malformed one."""


@dataclass(frozen=True)
class ModelRef:
    uri: str
    name: str
    version: str | None = None  # exactly one of version and alias
    alias: str | None = None


def is_registry_uri(model: object) -> bool:
    return isinstance(model, str) and model.startswith(SCHEME)


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the project's sqlite file: the same default as pipelines/ (pipelines.config)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_DIR / 'mlflow.db'}"


def default_cache_dir() -> Path:
    return Path(os.environ.get("ADALLAVA_MODEL_CACHE") or Path.home() / ".cache" / "adallava" / "models")


def parse_uri(uri: str) -> ModelRef:
    """`models:/<name>/<version>` or `models:/<name>@<alias>` -> ModelRef; anything else is a RegistryError naming it.
    (`models:/<name>/latest` and stages are not taken: a deployment names a version or an alias.)"""
    if not is_registry_uri(uri):
        raise RegistryError(f"{uri!r} is not a registry URI (expected models:/<name>/<version> or models:/<name>@<alias>)")
    rest = uri[len(SCHEME) :]
    m = re.fullmatch(r"([^/@]+)/(\d+)", rest)
    if m:
        return ModelRef(uri, m.group(1), version=m.group(2))
    m = re.fullmatch(r"([^/@]+)@([A-Za-z0-9_\-]+)", rest)
    if m:
        return ModelRef(uri, m.group(1), alias=m.group(2))
    raise RegistryError(
        f"registry URI {uri!r}: expected models:/<name>/<version> (a number) or models:/<name>@<alias>"
    )


def _client(tracking_uri: str | None, about: str = "registry"):
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :]
        if not Path(db).is_file():  # MLflow would create an empty store here and report "model not found"
            raise RegistryError(f"{about}: no MLflow database at {db} (tracking URI {uri}); set MLFLOW_TRACKING_URI")
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def resolve(uri: str, tracking_uri: str | None = None):
    """The mlflow ModelVersion a registry URI names now (an alias is read at this moment). A name, version or alias
    that does not exist is a RegistryError naming the URI and the tracking URI."""
    from mlflow.exceptions import MlflowException

    ref = parse_uri(uri)
    client, turi = _client(tracking_uri, about=uri)
    try:
        client.get_registered_model(ref.name)
    except MlflowException:
        raise RegistryError(f"{uri}: no registered model named {ref.name!r} in the registry at {turi}") from None
    try:
        if ref.version is not None:
            return client.get_model_version(ref.name, ref.version)
        return client.get_model_version_by_alias(ref.name, ref.alias)
    except MlflowException:
        what = f"version {ref.version}" if ref.version is not None else f"alias {ref.alias!r}"
        raise RegistryError(f"{uri}: model {ref.name!r} has no {what} in the registry at {turi}") from None


def pinned_uri(uri: str, tracking_uri: str | None = None) -> str:
    """models:/<name>/<version> for any registry URI: a deployment pins the version an alias names at deploy time,
    so that every replica serves the same weights even if the alias moves meanwhile."""
    mv = resolve(uri, tracking_uri)
    return f"{SCHEME}{mv.name}/{mv.version}"


def local_model(model: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None) -> str:
    """A local folder for `model`: a registry URI is downloaded (once per version, see the module doc); anything
    else (a preset name, a checkpoint folder) is returned unchanged."""
    if not is_registry_uri(model):
        return model
    import mlflow

    mv = resolve(model, tracking_uri)
    turi = tracking_uri or default_tracking_uri()
    key = hashlib.sha1(turi.encode()).hexdigest()[:12]
    target = Path(cache_dir or default_cache_dir()) / key / urllib.parse.quote(mv.name, safe="") / str(mv.version)
    if (target / COMPLETE).is_file():
        return str(target)
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if not sys.stderr.isatty():  # MLflow's download bar writes carriage returns into log files
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # the version's own download location (runs:/<run id>/model), read through this client: MLflow's models:/
    # artifact repository would consult the process-wide registry URI instead of `tracking_uri`
    client, _ = _client(tracking_uri, about=model)
    source = client.get_model_version_download_uri(mv.name, str(mv.version))
    got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging), tracking_uri=turi))
    if not (got / "config.json").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise RegistryError(f"{model}: version {mv.version} (source {mv.source}) holds no save_pretrained folder")
    (got / COMPLETE).write_text(f"{mv.name} {mv.version} {mv.source}\n")
    try:
        os.replace(got, target)  # atomic; a replica that lost the race keeps the other's complete copy
    except OSError:
        if not (target / COMPLETE).is_file():
            shutil.rmtree(staging, ignore_errors=True)
            raise
    shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def register_checkpoint(run_id: str, name: str, tags: dict | None = None, tracking_uri: str | None = None,
                        source: str | None = None):  # fmt: skip
    """A new version of registered model `name` (created on first use) whose source is the run's `model/` artifacts
    (the save_pretrained folder pipelines.train logs), or `source` (a checkpoint in remote storage, s3://...);
    `tags` go on the version. Returns the ModelVersion."""
    from mlflow.exceptions import MlflowException

    client, _ = _client(tracking_uri, about=f"registering run {run_id} as {name!r}")
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="AdaLLaVA checkpoints (pipelines.train stage adapt)")
        except MlflowException:  # created meanwhile by another run
            client.get_registered_model(name)
    if source is None:
        if not any(f.path == f"{ARTIFACT_PATH}/config.json" for f in client.list_artifacts(run_id, ARTIFACT_PATH)):
            raise RegistryError(f"run {run_id} has no {ARTIFACT_PATH}/config.json artifact: nothing to register")
        source = f"runs:/{run_id}/{ARTIFACT_PATH}"
    return client.create_model_version(name, source=source, run_id=run_id,
                                       tags={k: str(v) for k, v in (tags or {}).items()})  # fmt: skip


def attach_evaluation(uri: str, accuracy: dict, run_id: str | None = None, tracking_uri: str | None = None) -> str:
    """Tag the model version a registry URI names with the evaluation's accuracy per budget (`accuracy/<budget>`,
    in %) and the evaluation run's id; the run's metrics hold the rest. Returns the pinned URI tagged."""
    mv = resolve(uri, tracking_uri)
    client, _ = _client(tracking_uri)
    for budget, acc in sorted(accuracy.items()):
        client.set_model_version_tag(mv.name, mv.version, f"accuracy/{float(budget):.3f}", f"{100 * float(acc):.1f}")
    if run_id:
        client.set_model_version_tag(mv.name, mv.version, "evaluation_run_id", run_id)
    return f"{SCHEME}{mv.name}/{mv.version}"
