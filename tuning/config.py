"""The sweep's typed config: what every trial trains (a pipelines train config + overrides), what is searched and how.

    cfg = load_sweep_config("tuning/configs/tiny.yaml", ["num_samples=4", "train.max_steps=20"])

Everything is checked here, before Ray starts: unknown keys, wrong types, an empty search space, a distribution spec
that is not one of the forms below, values a trial would reject (e.g. distill < 0, budget_dist 'gauss'), and the
trial train config itself (pipelines.train.validate). Every error names the key. Standard library + PyYAML only.

A search space entry is a constant or one of
    {uniform: [lo, hi]}   {loguniform: [lo, hi]}   {randint: [lo, hi]}   {choice: [a, b, ...]}
over these keys: lr, gumbel_tau (pipelines TrainConfig) and the adallava.objective.LossWeights fields (gamma, distill,
distill_temperature, latency, budget_dist, budget_alpha, budget_beta).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipelines.config import (
    read_yaml_mapping,
    TrainConfig, _check_type, build_config, parse_overrides, project_path,
)  # fmt: skip

# Searchable keys and their types; LossWeights' fields are listed here (not imported) so that --help stays fast, and
# a unit test checks that the two lists agree.
LOSS_KEYS = {
    "gamma": float, "distill": float, "distill_temperature": float, "latency": float,
    "budget_dist": str, "budget_alpha": float, "budget_beta": float,
}  # fmt: skip
TRAIN_KEYS = {"lr": float, "gumbel_tau": float}
SEARCHABLE = {**TRAIN_KEYS, **LOSS_KEYS}
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
PAPER_TAU = 5.0  # AdaLlavaConfig.gumbel_tau's default (the paper)


@dataclass
class SweepConfig:
    """One Ray Tune sweep. Each trial adapts `init_from` (a trained base, never retrained) with the sampled weights
    through pipelines.train (Ray Train inside the Tune trial), then is scored on the validation split."""

    name: str | None = None  # Tune experiment name (default <preset>-sweep-<time>); the same name resumes a sweep
    # --- what each trial trains
    train_config: str = "pipelines/configs/tiny_adapt.yaml"  # a pipelines TrainConfig YAML (stage adapt)
    train: dict = field(default_factory=dict)  # TrainConfig overrides for every trial (max_steps, num_workers, ...)
    # the base checkpoint every trial adapts from; "latest" = the newest runs/<preset>-base-*/checkpoint_* (the main
    # job's, `make demo`)
    init_from: str = "latest"
    # --- what is searched
    search_space: dict = field(default_factory=dict)  # key -> constant or {uniform|loguniform|randint|choice: ...}
    # trials run first with these values (missing keys: the paper's value, e.g. {} = the paper's defaults: every extra
    # weight 0, uniform budgets, the train config's lr, tau 5); they count toward num_samples
    fixed_trials: list = field(default_factory=lambda: [{}])
    num_samples: int = 8  # trials in all
    searcher: Literal["random", "optuna"] = "random"  # optuna needs the `tune` extra (pip install -e .[tune])
    scheduler: Literal["asha", "none"] = "asha"  # ASHA stops trials whose val_loss trails at a rung
    asha_grace_steps: int = 20  # optimizer steps before ASHA may stop a trial (its first rung)
    asha_reduction_factor: float = 2.0
    max_concurrent_trials: int = 2  # 2 CPU cores: 2 trials of 1 worker each; on a GPU cluster: GPUs / train.num_workers
    time_budget_s: float | None = None  # the sweep stops starting/continuing trials after this long (then: resume)
    seed: int = 0
    # --- how a trial is scored
    val_every: int = 10  # steps between the intermediate validation losses ASHA acts on (TrainConfig.val_every)
    val_examples: int = 64  # validation examples in that loss
    eval_examples: int = -1  # validation examples in the final accuracy-vs-budget curve (-1: the whole split)
    eval_batch_size: int = 100
    max_new_tokens: int = 4  # the bundled answers are one word or number
    test_eval: bool = False  # also score the best and the fixed trials on the test split at the end (reported only)
    # --- where it goes
    storage_path: str = "runs/sweeps"  # Tune's experiment folder <storage_path>/<name>; trial checkpoints beside it
    mlflow_tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db
    experiment: str = "adallava-sweeps"
    export_path: str | None = None  # the winner's train config (default <storage_path>/<name>/best_train.yaml)
    # for tests and demos: the sweep interrupts itself (as Ctrl+C does) once this many trials have finished; the same
    # command then resumes it
    interrupt_after_trials: int = -1
    address: str | None = None  # Ray cluster to join (default: $RAY_ADDRESS, else a local cluster on 127.0.0.1)


# ---------------------------------------------------------------------------------------------------------------


def _check_value(key: str, value: Any, where: str) -> Any:
    """A constant of searchable `key`, type-checked and range-checked as the trial would (named in the error)."""
    value = _check_type(f"{where}.{key}", value, SEARCHABLE[key])
    if key == "budget_dist" and value not in ("uniform", "beta"):
        raise ValueError(f"{where}.{key}: must be 'uniform' or 'beta', got {value!r}")
    if key in ("lr", "gumbel_tau", "distill_temperature", "budget_alpha", "budget_beta") and not value > 0:
        raise ValueError(f"{where}.{key}: must be > 0, got {value!r}")
    if key in ("distill", "latency") and value < 0:
        raise ValueError(f"{where}.{key}: must be >= 0, got {value!r}")
    return value


def check_spec(key: str, spec: Any) -> Any:
    """A search-space entry -> the same in canonical form ({kind: args} or a constant); ValueError naming the key."""
    where = "search_space"
    if key not in SEARCHABLE:
        raise ValueError(f"{where}: unknown key {key!r}; searchable: {sorted(SEARCHABLE)}")
    if not isinstance(spec, dict):
        return _check_value(key, spec, where)
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ValueError(f"{where}.{key}: a distribution is one of {{uniform|loguniform|randint|choice: ...}}, "
                         f"got {spec!r}")  # fmt: skip
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ValueError(f"{where}.{key}: choice needs a non-empty list of values, got {args!r}")
        return {kind: [_check_value(key, v, where) for v in args]}
    if SEARCHABLE[key] is str:
        raise ValueError(f"{where}.{key}: a {kind} range needs a numeric key; use {{choice: [...]}}")
    if not isinstance(args, list) or len(args) != 2:
        raise ValueError(f"{where}.{key}: {kind} needs [low, high], got {args!r}")
    if kind == "randint":
        lo, hi = (_check_type(f"{where}.{key}", a, int) for a in args)
    else:
        lo, hi = (_check_type(f"{where}.{key}", a, float) for a in args)
    if not lo < hi:
        raise ValueError(f"{where}.{key}: {kind} needs low < high, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ValueError(f"{where}.{key}: loguniform needs low > 0, got {lo}")
    _check_value(key, lo, where), _check_value(key, hi if kind != "randint" else hi - 1, where)
    return {kind: [lo, hi]}


def is_distribution(spec: Any) -> bool:
    return isinstance(spec, dict)


def resolve_init_from(init_from: str, preset: str) -> str:
    """'latest' -> the newest <project>/runs/<preset>-base-*/checkpoint_* (by run time, then step)."""
    if init_from != "latest":
        path = project_path(init_from)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"init_from={init_from}: no checkpoint there (no config.json)")
        return str(path)
    found = sorted(glob.glob(str(project_path("runs") / f"{preset}-base-*" / "checkpoint_*")))
    found = [f for f in found if (Path(f) / "config.json").is_file()]
    if not found:
        raise FileNotFoundError(
            f"init_from=latest: no base checkpoint under runs/{preset}-base-*/ (run `make demo` or "
            f"`python -m pipelines.train --config pipelines/configs/{preset}_base.yaml` first, or set init_from=<dir>)"
        )
    # run folders carry a sortable time stamp; within one, the step is zero-padded
    return max(found, key=lambda f: (Path(f).parent.name, Path(f).name))


def trial_train_config(cfg: SweepConfig) -> TrainConfig:
    """The TrainConfig every trial starts from: the train_config file <- cfg.train <- what the sweep fixes."""
    path = project_path(cfg.train_config)
    if not path.is_file():
        raise FileNotFoundError(f"train_config: {cfg.train_config} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"train_config: {path} is not a mapping of key: value")
    for key in ("init_from", "loss_weights", "val_every", "val_examples", "name"):
        if key in cfg.train:
            raise ValueError(f"train.{key}: set by the sweep itself (see the sweep keys init_from, search_space, "
                             f"val_every, val_examples, name)")  # fmt: skip
    values.update(cfg.train)
    try:
        train_cfg = build_config(TrainConfig, values, source=f"train ({cfg.train_config} + train overrides)")
    except ValueError as e:
        raise ValueError(str(e).replace("for TrainConfig", "for TrainConfig (sweep key `train`)")) from None
    if train_cfg.max_steps < 1:
        raise ValueError(f"train.max_steps: a sweep needs a fixed trial length (>= 1), got {train_cfg.max_steps}")
    if train_cfg.checkpoint_every % max(cfg.val_every, 1) and train_cfg.checkpoint_every < train_cfg.max_steps:
        # every report must carry val_loss (Tune checks results for the scheduler's metric); reports come every
        # val_every steps and with each checkpoint
        raise ValueError(f"train.checkpoint_every: must be a multiple of val_every={cfg.val_every} (or >= max_steps), "
                         f"got {train_cfg.checkpoint_every}")  # fmt: skip
    if train_cfg.dataset != "bundled":
        raise ValueError("train.dataset: trials are scored on a validation split, which only the bundled dataset has "
                         f"here; got {train_cfg.dataset!r}")  # fmt: skip
    if cfg.scheduler == "asha" and cfg.asha_grace_steps >= train_cfg.max_steps:
        raise ValueError(f"asha_grace_steps: must be below train.max_steps={train_cfg.max_steps} (ASHA's first rung), "
                         f"got {cfg.asha_grace_steps}")  # fmt: skip
    if train_cfg.stage != "adapt":
        raise ValueError(f"train.stage: a sweep adapts a trained base (stage adapt), got {train_cfg.stage!r}")
    train_cfg.init_from = resolve_init_from(cfg.init_from, train_cfg.preset)
    train_cfg.val_every, train_cfg.val_examples = cfg.val_every, cfg.val_examples
    return train_cfg


def default_point(train_cfg: TrainConfig) -> dict:
    """The paper's value of every searchable key (LossWeights defaults, the train config's lr, the model's tau)."""
    tau = train_cfg.gumbel_tau
    if tau is None and train_cfg.init_from:
        cfg_json = Path(train_cfg.init_from) / "config.json"
        tau = json.loads(cfg_json.read_text()).get("gumbel_tau", PAPER_TAU) if cfg_json.is_file() else PAPER_TAU
    return {"lr": train_cfg.lr, "gumbel_tau": float(tau or PAPER_TAU), "gamma": 0.0, "distill": 0.0,
            "distill_temperature": 1.0, "latency": 0.0, "budget_dist": "uniform", "budget_alpha": 1.0,
            "budget_beta": 1.0}  # fmt: skip


def validate(cfg: SweepConfig) -> TrainConfig:
    """Every check that can fail before a trial starts; returns the trials' base TrainConfig."""
    if not cfg.search_space:
        raise ValueError("search_space: empty; give at least one key with a distribution, e.g. gamma: {uniform: [-1, 1]}")
    cfg.search_space = {k: check_spec(k, v) for k, v in cfg.search_space.items()}
    if not any(is_distribution(v) for v in cfg.search_space.values()):
        raise ValueError(f"search_space: every key is a constant ({sorted(cfg.search_space)}); nothing to search")
    for i, point in enumerate(cfg.fixed_trials):
        if not isinstance(point, dict):
            raise ValueError(f"fixed_trials[{i}]: expected a mapping like {{gamma: 0}}, got {point!r}")
        for k, v in point.items():
            if k not in SEARCHABLE:
                raise ValueError(f"fixed_trials[{i}]: unknown key {k!r}; searchable: {sorted(SEARCHABLE)}")
            _check_value(k, v, f"fixed_trials[{i}]")
    if cfg.num_samples < max(1, len(cfg.fixed_trials)):
        raise ValueError(f"num_samples: {cfg.num_samples} < 1 or fewer than the {len(cfg.fixed_trials)} fixed_trials")
    if cfg.max_concurrent_trials < 1:
        raise ValueError(f"max_concurrent_trials: must be >= 1, got {cfg.max_concurrent_trials}")
    if cfg.time_budget_s is not None and not cfg.time_budget_s > 0:
        raise ValueError(f"time_budget_s: must be > 0, got {cfg.time_budget_s}")
    if cfg.val_every < 1 and cfg.scheduler == "asha":
        raise ValueError("val_every: ASHA acts on the intermediate validation loss; val_every must be >= 1")
    if cfg.asha_grace_steps < 1 or cfg.asha_reduction_factor <= 1:
        raise ValueError("asha_grace_steps must be >= 1 and asha_reduction_factor > 1")
    if cfg.eval_examples == 0 or cfg.eval_batch_size < 1 or cfg.max_new_tokens < 1:
        raise ValueError("eval_examples must be -1 or >= 1; eval_batch_size and max_new_tokens >= 1")
    if cfg.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.name):
        raise ValueError(f"name: letters, digits, '.', '_' and '-' only, got {cfg.name!r}")
    if cfg.searcher == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ValueError("searcher: optuna is not installed (pip install -e '.[tune]')") from None
    train_cfg = trial_train_config(cfg)
    from pipelines.train import validate as validate_train

    validate_train(train_cfg)
    return train_cfg


def load_sweep_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SweepConfig:
    """Defaults <- YAML file <- key=value overrides; `train.max_steps=20` / `search_space.gamma={uniform: [0, 1]}` set
    one key of a mapping field. Only parses and type-checks; validate() does the rest."""
    values: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        values.update(read_yaml_mapping(path))
        build_config(SweepConfig, values, source=str(path))
        source = f"{path} + overrides"
    names = {f.name for f in dataclasses.fields(SweepConfig)}
    for key, value in parse_overrides(overrides or []).items():
        head, dot, sub = key.partition(".")
        if dot and head in names and head in ("train", "search_space"):
            values[head] = dict(values.get(head) or {}, **{sub: value})
        elif dot:
            raise ValueError(f"override {key}: only train.<key> and search_space.<key> take a dotted name")
        else:
            values[key] = value
    return build_config(SweepConfig, values, source=source)
