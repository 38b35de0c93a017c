"""Typed configs for the pipelines: dataclass defaults, a YAML file that names what differs, `key=value` overrides.

    cfg = load_config(TrainConfig, "pipelines/configs/tiny_base.yaml", ["max_steps=20", "lr=3e-4"])

Unknown keys and values of the wrong type are errors that name the key (a typo never silently becomes a default).
Only the standard library and PyYAML here: `--help` must stay fast.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# The project folder: default home of runs/, mlflow.db, mlruns/ and the bundled data. A job sent with
# `ray job submit --working-dir .` runs in an unpacked copy of the folder; ADALLAVA_HOME points it back at the real one.
PROJECT_DIR = Path(os.environ.get("ADALLAVA_HOME") or Path(__file__).resolve().parent.parent)


@dataclass
class TrainConfig:
    """One training run (stage `base` or `adapt`). Defaults follow the paper's recipe (spec section 4) where it has
    one: lr 1e-5, cosine with 3% warm-up, 1 epoch, global batch 128, bf16, gradient checkpointing, frozen CLIP."""

    # --- what to train
    # base: plain LLaVA path (budget 1.0); adapt: AdaLLaVA fine-tuning; layerskip / layerdrop: the early-exit and
    # random-skipping baselines fine-tuned from the base with the same steps and data (adallava.baselines)
    stage: Literal["base", "adapt", "layerskip", "layerdrop"] = "adapt"
    # the model family: "tiny" (random init) or "smol" (SmolLM2-135M's real weights + a random vision tower) are built
    # when there is no init_from; any other name is a tag and needs init_from
    preset: str = "tiny"
    init_from: str | None = None  # a checkpoint dir: required for adapt (the base), optional for base
    # build_tiny keyword arguments when the base starts from random init (e.g. hidden_size, num_hidden_layers)
    model_overrides: dict = field(default_factory=dict)
    # --- data
    dataset: str = "bundled"  # "bundled" (generated on first use) or a LLaVA conversation JSON file
    data_dir: str = "data/bundled"  # where the bundled dataset lives (relative paths: to the project folder)
    image_root: str | None = None  # images of a JSON dataset (default: the JSON file's folder)
    data_seed: int = 0
    num_train: int = 2000  # bundled dataset sizes
    num_validation: int = 200
    num_test: int = 400
    on_bad: Literal["skip", "fail"] = "skip"  # bad records: skip and count (reported at the end), or stop at the first
    max_length: int = 512
    # adallava.objective.LossWeights fields for stage adapt (gamma, distill, latency, budget_dist, ...); empty = the
    # paper's plain next-token loss with budgets uniform over the model's steps
    loss_weights: dict = field(default_factory=dict)
    # peft LoRA on the language model for stage adapt (adallava.lora.add_lora keys: r, alpha, dropout,
    # target_modules); empty = full fine-tuning. The base LM is frozen, the adapters, projector, latency encoder and
    # scheduler train; checkpoints hold the base weights plus adapter_config.json / adapter_model.safetensors.
    lora: dict = field(default_factory=dict)
    # adallava.baselines.BaselineArgs fields for stages layerskip / layerdrop (layerskip_p_max, layerskip_e_scale,
    # layerdrop_rate); empty = the defaults documented there
    baseline_args: dict = field(default_factory=dict)
    # Gumbel-softmax temperature of the scheduler's plan sampling (AdaLlavaConfig.gumbel_tau, the paper's 5); None keeps
    # the checkpoint's value. A training knob the tuning sweeps search over.
    gumbel_tau: float | None = None
    # Validation loss every N optimizer steps (0: never): the plain next-token loss on the first val_examples of the
    # validation split, averaged over the model's budget grid, independent of loss_weights (so runs with different
    # weights compare) and reported with the metrics; the intermediate metric Ray Tune's ASHA stops trials on.
    val_every: int = 0
    val_examples: int = 64
    # --- scale
    num_workers: int = 2
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp shards parameters, gradients and optimizer state (7B+)
    # --- optimisation
    global_batch_size: int = 128  # LLaVA-1.5 stage 2; = micro_batch_size * num_workers * grad accumulation
    micro_batch_size: int = 16  # per worker per forward
    lr: float = 1e-5
    # learning rate of the scheduler and the latency encoder (None: lr, as in the paper); they start from random init
    # and a short fine-tune at an LM-sized lr hardly moves them
    scheduler_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    epochs: float = 1.0
    max_steps: int = -1  # optimizer steps; > 0 overrides epochs
    max_grad_norm: float = 1.0
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast (weights and optimizer state stay fp32)
    gradient_checkpointing: bool = True
    freeze_vision_tower: bool = True  # CLIP stays frozen (spec 4); the projector and the LM train
    # the language model (embeddings, layers, norm, lm_head) frozen: LLaVA stage 1 (only vision side + projector learn)
    freeze_language_model: bool = False
    seed: int = 0
    # --- checkpoints, fault tolerance
    checkpoint_every: int = 100  # optimizer steps; the last step always checkpoints
    num_to_keep: int = 2
    storage_path: str = "runs"  # local folder (relative: to the project folder), or s3://..., or an NFS mount
    name: str | None = None  # run name under storage_path (default: <preset>-<stage>-<time>); same name = resume
    max_failures: int = 2  # worker restarts (each resumes from the latest checkpoint); -1 = unlimited
    fail_at_step: int = -1  # fault-injection for tests: a worker process exits at this step, once (see fail_marker)
    fail_marker: str | None = None  # file that records the injected failure so that it happens only once
    # --- tracking and logging
    mlflow_tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db
    experiment: str = "adallava"
    # stage adapt registers its final checkpoint as a new version of this MLflow registered model (null: not at all)
    registered_model: str | None = "adallava"
    log_every: int = 1  # MLflow metrics every N steps
    report_every: int = 10  # ray.train.report every N steps (a barrier across workers) and at every checkpoint
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"  # Ray Train's own logs (INFO: every report)
    progress: bool = True  # rank 0 prints a progress line (step, loss, lr, it/s, ETA) every 5% of the steps
    address: str | None = None  # Ray cluster to join (default: $RAY_ADDRESS, else a local cluster on 127.0.0.1)


@dataclass
class EvalConfig:
    """Evaluation of an adapted checkpoint on a budget grid, against early exit, random skipping and the full model."""

    model: str = ""  # the adapted (AdaLLaVA) checkpoint dir: required
    base: str | None = None  # the base checkpoint the baselines run on (default: `model`)
    # trained baselines (stages layerskip / layerdrop): their checkpoints; each given one adds its method
    # (early_exit_trained, random_skip_trained) to the default methods
    early_exit_model: str | None = None
    random_skip_model: str | None = None
    dataset: str = "bundled"
    data_dir: str = "data/bundled"
    split: str = "test"
    image_root: str | None = None
    on_bad: Literal["skip", "fail"] = "skip"
    max_examples: int = -1  # -1: the whole split
    budgets: list | None = None  # default: the model's own budget steps (adallava.budget.budget_grid)
    # default: adallava, early_exit, random_skip (on the base), the trained baselines whose checkpoints are given, full
    methods: list | None = None
    batch_size: int = 64
    max_new_tokens: int = 8
    latency_samples: int = 24  # requests timed one at a time per (method, budget) for prefill / per-token latency
    num_qualitative: int = 3  # examples in the qualitative figure
    seed: int = 0  # random-skip plans
    output_dir: str = "runs/eval"
    # perplexity on held-out text (adallava.perplexity: Python's reference docs) per method and budget, and of each
    # checkpoint's language model alone; 0 chunks = off. Each chunk: perplexity_ctx context + perplexity_cont scored
    perplexity_chunks: int = 0
    perplexity_ctx: int = 48
    perplexity_cont: int = 48
    perplexity_batch: int = 12
    num_threads: int = 1  # torch threads; 1 gives steadier latency figures for small models on a shared CPU
    mlflow_tracking_uri: str | None = None
    experiment: str = "adallava"
    run_name: str | None = None
    progress: bool = True


# ---------------------------------------------------------------------------------------------------------------


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """value converted to the annotated type, or ValueError naming the key. YAML gives int/float/bool/str/None/list/
    dict; a float field also takes an int and a numeric string ("1e-5": YAML 1.1 reads that as a string)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{key}: must be one of {list(choices)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, list):
            return value
        raise ValueError(f"{key}: expected a list like [a, b], got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ValueError(f"{key}: expected a mapping like {{a: 1}}, got {value!r}")
    raise TypeError(f"{key}: unsupported config type {tp!r}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["lr=3e-4", "use_gpu=true", "budgets=[0.5, 1.0]"] -> dict; each value is read as YAML."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({e.problem})") from None
    return out


def build_config(cls, values: dict[str, Any], source: str = "config"):
    """An instance of the dataclass `cls` from a mapping; unknown keys and wrong types raise ValueError naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    return cls(**{k: _check_type(k, v, hints[k]) for k, v in values.items()})


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A config file's top-level key: value mapping (empty file: {}); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    loaded = yaml.safe_load(path.read_text())
    if loaded is not None and not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of key: value at the top level")
    return loaded or {}


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Dataclass defaults <- YAML file <- key=value overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_yaml_mapping(path))
        build_config(cls, values, source=str(path))  # name the file if the file itself is wrong
    values.update(parse_overrides(overrides or []))
    return build_config(cls, values, source="overrides" if path is None else f"{path} + overrides")


def project_path(p: str | Path) -> Path:
    """A relative path is relative to the project folder (so commands work from any working directory)."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else PROJECT_DIR / p


def resolve_storage_path(p: str) -> str:
    """Local paths become absolute under the project folder; URIs (s3://, gs://, ...) pass through."""
    return p if "://" in p else str(project_path(p))


def tracking_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_DIR / 'mlflow.db'}"


def as_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
