"""The Ray Serve application: builds the graph `Ingress (HTTP) -> AdaLlavaModel (replicas)` from a ServeConfig.

serve/ is one file per role:
  config.py    ServeConfig and how YAML args / key=value overrides map onto it
  protocol.py  the OpenAI schema, validation (4xx, never 5xx), images, response bodies, stop sequences
  ingress.py   the HTTP edge: API key, CORS, body limit, validation, images decoded in threads, SSE
  replica.py   the model deployment: adallava.engine's continuous batching in a thread, metrics, the load board
  policy.py    cluster load -> each request's budget, and admission (429)

`serve run serve/configs/tiny.yaml` and `serve run serve.app:build_app` import `build_app` from here.
"""

from __future__ import annotations

from ray.serve.config import DeploymentActorConfig

from serve.config import ServeConfig, config_dict, make_config
from serve.ingress import Ingress, OpenAIServer, create_app
from serve.replica import AdaLlavaModel, Job, LoadBoard


def build_app(args: dict | ServeConfig | None = None):
    """Application builder for `serve run serve.app:build_app` and Serve config files (args: see ServeConfig)."""
    cfg = make_config(args)
    autoscaling = {
        "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
        "initial_replicas": cfg.initial_replicas, "target_ongoing_requests": cfg.target_ongoing_requests,
        "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s,
        "look_back_period_s": cfg.look_back_period_s, "metrics_interval_s": cfg.metrics_interval_s,
    }  # fmt: skip
    model = AdaLlavaModel.options(
        autoscaling_config=autoscaling, max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus}, health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=cfg.health_check_timeout_s,
        deployment_actors=[DeploymentActorConfig(name="load_board", actor_class=LoadBoard,
                                                 init_kwargs={"stale_after_s": cfg.stale_after_s},
                                                 actor_options={"num_cpus": 0})],
    ).bind(cfg)  # fmt: skip
    return Ingress.bind(model, cfg)


__all__ = ["ServeConfig", "make_config", "config_dict", "build_app", "LoadBoard", "AdaLlavaModel", "Ingress", "Job",
           "OpenAIServer", "create_app"]  # fmt: skip
