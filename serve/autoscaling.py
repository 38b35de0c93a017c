"""The model deployment's autoscaling policy: replicas for the offered demand at full budget.

Serve's default policy scales on ongoing requests per replica. Under overload that undercounts: requests refused with
429 leave within milliseconds, and load-aware budgets make the admitted ones cheaper, so the deployment looks busy but
not overloaded. Here the demand is what clients *offered*, refusals included:

  - the ingress counts every chat completion it receives (admitted or refused) and stamps the running total on each
    request it sends to the model (`Job.offered`; no extra RPC);
  - each model replica's `record_autoscaling_stats()` (Ray 2.60: a replica method Serve calls and pushes to the
    controller) turns the totals it has seen into `offered_rps` over the look-back window, and reports `capacity_rps`:
    what one replica sustains at the ceiling budget (serve.policy.capacity_rps) times policy.target_utilization;
  - this policy (`autoscaling_config.policy.policy_function`) asks for ceil(offered / capacity) replicas.

Sizing for the ceiling budget means that once the new replicas run, requests meet their deadlines at full budget again;
the budgets themselves return to full as soon as the queues drain (serve/policy.py: no state survives a burst).
Serve wraps the function with min/max replicas, the up/down-scale delays and factors (autoscaling_policy.py's
`_apply_autoscaling_config`). Each replica sees the same ingress totals, so the offered rate is the maximum over
replicas, not their sum.
"""

from __future__ import annotations

import math
from collections import deque

OFFERED, CAPACITY = "offered_rps", "capacity_rps"


def offered_demand_policy(ctx) -> tuple[int, dict]:
    """ray.serve.config.AutoscalingContext -> (replicas wanted, policy state). Keeps the current number while no
    replica has reported (a fresh deployment, metrics not pushed yet)."""
    metrics = ctx.aggregated_metrics or {}
    offered = [v for v in (metrics.get(OFFERED) or {}).values() if v is not None and math.isfinite(v)]
    capacity = [v for v in (metrics.get(CAPACITY) or {}).values() if v is not None and math.isfinite(v) and v > 0]
    if not offered or not capacity:
        return ctx.current_num_replicas, {}
    wanted = math.ceil(max(offered) / min(capacity) - 1e-9)
    return max(ctx.capacity_adjusted_min_replicas, min(ctx.capacity_adjusted_max_replicas, max(wanted, 1))), {}


class OfferedRate:
    """The ingress's running total of offered requests, as seen on the jobs a replica receives, -> a rate over the last
    `window_s` seconds. Totals arrive out of order (requests overtake each other): only the highest counts."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()  # (time, total), totals increasing
        self.before: tuple[float, int] | None = None  # the last sample that left the window

    def observe(self, now: float, total: int):
        if self.samples and total <= self.samples[-1][1]:
            return
        self.samples.append((now, total))

    def rate(self, now: float) -> float:
        while self.samples and self.samples[0][0] < now - self.window_s:
            self.before = self.samples.popleft()
        if not self.samples:
            return 0.0
        base = self.before[1] if self.before is not None else self.samples[0][1]
        return max(self.samples[-1][1] - base, 0) / self.window_s
