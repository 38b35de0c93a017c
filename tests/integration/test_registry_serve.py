"""The platform path's last step: `python -m serve --model models:/<name>@<alias>` (a subprocess, its own loopback Ray
cluster, stopped here by pid) serves the registered version the alias names, downloaded once into the model cache,
and answers the openai client; a registry URI that names no version stops the command with an error naming it."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A sqlite MLflow store whose registered model `adallava` has versions 1 and 2 (a tiny checkpoint), alias
    `prod` on version 2; and the environment the serve command runs in."""
    import mlflow

    from adallava import presets
    from registry import register_checkpoint

    root = tmp_path_factory.mktemp("registry-serve")
    model, processor = presets.build_tiny(seed=0)
    model.save_pretrained(root / "ckpt")
    processor.save_pretrained(root / "ckpt")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t", artifact_location=(root / "mlruns").as_uri())).info.run_id
    client.log_artifacts(run_id, str(root / "ckpt"), artifact_path="model")
    for _ in range(2):
        register_checkpoint(run_id, "adallava", tags={"preset": "tiny"}, tracking_uri=uri)
    client.set_registered_model_alias("adallava", "prod", "2")
    # a fresh HOME (no ~/.ray) and Ray's default auth: what `python -m serve` meets on a new machine
    (root / "home").mkdir()
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, ADALLAVA_MODEL_CACHE=str(root / "cache"), HOME=str(root / "home"),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    return {"root": root, "env": env}


def test_serve_from_a_registry_alias_answers_the_openai_client(registered, tmp_path):
    import httpx
    import openai

    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", "--model", "models:/adallava@prod", "--port", str(port), "--num-cpus", "2",
         "min_replicas=1", "max_replicas=1", "profile_tokens=4", "max_batch_size=2"],
        cwd=ROOT, env=registered["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        # up when /health answers 200 (Ray + Serve + the replica's profile first): bounded polls, not a clock
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"python -m serve exited {proc.returncode}: {(tmp_path / 'serve.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"no healthy server after 600 polls: {(tmp_path / 'serve.log').read_text()[-3000:]}")
        # no read deadline: the answer ends the wait (a slow machine takes longer, it does not fail). openai.Timeout,
        # not httpx.Timeout: openai 3.6x runs on httpx2, whose client refuses httpx's Timeout
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=openai.Timeout(None))
        assert [m.id for m in client.models.list().data] == ["adallava"]
        r = client.chat.completions.create(model="adallava", max_tokens=4, extra_body={"budget": 0.75},
                                           messages=[{"role": "user", "content": "What colour is the circle?"}])  # fmt: skip
        assert r.object == "chat.completion" and 1 <= r.usage.completion_tokens <= 4
        assert r.model_extra["adallava"]["budget"] <= 0.75
        # the alias was pinned to version 2 at start, and that version was downloaded into the cache, once
        assert "models:/adallava@prod = models:/adallava/2" in (tmp_path / "serve.log").read_text()
        cached = list((registered["root"] / "cache").glob("*/adallava/*"))
        assert [p.name for p in cached] == ["2"] and (cached[0] / "config.json").is_file()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # python -m serve shuts Serve and its Ray down on Ctrl-C
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its own process group is left; nothing else
        except ProcessLookupError:
            pass
        log.close()


@pytest.mark.parametrize("uri", ["models:/adallava/7", "models:/adallava@staging", "models:/other/1"])
def test_a_registry_uri_that_names_nothing_is_an_error_naming_it(registered, uri):
    done = subprocess.run([sys.executable, "-m", "serve", "--model", uri, "--port", str(_free_port())], cwd=ROOT,
                          env=registered["env"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"error: {uri}: " in done.stderr and "Traceback" not in done.stderr
