"""Run the AdaLLaVA Serve application on a local Ray cluster (loopback only).

    python -m serve                                  # tiny preset on http://127.0.0.1:8000 (the playground at /)
    python -m serve --model /path/to/checkpoint --port 8001 policy.slo_ms=1500 max_replicas=3
    python -m serve --config serve/configs/tiny.yaml # the args: of a Serve config file, plus overrides
    python -m serve --model models:/adallava/3       # a registered model version (MLflow Model Registry)
    python -m serve --model models:/adallava@prod    # the version an alias names now (pinned at start)

key=value overrides name ServeConfig fields (serve/config.py), dotted for policy.* and limits.*.
For a cluster, use the Serve config file instead: `serve run serve/configs/tiny.yaml` or `serve deploy ...`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="'tiny' (default), a checkpoint directory, or a registered model: "
                    "models:/<name>/<version> or models:/<name>@<alias>")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI for models:/ "
                    "(default: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--num-cpus", type=int, default=None, help="Ray logical CPUs (default: max(4, cores))")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>' on /v1/* (default: "
                    "$ADALLAVA_API_KEY; none: open)")
    ap.add_argument("--cors-origin", action="append", default=None, help="allow this browser origin (repeat); "
                    "CORS is off by default")
    ap.add_argument("--config", default=None, help="a Serve config YAML whose first application's args to use")
    ap.add_argument("overrides", nargs="*", help="key=value ServeConfig overrides (e.g. policy.slo_ms=1500)")
    args = ap.parse_args(argv)

    app_args: dict = {}
    if args.config:
        import yaml

        with open(args.config) as f:
            app_args = dict((yaml.safe_load(f)["applications"][0].get("args") or {}))
    for item in args.overrides:
        if "=" not in item:
            ap.error(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        app_args[key] = value
    if args.model:
        app_args["model"] = args.model
    if args.api_key:
        app_args["api_key"] = args.api_key
    if args.cors_origin:
        app_args["cors_allow_origins"] = args.cors_origin

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Token auth stays Ray's default: ray.init() turns it on for the local cluster and writes ~/.ray/auth_token if
    # missing (README, "On a Ray cluster"); loopback keeps the network out, not other users of this machine.
    import ray
    from ray import serve

    from registry import RegistryError, default_tracking_uri, is_registry_uri, pinned_uri
    from serve.app import build_app, make_config

    cfg = make_config(app_args)  # fail on a bad key before starting Ray
    runtime_env = None
    if is_registry_uri(cfg.model):
        # Resolve before Ray starts: a name, version or alias that does not exist is an error naming the URI. An
        # alias is pinned to its version now; each replica downloads that version once into its node's cache.
        uri = args.tracking_uri or default_tracking_uri()
        try:
            cfg.model = pinned_uri(cfg.model, uri)
        except RegistryError as e:
            ap.error(str(e))
        print(f"serving {app_args['model']} = {cfg.model} from the registry at {uri}", flush=True)
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri}}  # where the replicas resolve it
    ray.init(address="local", num_cpus=args.num_cpus or max(4, os.cpu_count() or 1), include_dashboard=True,
             dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", runtime_env=runtime_env)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(cfg), name="adallava", route_prefix="/")
    print(f"AdaLLaVA serving {cfg.model!r} as {cfg.model_name!r} on http://{args.host}:{args.port}/v1 "
          f"(Ctrl-C to stop)", flush=True)
    print(f"playground: open http://{args.host}:{args.port}/ in a browser", flush=True)  # issue 14
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
