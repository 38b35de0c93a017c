"""ServeConfig: everything the application needs. YAML `args:`, `python -m serve` flags and `key=value` overrides map
onto these names (dotted for policy.* and limits.*)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass

from serve.policy import PolicyConfig
from serve.protocol import Limits

API_KEY_ENV = "ADALLAVA_API_KEY"  # the API key, when not given as a flag or config value


@dataclass
class ServeConfig:
    model: str = "tiny"  # "tiny" (random-init preset) or a checkpoint directory (adallava.presets.load)
    model_name: str = "adallava"  # the id /v1/models lists and responses carry
    seed: int = 0  # for the tiny preset's random init (every replica builds the same weights)
    # continuous batching: at most this many requests decode together in a replica; others wait for a free row
    max_batch_size: int = 8
    torch_threads: int = 1  # one core per replica on small CPU machines; raise on bigger ones
    num_cpus: float = 1.0  # Ray resources per model replica
    # bounded queues: a model replica holds at most max_batch_size running + max_queued_requests waiting (Serve's
    # max_ongoing_requests), the ingress sends at most replicas * that, and Serve's max_queued_requests (max_replicas *
    # that) bounds what waits at the ingress's handle; beyond any bound: 429 + Retry-After (code "overloaded")
    max_queued_requests: int = 8
    # autoscaling on offered demand, refusals included, sized for the ceiling budget (serve/autoscaling.py)
    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: int | None = None
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    # window of the offered-demand rate the autoscaler reads; Ray needs it above the replicas' metric push interval
    # (RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S, 10 s by default), or it warns and averages one sample
    look_back_period_s: float = 12.0
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    load_report_interval_s: float = 0.1  # replicas <-> load board; budgets react within a few of these
    stale_after_s: float = 1.0  # a replica silent for this long no longer counts
    profile_tokens: int = 8  # decode steps per profile measurement at replica start
    # latency profiles are cached per hardware kind (CPU model / GPU name, torch threads, max_batch_size, model
    # architecture): a replica that starts under load reuses the one measured quiet. None: ~/.cache/adallava/profiles
    profile_cache: str | None = None
    # a latency table instead of measuring (serve.policy.LatencyProfile's keys; taken as is, no contention factor):
    # for deployments that know their costs, and for tests whose decisions must depend on counts, not machine speed
    profile: dict | None = None
    # test hooks (a replica failing its health check, the engine paused, the replica's clock moved); never in production
    fault_injection: bool = False
    # HTTP: an API key (Bearer) on /v1/* when set (or from $ADALLAVA_API_KEY); CORS off unless origins are listed
    api_key: str | None = None
    cors_allow_origins: list[str] = field(default_factory=list)
    cors_allow_methods: list[str] = field(default_factory=lambda: ["GET", "POST", "OPTIONS"])
    cors_allow_headers: list[str] = field(default_factory=lambda: ["Authorization", "Content-Type"])
    cors_allow_credentials: bool = False
    health_timeout_s: float = 2.0  # /health: a model replica must answer within this
    image_decode_concurrency: int = 2  # images decoded at once in the ingress's threads (memory stays bounded)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    limits: Limits = field(default_factory=Limits)

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None


def make_config(args: dict | None = None) -> ServeConfig:
    """dict (nested or dotted keys, e.g. {"policy": {"slo_ms": 900}} or {"policy.slo_ms": 900}) -> ServeConfig."""
    if isinstance(args, ServeConfig):
        return args
    cfg = ServeConfig()
    for key, value in (args or {}).items():
        if isinstance(value, dict) and is_dataclass(getattr(cfg, key, None)):
            for k, v in value.items():
                _set(cfg, f"{key}.{k}", v)
        else:
            _set(cfg, key, value)
    return cfg


def _set(cfg, dotted: str, value):
    parts = dotted.split(".")
    target = cfg
    for part in parts[:-1]:
        if not is_dataclass(getattr(target, part, None)):
            raise ValueError(f"unknown config section {part!r} in {dotted!r}")
        target = getattr(target, part)
    name = parts[-1]
    known = {f.name: f for f in fields(target)}
    if name not in known:
        raise ValueError(f"unknown config key {dotted!r}; known: {sorted(known)}")
    current = getattr(target, name)
    if isinstance(value, str) and not isinstance(current, str):  # a CLI override: parse as YAML scalar/list
        import yaml

        value = yaml.safe_load(value)
    setattr(target, name, value)


def config_dict(cfg: ServeConfig) -> dict:
    return asdict(cfg)
