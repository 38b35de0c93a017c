"""The main job: generate data -> train the base -> AdaLLaVA fine-tuning -> the baselines trained with the same steps
and data (early exit LayerSkip-style, random skipping LayerDrop-style) -> evaluate, on the embedded default (a local
Ray cluster on 127.0.0.1, MLflow on sqlite in the project folder). About 14 minutes on 2 CPU cores.

    python -m pipelines.demo                                   # what `make demo` runs
    python -m pipelines.demo base.max_steps=100 adapt.max_steps=50 eval.max_examples=100   # a quicker look
    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"ADALLAVA_HOME": "'$PWD'"}}' \\
        -- python -m pipelines.demo                            # the same job on a running cluster

Overrides are key=value with the stage as prefix (base., adapt., eval.) on top of pipelines/configs/tiny_base.yaml,
tiny_adapt.yaml and eval_tiny.yaml; the trained baselines run tiny_adapt.yaml (and its adapt. overrides) with
stage=layerskip / stage=layerdrop, plus baselines.key=value overrides of their own (e.g. baselines.baseline_args=...).
--untrained-baselines skips training them (the table then has the baselines on the base model's weights only).
Ends with the accuracy/latency table and how to open MLflow on the results.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import init_ray
from .config import PROJECT_DIR, EvalConfig, TrainConfig, load_config, tracking_uri

CONFIGS = Path(__file__).resolve().parent / "configs"


def split_overrides(items: list[str], prefixes=("base", "adapt", "baselines", "eval")) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {p: [] for p in prefixes}
    for item in items:
        prefix, dot, rest = item.partition(".")
        if not dot or prefix not in out or "=" not in rest:
            raise ValueError(f"override {item!r}: expected <stage>.key=value with <stage> one of {list(prefixes)}")
        out[prefix].append(rest)
    return out


def baseline_configs(adapt_yaml: Path, name: str, adapt_overrides: list[str], own: list[str]) -> dict:
    """{stage: TrainConfig} of the trained baselines: the adapt stage's file and overrides (same steps, data, lr),
    with stage=layerskip / layerdrop and a name of their own; `own` overrides come last."""
    from adallava.baselines import BASELINE_STAGES

    return {
        stage: load_config(TrainConfig, adapt_yaml, [*adapt_overrides, f"stage={stage}", f"name={name}-{stage}", *own])
        for stage in BASELINE_STAGES
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster)")
    parser.add_argument("--untrained-baselines", action="store_true",
                        help="do not train the baselines (faster; the comparison is then not like for like)")
    parser.add_argument("overrides", nargs="*", help="base.key=value, adapt.key=value, baselines.key=value, eval.key=value")
    args = parser.parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        over = split_overrides(args.overrides)
        base_cfg = load_config(TrainConfig, CONFIGS / "tiny_base.yaml", [f"name=tiny-base-{stamp}"] + over["base"])
        adapt_cfg = load_config(TrainConfig, CONFIGS / "tiny_adapt.yaml", [f"name=tiny-adapt-{stamp}"] + over["adapt"])
        eval_cfg = load_config(EvalConfig, CONFIGS / "eval_tiny.yaml",
                               [f"output_dir=runs/demo-{stamp}/eval", "model=pending"] + over["eval"])  # fmt: skip
        baselines = {} if args.untrained_baselines else baseline_configs(
            CONFIGS / "tiny_adapt.yaml", f"tiny-{stamp}", over["adapt"], over["baselines"])
        if args.untrained_baselines and over["baselines"]:
            raise ValueError("baselines.* overrides with --untrained-baselines: no baseline is trained")
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    for cfg in (base_cfg, adapt_cfg, *baselines.values()):
        cfg.address = args.address or cfg.address

    from . import evaluate, train

    t0 = time.perf_counter()
    phases = {}
    print(f"== adallava main job: data -> base -> adapt -> {'trained baselines -> ' if baselines else ''}evaluate   "
          f"(project folder {PROJECT_DIR})", flush=True)
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
        trained = {}
        for stage, cfg in baselines.items():
            print(f"\n== 2b/3 {stage}: the {'early-exit' if stage == 'layerskip' else 'random-skipping'} baseline "
                  f"trained {stage} style from the same base, same steps and data as adapt", flush=True)  # fmt: skip
            cfg.init_from = str(base.final_checkpoint)
            t = time.perf_counter()
            trained[stage] = train.run(cfg)
            phases[stage] = time.perf_counter() - t
    finally:
        if started:
            import ray

            ray.shutdown()
    print("\n== 3/3 evaluate: budget grid, AdaLLaVA vs early exit vs random skipping vs the full model", flush=True)
    # the registered version when there is one: evaluation tags it with its accuracy per budget
    eval_cfg.model = adapted.registered_model or str(adapted.final_checkpoint)
    eval_cfg.mlflow_tracking_uri = eval_cfg.mlflow_tracking_uri or adapt_cfg.mlflow_tracking_uri  # that registry
    eval_cfg.base = str(base.final_checkpoint)
    if trained:
        eval_cfg.early_exit_model = str(trained["layerskip"].final_checkpoint)
        eval_cfg.random_skip_model = str(trained["layerdrop"].final_checkpoint)
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
    for stage, outcome in trained.items():
        print(f"{stage + ' checkpoint:':<20}{outcome.final_checkpoint}")
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
