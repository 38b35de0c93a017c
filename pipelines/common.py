"""What train, evaluate and demo share: joining or starting Ray, and the MLflow experiment. Heavy imports stay inside
the functions, so that `--help` is instant."""

from __future__ import annotations

import os
import sys

from .config import PROJECT_DIR, tracking_uri

# Loopback-only, quiet Ray (see ../shared/reference/environment.md): without the first Ray binds a non-loopback
# address even when told 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not sys.stdout.isatty():  # output to a file or `ray job logs`: plain lines, no bars or colour codes
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # around the "(RayTrainWorker pid=...)" prefix
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # registry downloads


def init_ray(address: str | None = None) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS, as `ray job submit` sets it) or start a local one on
    127.0.0.1. Returns True if this call started Ray (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray(configure_logging=True, logging_level="warning")
    return True


def start_local_ray(**kwargs):
    """A new local Ray cluster on 127.0.0.1 with its dashboard (without it Train V2 prints a state-API error every
    second), on a free port that this process and every process of the cluster know as RAY_API_SERVER_ADDRESS.
    Ray Train's state-API calls made inside the cluster (its PlacementGroupCleaner asks whether the controller is
    alive) otherwise look for "the" cluster among the machine's processes and fail with "Found multiple active Ray
    instances" when another Ray runs on the same machine (another job, a test run): the cleaner's thread dies and
    the placement groups of stopped trials leak, so the next training waits forever for CPUs."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # set before ray.init: the raylet and the workers it starts inherit this process's environment
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return ray.init(address="local", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
                    include_dashboard=True, dashboard_port=port, **kwargs)  # fmt: skip


def mlflow_experiment(uri: str | None, name: str) -> str:
    """Point MLflow at `uri` (default sqlite:///<project>/mlflow.db) and return the id of experiment `name`, creating
    it with its artifacts under <project>/mlruns when the store is local."""
    import mlflow

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:") or "://" not in uri:
        # next to the sqlite file, not wherever the command happened to be started
        db = uri.split("sqlite:///", 1)[-1] if uri.startswith("sqlite:") else uri
        artifact_location = (os.path.dirname(os.path.abspath(db)) or str(PROJECT_DIR)) + "/mlruns"
        artifact_location = "file://" + artifact_location
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created meanwhile by another process
        return mlflow.get_experiment_by_name(name).experiment_id
