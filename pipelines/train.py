"""Training on Ray Train: stage `base` (plain LLaVA path, budget fixed at 1.0) and stage `adapt` (AdaLLaVA fine-tuning:
one random budget per sample, Gumbel-sampled execution plans; spec sections 2 and 4), one entry point. Stages
`layerskip` and `layerdrop` train the early-exit and random-skipping baselines (adallava.baselines) from the base.

    python -m pipelines.train --config pipelines/configs/tiny_base.yaml
    python -m pipelines.train --config pipelines/configs/tiny_adapt.yaml init_from=runs/tiny-base/final max_steps=50
    ray job submit --working-dir . -- python -m pipelines.train --config pipelines/configs/tiny_base.yaml

Each worker runs `train_loop` under DDP (gloo on CPU, NCCL on GPU) or FSDP. Every `checkpoint_every` steps rank 0
writes a checkpoint (the model in save_pretrained form + processor + optimizer + LR scheduler + step + data position)
and reports it; a restarted worker group resumes from the latest one (FailureConfig(max_failures)). Rank 0 logs
parameters, loss and throughput to MLflow, and the final model as artifacts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .common import init_ray, mlflow_experiment  # also sets the loopback-only Ray environment, before Ray loads
from .config import TrainConfig, as_dict, load_config, project_path, resolve_storage_path, tracking_uri

STATE_FILE = "train_state.json"  # written last: a checkpoint folder without it is incomplete
OPTIM_FILE = "optimizer.pt"


# ---------------------------------------------------------------------------------------------------------------
# data: which micro-batches a worker sees, from any position


def batches_per_epoch(num_examples: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per worker per epoch. The tail that does not fill a batch on every worker is left for the next
    epoch's shuffle, so that every worker takes the same number of steps (DDP needs that)."""
    return num_examples // (micro_batch_size * world_size)


def micro_batch_indices(num_examples, micro_batch_size, world_size, rank, seed, start):
    """Yield (position, indices) for this worker's micro-batches, forever, from global micro-batch position `start`.

    Epoch e is a permutation seeded by (seed, e); worker r takes every world_size-th example of it. Position p is
    (epoch p // per_epoch, batch p % per_epoch), so a resumed run sees exactly the batches it had not seen yet.
    """
    import torch

    per_epoch = batches_per_epoch(num_examples, micro_batch_size, world_size)
    if per_epoch == 0:
        raise ValueError(
            f"{num_examples} training examples cannot fill one micro-batch of {micro_batch_size} on each of "
            f"{world_size} workers: lower micro_batch_size or num_workers"
        )
    pos = start
    while True:
        epoch, b = divmod(pos, per_epoch)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(num_examples, generator=g)[: per_epoch * micro_batch_size * world_size]
        mine = perm[rank::world_size]
        while b < per_epoch:
            yield pos, mine[b * micro_batch_size : (b + 1) * micro_batch_size].tolist()
            b += 1
            pos += 1


def prepare_dataset(cfg: TrainConfig, split: str = "train") -> tuple[Path, Path | None]:
    """(JSON file, image root) of the training data; the bundled dataset is generated on first use."""
    if cfg.dataset == "bundled":
        from adallava.data import generate_bundled

        paths = generate_bundled(
            project_path(cfg.data_dir), seed=cfg.data_seed, num_train=cfg.num_train,
            num_validation=cfg.num_validation, num_test=cfg.num_test,
        )  # fmt: skip
        return Path(paths[split]), None
    path = project_path(cfg.dataset)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist (give a LLaVA conversation JSON file or 'bundled')")
    return path, project_path(cfg.image_root) if cfg.image_root else None


def total_steps(cfg: TrainConfig, num_examples: int, world_size: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    accum = grad_accumulation(cfg, world_size)
    per_epoch = batches_per_epoch(num_examples, cfg.micro_batch_size, world_size)
    return max(1, math.ceil(cfg.epochs * per_epoch / accum))


def grad_accumulation(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} is not a multiple of micro_batch_size * num_workers = "
            f"{cfg.micro_batch_size} * {world_size}"
        )
    return cfg.global_batch_size // per_step


def validate(cfg: TrainConfig) -> None:
    """Errors that are cheaper to raise before any worker starts."""
    grad_accumulation(cfg, cfg.num_workers)
    if cfg.lora:
        known = {"r", "alpha", "dropout", "target_modules"}
        if set(cfg.lora) - known:
            raise ValueError(f"lora: unknown key(s) {sorted(set(cfg.lora) - known)}; known: {sorted(known)}")
        if cfg.stage != "adapt":
            raise ValueError("lora adapts a trained base's language model: stage adapt only")
    if cfg.stage != "base" and not cfg.init_from:
        raise ValueError(f"stage {cfg.stage} fine-tunes a base model: set init_from=<base checkpoint dir>")
    if not cfg.init_from and cfg.preset not in BUILT_PRESETS:
        raise ValueError(f"preset {cfg.preset!r} is not built here ({' or '.join(BUILT_PRESETS)}): set init_from=<dir>")
    validate_baseline(cfg)
    if cfg.init_from and not (project_path(cfg.init_from) / "config.json").is_file():
        raise FileNotFoundError(f"init_from={cfg.init_from}: no checkpoint there (no config.json)")
    if cfg.init_from and cfg.model_overrides:
        raise ValueError("model_overrides applies to a model built from random init; it conflicts with init_from")
    if cfg.loss_weights:
        from adallava.objective import LossWeights

        known = set(LossWeights.__dataclass_fields__)
        if set(cfg.loss_weights) - known:
            raise ValueError(f"loss_weights: unknown key(s) {sorted(set(cfg.loss_weights) - known)}; known: {sorted(known)}")
        LossWeights(**cfg.loss_weights)  # its own range checks
        if cfg.stage != "adapt":
            raise ValueError("loss_weights shape how accuracy is shared across budgets: stage adapt only")
    if cfg.num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {cfg.num_workers}")
    if cfg.scheduler_lr is not None and not cfg.scheduler_lr > 0:
        raise ValueError(f"scheduler_lr must be > 0, got {cfg.scheduler_lr}")
    if cfg.checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {cfg.checkpoint_every}")
    if cfg.gumbel_tau is not None and not cfg.gumbel_tau > 0:
        raise ValueError(f"gumbel_tau must be > 0, got {cfg.gumbel_tau}")
    if cfg.val_every < 0 or cfg.val_examples < 1:
        raise ValueError(f"val_every must be >= 0 and val_examples >= 1, got {cfg.val_every}, {cfg.val_examples}")
    if cfg.val_every > 0 and cfg.dataset != "bundled":
        raise ValueError("val_every: only the bundled dataset has a validation split here (a JSON dataset has one file)")
    if cfg.val_every > 0 and cfg.strategy == "fsdp":
        raise ValueError("val_every runs rank 0's unsharded model: not with strategy fsdp")


BUILT_PRESETS = ("tiny", "smol")  # presets a stage can start from without init_from


def validate_baseline(cfg: TrainConfig) -> None:
    """The baseline stages' own settings (adallava.baselines): known keys, in range, on a model they fit."""
    from adallava.baselines import BASELINE_STAGES, baseline_args

    if cfg.stage not in BASELINE_STAGES:
        if cfg.baseline_args:
            raise ValueError(f"baseline_args apply to stages {list(BASELINE_STAGES)}, not stage {cfg.stage}")
        return
    baseline_args(cfg.baseline_args)
    if cfg.freeze_language_model:
        raise ValueError(f"stage {cfg.stage} fine-tunes the language model: freeze_language_model must be false")
    if cfg.stage == "layerskip" and cfg.strategy == "fsdp":
        # the early exits call the final norm and lm_head outside the wrapped forward, where FSDP has resharded them
        raise ValueError("stage layerskip runs its early exits outside the FSDP-wrapped forward: use strategy ddp")


def baseline_step_loss(cfg: TrainConfig, model, unwrapped, inputs: dict):
    """One micro-batch's loss in a baseline stage (layerskip / layerdrop): the recipe in adallava.baselines, run through
    the (possibly DDP-wrapped) `model`; `unwrapped` gives the shared final norm and lm_head of LayerSkip's exits."""
    from adallava.baselines import baseline_args, baseline_loss

    return baseline_loss(cfg.stage, model, inputs, baseline_args(cfg.baseline_args), unwrapped=unwrapped)[0]


def param_groups(cfg: TrainConfig, model) -> list[dict]:
    """Trainable parameters as optimizer groups: the scheduler and the latency encoder at cfg.scheduler_lr when set,
    everything else at cfg.lr. Names may carry a wrapper's prefix (DDP's module., FSDP's)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.scheduler_lr is None:
        return [{"params": [p for _, p in trainable]}]
    own = lambda n: any(part in ("scheduler", "latency_encoder") for part in n.split(".")[:3])  # noqa: E731
    groups = [{"params": [p for n, p in trainable if not own(n)]},
              {"params": [p for n, p in trainable if own(n)], "lr": cfg.scheduler_lr}]  # fmt: skip
    return [g for g in groups if g["params"]]


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(directory: Path, model, processor, optimizer_state, scheduler, state: dict, model_state=None):
    """Write a complete checkpoint into `directory` atomically: everything goes to a sibling staging folder that is
    renamed into place only once the state file (written last) is there. presets.load(directory) loads the model."""
    import torch

    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    from adallava import lora

    if lora.has_lora(model):  # base weights under their own names + the adapters beside them (presets.load joins them)
        lora.save_lora(model, staging, model_state)
        model_state = lora.base_state_dict(model, model_state)
    model.save_pretrained(staging, state_dict=model_state)
    processor.save_pretrained(staging)
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
               staging / OPTIM_FILE)  # fmt: skip
    (staging / STATE_FILE).write_text(json.dumps(state, indent=1))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)
    return directory


def read_state(directory: Path) -> dict:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: incomplete checkpoint (no {STATE_FILE})")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------------------
# the loop each worker runs


def progress_line(stage: str, step: int, steps: int, loss: float, lr: float, steps_per_s: float, eta_s: float) -> str:
    """One self-contained progress line (for logs: no bar, no carriage return, no cursor codes)."""
    eta = f"{int(eta_s) // 3600}h{int(eta_s) % 3600 // 60:02d}m" if eta_s >= 3600 else f"{int(eta_s) // 60}m{int(eta_s) % 60:02d}s"
    return (f"[{stage}] step {step}/{steps} ({100 * step / steps:.0f}%) loss {loss:.4f} lr {lr:.2e} "
            f"{steps_per_s:.2f} it/s ETA {eta}")  # fmt: skip


def _build_model(cfg: TrainConfig, checkpoint_dir: Path | None):
    from adallava import presets

    if checkpoint_dir is not None:
        model, processor = presets.load(checkpoint_dir)
    elif cfg.init_from:
        model, processor = presets.load(project_path(cfg.init_from))
    elif cfg.preset == "smol":  # SmolLM2-135M's real weights, a fresh vision tower (converted once per machine)
        model, processor = presets.load("smol", seed=cfg.seed, **cfg.model_overrides)
    else:
        model, processor = presets.build_tiny(seed=cfg.seed, **cfg.model_overrides)
    if cfg.gumbel_tau is not None:  # read at every forward; saved with the checkpoint's config
        model.config.gumbel_tau = float(cfg.gumbel_tau)
    return model, processor


def validation_loss(model, batch: dict, budgets: list[float], autocast) -> dict:
    """Plain next-token loss on a fixed validation batch at each budget (eval mode: deterministic plans) and its mean
    over the budgets, as 'val_loss'. Runs on the unwrapped model of one worker: no collective inside."""
    import torch

    was_training = model.training
    model.eval()
    out = {}
    with torch.no_grad(), autocast:
        for b in budgets:
            out[f"val_loss_{b:.3f}"] = float(model(**batch, budget=b).loss)
    model.train(was_training)
    out["val_loss"] = sum(out.values()) / len(out)
    return out


def _gather_bad_records(dataset, collator, world_size):
    """Bad-record counts of every worker, merged (the same on every rank)."""
    import torch.distributed as dist

    mine = {"report": dataset.report.as_dict(), "collator": _collator_report(collator)}
    everyone = [None] * world_size
    if world_size > 1 and dist.is_initialized():
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    return merge_bad_record_reports(everyone)


def _collator_report(collator) -> dict:
    report = getattr(collator, "report", None)
    if report is not None:
        return report.as_dict()
    return {"counts": {"dropped": int(getattr(collator, "dropped", 0))}, "examples": {}}


# Found when an image is decoded, i.e. by the worker whose batch held the record; every other reason is found while
# reading the file, which every worker does in full.
DECODE_REASONS = ("bad_image",)


def merge_bad_record_reports(reports: list[dict]) -> dict:
    """Merge per-worker {"report": BadRecordReport.as_dict(), "collator": ...}: read-time reasons counted once (rank 0),
    decode-time reasons and collator drops summed over workers."""
    first = reports[0]["report"]
    counts = dict(first.get("counts", {}))
    examples = {k: list(v) for k, v in first.get("examples", {}).items()}
    for r in reports[1:]:
        rep = r["report"]
        for reason in DECODE_REASONS:
            n = int(rep.get("counts", {}).get(reason, 0))
            if n:
                counts[reason] = counts.get(reason, 0) + n
                ex = examples.setdefault(reason, [])
                ex.extend(i for i in rep.get("examples", {}).get(reason, []) if i not in ex)
                del ex[5:]
    collator_dropped = sum(int(sum((r["collator"].get("counts") or {}).values())) for r in reports)
    return {
        "total_records": first.get("total"), "skipped": sum(counts.values()), "counts": counts,
        "examples": examples, "collator_dropped": collator_dropped,
    }  # fmt: skip


def _quiet_ray_train_worker_logs(level: str) -> None:
    """Ray Train logs every report() at INFO through a logger named after its source file, which LoggingConfig's
    level does not reach; hold it at the configured level too (one line per step otherwise)."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(level)


class _ConfiguredModel:
    """A DDP/FSDP-wrapped model that still answers .config (for adallava.objective.adaptive_loss)."""

    def __init__(self, wrapped, config):
        self.wrapped, self.config = wrapped, config

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)


def shard_per_layer(model, device):
    """FSDP2 over the initialised process group: each decoder layer is its own unit (its parameters, gradients and
    optimizer state sharded, gathered only around that layer's call), then the rest of the model as the root unit.
    The decoder loop runs a layer through its LAYER_METHOD, which FSDP wraps like a forward."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from adallava.modeling import LAYER_METHOD

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model.bind_layer_forwards()
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
        register_fsdp_forward_method(layer, LAYER_METHOD)
    fully_shard(model, mesh=mesh)
    return model


def _has_lora(model) -> bool:
    from adallava.lora import has_lora

    return has_lora(model)


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import mlflow
    import ray.train
    import ray.train.torch
    import torch
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
    )  # fmt: skip
    from transformers import get_cosine_schedule_with_warmup

    from adallava.data import TrainCollator, load_llava_json

    cfg = TrainConfig(**config["cfg"])
    _quiet_ray_train_worker_logs(cfg.log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    # ---- model: from the latest checkpoint (restart), else init_from, else random init (stage base, tiny)
    checkpoint = ray.train.get_checkpoint()
    resume_dir = None
    state = {"step": 0, "micro_batch": 0, "tokens": 0, "samples": 0}
    # The checkpoint in place on local storage; a download (remote storage), shared by this node's workers, that Ray
    # removes when the last of them closes `resume` (to_directory() copied it to /tmp and left the copy there: 1.6 GB
    # per resume of the smol preset).
    resume = contextlib.ExitStack()
    if checkpoint is not None:
        resume_dir = Path(resume.enter_context(checkpoint.as_directory()))
        state = read_state(resume_dir)
    model, processor = _build_model(cfg, resume_dir)
    if cfg.freeze_vision_tower:  # spec 4: CLIP frozen; projector, LM, latency encoder and scheduler train
        model.model.vision_tower.requires_grad_(False)
    if cfg.lora and not _has_lora(model):  # a resumed checkpoint brings its adapters back (presets.load)
        from adallava.lora import add_lora

        add_lora(model, **cfg.lora)
    if cfg.freeze_language_model:  # LLaVA stage 1: the LM (and its tied lm_head) stays as it is
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    unwrapped = model
    if cfg.strategy == "fsdp":
        model = shard_per_layer(model.to(device), device)
    else:
        # Some parameters get no gradient in some steps (the scheduler when every budget in a batch is 0.5, the
        # projector in a text-only batch): DDP must not wait for them.
        model = ray.train.torch.prepare_model(model, parallel_strategy="ddp",
                                              parallel_strategy_kwargs={"find_unused_parameters": True})  # fmt: skip
    torch.manual_seed(cfg.seed * 1000 + rank + 7919 * state["step"])  # budgets and Gumbel noise differ per worker

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(cfg, model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dataset = load_llava_json(config["train_json"], config["image_root"], on_bad=cfg.on_bad)
    accum = grad_accumulation(cfg, world)
    steps = total_steps(cfg, len(dataset), world)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps), num_training_steps=steps
    )
    if cfg.min_lr_ratio > 0:  # cosine to a floor instead of 0
        base = scheduler.lr_lambdas[0]  # the same cosine for every parameter group
        floor = lambda s: max(base(s), cfg.min_lr_ratio) if s >= int(cfg.warmup_ratio * steps) else base(s)  # noqa: E731
        scheduler.lr_lambdas = [floor] * len(scheduler.lr_lambdas)
    if resume_dir is not None:
        saved = torch.load(resume_dir / OPTIM_FILE, weights_only=False)
        # strict=False: a parameter that never had a gradient (e.g. the vision tower's last layer, whose output LLaVA
        # does not read with vision_feature_layer=-2) has no AdamW state yet, exactly as in the uninterrupted run
        set_optimizer_state_dict(model, optimizer, saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, strict=False))  # fmt: skip
        scheduler.load_state_dict(saved["scheduler"])
        del saved
    resume.close()

    collator = TrainCollator(processor, max_length=cfg.max_length)
    batches = micro_batch_indices(len(dataset), cfg.micro_batch_size, world, rank, cfg.data_seed, state["micro_batch"])
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=(idx for _, idx in batches), collate_fn=collator)
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False, move_to_device=True)
    budget = 1.0 if cfg.stage == "base" else None  # None in train mode: one random budget per sample (spec 2.5)
    val_batch = None
    if cfg.val_every > 0 and rank == 0:
        from adallava.budget import budget_grid

        val_set = load_llava_json(config["val_json"], config["image_root"], on_bad=cfg.on_bad)
        # its own collator: validation drops must not count as training bad records
        val_batch = TrainCollator(processor, max_length=cfg.max_length)([val_set[i] for i in range(min(cfg.val_examples, len(val_set)))])
        if val_batch is None:
            raise ValueError(f"val_every: none of the first {cfg.val_examples} validation records could be read")
        val_batch = {k: val_batch.get(k) for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
        val_batch = {k: (v.to(device) if v is not None else None) for k, v in val_batch.items()}
        val_budgets = budget_grid(unwrapped.config) if cfg.stage == "adapt" else [1.0]
    weights = None
    if cfg.loss_weights:
        from adallava.objective import LossWeights, adaptive_loss

        weights = LossWeights(**cfg.loss_weights)
        as_model = _ConfiguredModel(model, unwrapped.config)  # adaptive_loss reads model.config; DDP hides it
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    run_id = config["mlflow_run_id"]
    if rank == 0 and run_id:
        mlflow.set_tracking_uri(config["tracking_uri"])
        mlflow.start_run(run_id=run_id)
    # Progress from rank 0: one plain line per 5% of the steps, the same in a terminal, a file and `ray job logs`. Not
    # a bar: a worker's tqdm (also Ray's tqdm_ray) reaches the driver through Ray Train's print patch, which drops or
    # doubles lines depending on how the worker's stdout is wrapped, and a bar in a file is cursor codes.
    progress_lines = rank == 0 and cfg.progress
    line_every = max(1, steps // 20)
    t_loop, t_line, step_line = time.perf_counter(), time.perf_counter(), state["step"]
    resumed_from = state["step"]
    ckpt_root = Path(config["local_checkpoint_root"])
    it = iter(loader)
    t_window, window = time.perf_counter(), torch.zeros(2, dtype=torch.float64)  # samples, tokens since last log
    while state["step"] < steps:
        step = state["step"] + 1
        if cfg.fail_at_step == step and cfg.fail_marker and not Path(cfg.fail_marker).exists() and rank == world - 1:
            # Fault injection (tests): this worker process dies without cleanup, once.
            Path(cfg.fail_marker).write_text(f"worker rank {rank} pid {os.getpid()} exited at step {step}\n")
            os._exit(1)
        # [loss, samples, loss tokens] of this step on this worker
        totals = torch.zeros(3, dtype=torch.float64)
        for micro in range(accum):
            batch = next(it)
            while batch is None:  # every record of the micro-batch was unreadable (counted by the collator)
                batch = next(it)
            # gradients are all-reduced once per optimizer step, on the last micro-batch
            sync = micro == accum - 1 or cfg.strategy == "fsdp"
            with model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext():
                inputs = {k: batch.get(k) for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
                with autocast:
                    if cfg.stage in ("layerskip", "layerdrop"):
                        loss = baseline_step_loss(cfg, _ConfiguredModel(model, unwrapped.config), unwrapped, inputs) / accum
                    elif weights is None:
                        loss = model(**inputs, budget=budget).loss / accum
                    else:
                        loss = adaptive_loss(as_model, inputs, weights)[0] / accum
                loss.backward()
            totals += torch.tensor([float(loss.detach()), batch["input_ids"].shape[0], float((batch["labels"] != -100).sum())],
                                   dtype=torch.float64)  # fmt: skip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:  # gloo/NCCL: sums over workers
            totals = totals.to(device)
            torch.distributed.all_reduce(totals)
            totals = totals.cpu()
        window += totals[1:]
        state["step"] = step
        state["micro_batch"] += accum
        state["samples"] += int(totals[1])
        state["tokens"] += int(totals[2])
        metrics = {"loss": float(totals[0]) / world, "lr": scheduler.get_last_lr()[0], "step": step,
                   "resumed_from_step": resumed_from}  # fmt: skip
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        val_step = cfg.val_every > 0 and (step % cfg.val_every == 0 or step == steps)
        if val_step and val_batch is not None:  # rank 0; the others wait at the report() below
            metrics.update(validation_loss(unwrapped, val_batch, val_budgets, autocast))
        if step % cfg.log_every == 0 or step == steps:
            dt = time.perf_counter() - t_window
            metrics["samples_per_s"], metrics["tokens_per_s"] = float(window[0]) / dt, float(window[1]) / dt
            t_window, window = time.perf_counter(), torch.zeros(2, dtype=torch.float64)
            if rank == 0 and run_id:
                mlflow.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)
        if progress_lines and (step % line_every == 0 or step == steps):
            now = time.perf_counter()
            # sys.stdout, not print: Ray Train patches print() on workers to log *and* echo, which doubles each line
            sys.stdout.write(progress_line(cfg.stage, step, steps, metrics["loss"], metrics["lr"],
                                           (step - step_line) / (now - t_line),
                                           (steps - step) * (now - t_loop) / (step - resumed_from)) + "\n")  # fmt: skip
            sys.stdout.flush()
            t_line, step_line = now, step
        last = step == steps
        ckpt = None
        if step % cfg.checkpoint_every == 0 or last:
            # Collective in FSDP (parameters and optimizer state are gathered); a plain copy in DDP.
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(model, options=opts) if cfg.strategy == "fsdp" else None
            optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
            if last:
                metrics["bad_records"] = _gather_bad_records(dataset, collator, world)
            if rank == 0:
                state_out = dict(state, run_id=run_id, stage=cfg.stage, total_steps=steps, config=config["cfg"])
                d = save_checkpoint(ckpt_root / f"step_{step:07d}", unwrapped, processor, optim_state, scheduler,
                                    state_out, model_state)  # fmt: skip
                ckpt = ray.train.Checkpoint.from_directory(d)
        # report() is a barrier across workers: every report_every steps, and with every checkpoint
        if ckpt is not None or step % cfg.report_every == 0 or step % cfg.checkpoint_every == 0 or last or val_step:
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{step:07d}" if ckpt else None)
        if ckpt is not None:
            shutil.rmtree(ckpt.path, ignore_errors=True)  # persisted to storage by report(); the local copy goes
    if rank == 0 and run_id:
        mlflow.end_run()


# ---------------------------------------------------------------------------------------------------------------
# the driver


@dataclass
class TrainOutcome:
    result: object  # ray.train.Result
    final_checkpoint: Path | None  # presets.load(final_checkpoint) -> (model, processor)
    mlflow_run_id: str
    bad_records: dict
    wall_s: float
    registered_model: str | None = None  # models:/<name>/<version> of the checkpoint (stage adapt), else None


def run(cfg: TrainConfig, callbacks: list | None = None, tags: dict | None = None) -> TrainOutcome:
    """Train with `cfg` on Ray Train (joining or starting a cluster). callbacks: Ray Train callbacks (a Tune trial
    passes ray.tune.integration.ray_train.TuneReportCallback); tags: extra MLflow run tags (mlflow.parentRunId nests
    the run under a sweep's parent run)."""
    import mlflow
    import ray.train
    from ray.train.torch import TorchTrainer

    validate(cfg)
    train_json, image_root = prepare_dataset(cfg)
    # a new run unless a name is given: Ray Train resumes a run of the same name from its latest checkpoint
    name = cfg.name or f"{cfg.preset}-{cfg.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = resolve_storage_path(cfg.storage_path)
    started = init_ray(cfg.address)
    try:
        uri = tracking_uri(cfg.mlflow_tracking_uri)
        exp_id = mlflow_experiment(uri, cfg.experiment)
        client = mlflow.MlflowClient(uri)
        tags = {"preset": cfg.preset, "stage": cfg.stage, "dataset": cfg.dataset,
                "mlflow.runName": name, "ray.storage": f"{storage}/{name}", **(tags or {})}  # fmt: skip
        mlrun = client.create_run(exp_id, run_name=name, tags=tags)
        run_id = mlrun.info.run_id
        params = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in as_dict(cfg).items()}
        params.update(train_json=str(train_json), grad_accumulation=grad_accumulation(cfg, cfg.num_workers))
        for k, v in params.items():
            client.log_param(run_id, k, v)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "cfg": as_dict(cfg), "train_json": str(train_json),
                "image_root": None if image_root is None else str(image_root), "mlflow_run_id": run_id,
                "val_json": str(prepare_dataset(cfg, "validation")[0]) if cfg.val_every > 0 else None,
                "tracking_uri": uri,
                # where rank 0 stages a checkpoint before report() persists it to storage_path
                "local_checkpoint_root": str(Path(os.environ.get("TMPDIR", "/tmp")) / "adallava-ckpt" / name / run_id),
            },  # fmt: skip
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep),
                logging_config=ray.train.LoggingConfig(log_level=cfg.log_level), callbacks=callbacks or None,
            ),  # fmt: skip
        )
        t0 = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception:
            client.set_terminated(run_id, "FAILED")
            raise
        wall = time.perf_counter() - t0
        final = Path(result.checkpoint.path) if result.checkpoint is not None else None
        bad = (result.metrics or {}).get("bad_records", {})
        client.log_metric(run_id, "train_wall_s", wall)
        for reason, n in (bad.get("counts") or {}).items():
            client.log_metric(run_id, f"bad_records/{reason}", n)
        client.log_metric(run_id, "bad_records/collator_dropped", bad.get("collator_dropped", 0))
        client.log_dict(run_id, bad, "bad_records.json")
        if final is not None and "://" not in str(final):
            # the final model as artifacts: the save_pretrained folder (optimizer state stays in Ray's storage)
            for f in sorted(final.iterdir()):
                if f.is_file() and f.name != OPTIM_FILE:
                    client.log_artifact(run_id, str(f), artifact_path="model")
        client.set_tag(run_id, "final_checkpoint", str(final))
        client.set_terminated(run_id, "FINISHED")
        _print_summary(cfg, result, final, bad, wall, run_id)
        registered = register_final_checkpoint(cfg, client, run_id, final, result)
        return TrainOutcome(result=result, final_checkpoint=final, mlflow_run_id=run_id, bad_records=bad, wall_s=wall,
                            registered_model=registered)  # fmt: skip
    finally:
        if started:
            import ray

            ray.shutdown()


def register_final_checkpoint(cfg: TrainConfig, client, run_id: str, final: Path | None, result) -> str | None:
    """Stage adapt: the final checkpoint becomes a new version of registered model `cfg.registered_model` in the
    MLflow Model Registry (registry/), with the run, preset, granularity and final loss on it. Returns its
    models:/<name>/<version> URI (None for stage base, or registered_model=null)."""
    if cfg.stage != "adapt" or not cfg.registered_model or final is None:
        return None
    from registry import register_checkpoint

    model_config = json.loads((final / "config.json").read_text()) if "://" not in str(final) else {}
    m = result.metrics or {}
    tags = {"preset": cfg.preset, "stage": cfg.stage, "granularity": model_config.get("granularity", "unknown"),
            "steps": m.get("step"), "final_loss": f"{m.get('loss', float('nan')):.4f}", "checkpoint": str(final),
            "dataset": cfg.dataset, "mlflow_run_name": client.get_run(run_id).info.run_name}  # fmt: skip
    # a checkpoint in remote storage was not logged as run artifacts: the version points at it where it is
    source = str(final) if "://" in str(final) else None
    mv = register_checkpoint(run_id, cfg.registered_model, tags=tags, tracking_uri=tracking_uri(cfg.mlflow_tracking_uri),
                             source=source)  # fmt: skip
    uri = f"models:/{mv.name}/{mv.version}"
    client.set_tag(run_id, "registered_model", uri)
    print(f"[{cfg.stage}] registered as {uri} (MLflow Model Registry; serve it: python -m serve --model {uri})")
    return uri


def _print_summary(cfg, result, final, bad, wall, run_id):
    m = result.metrics or {}
    print(f"\n[{cfg.stage}] {m.get('step')} steps in {wall:.0f} s, final loss {m.get('loss', float('nan')):.4f}")
    if m.get("resumed_from_step"):
        print(f"[{cfg.stage}] resumed from the checkpoint of step {m['resumed_from_step']} after a failure")
    counts = bad.get("counts") or {}
    skipped = sum(counts.values())
    line = ", ".join(f"{k}: {v} (e.g. {', '.join(map(str, bad['examples'].get(k, [])[:3]))})" for k, v in counts.items())
    print(f"[{cfg.stage}] bad records skipped: {skipped}" + (f" ({line})" if line else "")
          + f"; collator dropped {bad.get('collator_dropped', 0)}")  # fmt: skip
    print(f"[{cfg.stage}] final checkpoint: {final}")
    print(f"[{cfg.stage}] MLflow run {run_id}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file (pipelines/configs/*.yaml)")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. max_steps=20 lr=3e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        if args.address:
            cfg.address = args.address
        validate(cfg)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
