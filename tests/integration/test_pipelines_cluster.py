"""The cluster side: ray_cluster.yaml validates against the schema that ships with Ray (and Ray's own prepare +
validate), and a training job sent with `ray job submit` to a local head node (started and stopped here, by pid)
succeeds."""

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_cluster_config_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and {"cpu_worker", "gpu_worker"} <= set(types)
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("p", "g"))
    assert any("pip install" in c and "-e ." in c for c in prepared["setup_commands"])
    # the schema rejects what it should: a typo in a node type's fields is an error, not ignored
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(broken, schema)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node(tmp_path):
    """`ray start --head --block` on loopback, in its own process group; stopped by killing that group."""
    port, dash = _free_port(), _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{BIN}:{os.environ['PATH']}",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "w")
    # a short session folder: Ray's unix sockets live there and their paths must stay under 108 characters
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         # every agent port free too: the defaults (52365, ...) may be held by another Ray on this machine, and a
         # head whose job agent cannot bind answers every submission with "No available agent"
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}", "--num-cpus=2", "--include-dashboard=true",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        for _ in range(240):  # bounded polls, each ending as soon as the dashboard answers
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(tmp_path / 'head.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # answering (401 without the token): the head is up
                break
            except Exception:
                time.sleep(1)
        else:
            raise RuntimeError("the head node's dashboard did not come up in 240 polls")
        yield address, env
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the process group this fixture started, nothing else
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_a_training_job(head_node, tmp_path):
    address, env = head_node
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps({"env_vars": {"ADALLAVA_HOME": str(tmp_path)}}), "--",
        "python", "-m", "pipelines.train", "--config", "pipelines/configs/tiny_base.yaml", "max_steps=2",
        "num_workers=1", "micro_batch_size=4", "global_batch_size=4", "checkpoint_every=2", "num_train=24",
        "num_validation=4", "num_test=8", "name=submitted", "progress=false",
    ]  # fmt: skip
    for _ in range(12):  # the dashboard answers before its job agent is ready: retry only that refusal
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
        out = done.stdout + done.stderr
        if "No available agent to submit job" not in out:
            break
        time.sleep(5)
    assert done.returncode == 0, out[-4000:]
    assert "succeeded" in out
    # ADALLAVA_HOME put the run, its data and MLflow under tmp_path instead of the job's unpacked working dir
    ckpt = tmp_path / "runs" / "submitted" / "checkpoint_0000002"
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == 2
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "data" / "bundled" / "train.json").is_file()
