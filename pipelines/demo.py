"""The main job: generate data -> train the base -> AdaLLaVA fine-tuning -> evaluate, on the embedded default (a local
Ray cluster on 127.0.0.1, MLflow on sqlite in the project folder). About 12 minutes on 2 CPU cores.

    python -m pipelines.demo                                   # what `make demo` runs
    python -m pipelines.demo base.max_steps=100 adapt.max_steps=50 eval.max_examples=100   # a quicker look
    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"ADALLAVA_HOME": "'$PWD'"}}' \\
        -- python -m pipelines.demo                            # the same job on a running cluster

Overrides are key=value with the stage as prefix (base., adapt., eval.) on top of pipelines/configs/tiny_base.yaml,
tiny_adapt.yaml and eval_tiny.yaml. Ends with the accuracy/latency table and how to open MLflow on the results.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import init_ray
from .config import PROJECT_DIR, EvalConfig, TrainConfig, load_config, tracking_uri

CONFIGS = Path(__file__).resolve().parent / "configs"


def split_overrides(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"base": [], "adapt": [], "eval": []}
    for item in items:
        prefix, dot, rest = item.partition(".")
        if not dot or prefix not in out or "=" not in rest:
            raise ValueError(f"override {item!r}: expected base.key=value, adapt.key=value or eval.key=value")
        out[prefix].append(rest)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster)")
    parser.add_argument("overrides", nargs="*", help="base.key=value, adapt.key=value, eval.key=value")
    args = parser.parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        over = split_overrides(args.overrides)
        base_cfg = load_config(TrainConfig, CONFIGS / "tiny_base.yaml", [f"name=tiny-base-{stamp}"] + over["base"])
        adapt_cfg = load_config(TrainConfig, CONFIGS / "tiny_adapt.yaml", [f"name=tiny-adapt-{stamp}"] + over["adapt"])
        eval_cfg = load_config(EvalConfig, CONFIGS / "eval_tiny.yaml",
                               [f"output_dir=runs/demo-{stamp}/eval", "model=pending"] + over["eval"])  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    for cfg in (base_cfg, adapt_cfg):
        cfg.address = args.address or cfg.address

    from . import evaluate, train

    t0 = time.perf_counter()
    phases = {}
    print(f"== adallava main job: data -> base -> adapt -> evaluate   (project folder {PROJECT_DIR})", flush=True)
    t = time.perf_counter()
    train.prepare_dataset(base_cfg)  # generates data/bundled on first use (deterministic by seed)
    phases["data"] = time.perf_counter() - t
    started = init_ray(args.address)  # one cluster for both training stages
    try:
        print("\n== 1/3 base: the plain LLaVA path of the tiny preset, from random init (budget 1.0)", flush=True)
        t = time.perf_counter()
        base = train.run(base_cfg)
        phases["base"] = time.perf_counter() - t
        print("\n== 2/3 adapt: AdaLLaVA fine-tuning from the base (random budget per sample, sampled plans)",
              flush=True)  # fmt: skip
        adapt_cfg.init_from = str(base.final_checkpoint)
        t = time.perf_counter()
        adapted = train.run(adapt_cfg)
        phases["adapt"] = time.perf_counter() - t
    finally:
        if started:
            import ray

            ray.shutdown()
    print("\n== 3/3 evaluate: budget grid, AdaLLaVA vs early exit vs random skipping vs the full model", flush=True)
    # the registered version when there is one: evaluation tags it with its accuracy per budget
    eval_cfg.model = adapted.registered_model or str(adapted.final_checkpoint)
    eval_cfg.mlflow_tracking_uri = eval_cfg.mlflow_tracking_uri or adapt_cfg.mlflow_tracking_uri  # that registry
    eval_cfg.base = str(base.final_checkpoint)
    eval_cfg.run_name = eval_cfg.run_name or f"evaluate-{stamp}"
    t = time.perf_counter()
    report = evaluate.run(eval_cfg)
    phases["evaluate"] = time.perf_counter() - t
    total = time.perf_counter() - t0

    uri = tracking_uri(eval_cfg.mlflow_tracking_uri)
    print("\n== done in " + f"{total / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + ")")
    print(f"base checkpoint:    {base.final_checkpoint}")
    print(f"adapted checkpoint: {adapted.final_checkpoint}")
    if adapted.registered_model:
        print(f"registered model:   {adapted.registered_model} (serve it: python -m serve --model {adapted.registered_model})")
    print(f"evaluation:         {Path(report['plots'][0]).parent}")
    if uri.startswith("sqlite:///"):
        print("\nOpen the results in MLflow (experiment 'adallava': runs base, adapt, evaluate):")
        print(f"  cd {PROJECT_DIR} && MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow ui "
              f"--backend-store-uri {uri} --host 127.0.0.1 --port 5000 --workers 1")  # fmt: skip
        print("  then browse http://127.0.0.1:5000")
    else:
        print(f"\nResults are in MLflow at {uri} (experiment 'adallava').")
    return 0


if __name__ == "__main__":
    sys.exit(main())
