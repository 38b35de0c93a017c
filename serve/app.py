"""The Ray Serve application: builds the graph `Ingress (HTTP) -> AdaLlavaModel (replicas)` from a ServeConfig.

serve/ is one file per role:
  config.py    ServeConfig and how YAML args / key=value overrides map onto it
  protocol.py  the OpenAI schema, validation (4xx, never 5xx), images, response bodies, stop sequences
  ingress.py   the HTTP edge: API key, CORS, body limit, validation, each request's deadline, admission (429 before
               any image is decoded), images decoded in threads, SSE
  replica.py   the model deployment: adallava.engine's continuous batching in a thread, budgets chosen at join, the
               latency profile (measured once per hardware kind, cached), metrics, the load board
  policy.py    deadlines -> admission and budgets (SlackFit), the latency model: pure functions
  autoscaling.py  replicas for the offered demand (refusals included) at full budget: a custom Serve policy

Bounds (no unbounded queue): a model replica takes at most max_batch_size + max_queued_requests requests (the
ingress's exact count; Serve's max_ongoing_requests is that + 2 for control calls), the ingress's handle queues at
most max_replicas times that (Serve's max_queued_requests, no more than the ingress can have admitted;
BackPressureError -> 429), and the Ingress deployment has its own max_ongoing/max_queued bound, answered by Serve's
proxy with 429 + Retry-After (BackpressureConfig).

`serve run serve/configs/tiny.yaml` and `serve run serve.app:build_app` import `build_app` from here.
"""

from __future__ import annotations

from ray.serve.config import BackpressureConfig, DeploymentActorConfig

from serve.config import ServeConfig, config_dict, make_config
from serve.ingress import Ingress, OpenAIServer, create_app
from serve.replica import AdaLlavaModel, Job, LoadBoard


def build_app(args: dict | ServeConfig | None = None):
    """Application builder for `serve run serve.app:build_app` and Serve config files (args: see ServeConfig)."""
    cfg = make_config(args)
    if not (isinstance(cfg.max_queued_requests, int) and cfg.max_queued_requests >= 1):
        raise ValueError(f"max_queued_requests must be an integer >= 1, got {cfg.max_queued_requests!r}")
    autoscaling = {
        "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
        "initial_replicas": cfg.initial_replicas, "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s, "look_back_period_s": cfg.look_back_period_s,
        "policy": {"policy_function": "serve.autoscaling:offered_demand_policy"},
    }  # fmt: skip
    per_replica = cfg.max_batch_size + cfg.max_queued_requests
    # The handle's queue holds requests the router has not yet handed to a replica, and every request passes through
    # it, even when a replica has room: a burst of admitted requests arriving together sits there while the router
    # probes the replicas. Sized to the most the ingress ever admits, it bounds the queue without refusing a request
    # that the ingress's exact count (the real bound) let through (seen: a burst of 4 with room for 4, and 2 here, lost
    # one to back-pressure on a busy machine).
    handle_queue = cfg.max_replicas * per_replica
    shed = BackpressureConfig(status_code=429, retry_after_s=1)
    model = AdaLlavaModel.options(
        # + 2: room for the info()/ping() control calls, which Serve counts too (the ingress's exact count keeps the
        # chat requests themselves to per_replica)
        autoscaling_config=autoscaling, max_ongoing_requests=per_replica + 2,
        max_queued_requests=handle_queue, backpressure_config=shed,
        ray_actor_options={"num_cpus": cfg.num_cpus}, health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=cfg.health_check_timeout_s,
        deployment_actors=[DeploymentActorConfig(name="load_board", actor_class=LoadBoard,
                                                 init_kwargs={"stale_after_s": cfg.stale_after_s},
                                                 actor_options={"num_cpus": 0})],
    ).bind(cfg)  # fmt: skip
    # the ingress holds what it admitted (at most max_replicas * per_replica) plus requests being parsed or refused
    edge = 2 * cfg.max_replicas * per_replica + 16
    ingress = Ingress.options(max_ongoing_requests=edge, max_queued_requests=edge, backpressure_config=shed)
    return ingress.bind(model, cfg)


__all__ = ["ServeConfig", "make_config", "config_dict", "build_app", "LoadBoard", "AdaLlavaModel", "Ingress", "Job",
           "OpenAIServer", "create_app"]  # fmt: skip
