"""Cluster-wide load -> each request's budget. Pure functions plus one small stateful controller; no Ray, no torch.

The load signal is L = ongoing requests (running + waiting in the batch queue) summed over all replicas of the model
deployment, divided by the number of live replicas: requests per replica. (serve/app.py explains how the replicas
share their counts.)

Cost model (one function, `batch_ms`, swappable for adallava/cost.py tables later): each replica measures at start, for
every budget level b of the model's own grid, the wall time of a batch of 1 and of max_batch_size requests for the
prefill and for each decoded token; the time of a batch of n is the straight line between the two. A request that
arrives when a replica already holds L requests waits for about L / B batches of size min(L, B), its own included:

    predicted_ms(b, L) = max(1, L / B) * (prefill_ms(b, n) + tokens * decode_ms(b, n)),   n = min(max(L, 1), B)

The instantaneous policy picks the highest budget level whose predicted latency meets the target (SLO):

    f(L) = max{ b in levels : predicted_ms(b, L) <= slo_ms }, or the floor when none does.

predicted_ms is non-decreasing in L for every b (more batches ahead and fuller batches), so the feasible set shrinks
as L grows and f is monotone non-increasing in L. Profiles are made monotone in b at construction (cummax), so f is
well-defined even when the measurement is noisy.

Smoothing and hysteresis (BudgetController): L is smoothed with an exponential moving average (time constant
`smoothing_s`, about a second: the autoscaler looks back 30 s and waits before acting, so budgets settle well before it
moves). The budget falls as soon as f(smoothed L) says so, but rises only to f((1 + hysteresis) * smoothed L): a level
is regained only when the load has fallen clearly below the level that forced it down. In one line:

    b_next = min(f(L_s), max(b_now, f((1 + h) * L_s)))

Admission: when even the floor is predicted to take longer than reject_factor * slo_ms, the request is refused with
429 and Retry-After = the predicted excess, rounded up to whole seconds (what the queue needs to drain).

Caps: a client's `budget` and `latency_ms` only ever lower the budget (min of the server's choice and the caps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class PolicyConfig:
    floor: float = 0.5  # the lowest budget the server picks by itself (clients may ask for less)
    ceiling: float = 1.0  # the highest; floor == ceiling gives a static budget (the benchmark's baselines)
    slo_ms: float = 2000.0  # latency target the policy keeps requests under
    tokens: int = 32  # tokens per request the cost model assumes (the server's default max_tokens)
    smoothing_s: float = 1.0  # EMA time constant of the load signal
    hysteresis: float = 0.25  # a level comes back only when the load is 25% below the level that forced it down
    reject: bool = True  # 429 when even the floor cannot meet reject_factor * slo_ms; False: queue instead
    reject_factor: float = 1.0

    def check(self, budget_range: tuple[float, float]) -> "PolicyConfig":
        lo, hi = budget_range
        if not lo - 1e-9 <= self.floor <= self.ceiling <= hi + 1e-9:
            raise ValueError(f"policy needs {lo:g} <= floor <= ceiling <= {hi:g}; got floor={self.floor}, "
                             f"ceiling={self.ceiling}")  # fmt: skip
        for name in ("slo_ms", "tokens", "smoothing_s", "reject_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"policy.{name} must be > 0, got {getattr(self, name)}")
        if self.hysteresis < 0:
            raise ValueError(f"policy.hysteresis must be >= 0, got {self.hysteresis}")
        return self


@dataclass
class LatencyProfile:
    """Measured (or tabled) batch latencies per budget level; lists are aligned with `budgets` (ascending)."""

    budgets: list[float]
    max_batch_size: int
    prefill_ms_1: list[float]  # batch of 1
    prefill_ms_b: list[float]  # batch of max_batch_size
    decode_ms_1: list[float]  # per generated token
    decode_ms_b: list[float]
    source: str = "measured"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if list(self.budgets) != sorted(self.budgets) or not self.budgets:
            raise ValueError("profile budgets must be a non-empty ascending list")
        # more compute never predicts less time: cummax over budgets removes measurement noise
        for name in ("prefill_ms_1", "prefill_ms_b", "decode_ms_1", "decode_ms_b"):
            vals = [max(float(v), 0.0) for v in getattr(self, name)]
            if len(vals) != len(self.budgets):
                raise ValueError(f"profile.{name} needs one value per budget")
            setattr(self, name, [max(vals[: i + 1]) for i in range(len(vals))])

    def index(self, budget: float) -> int:
        """The grid level a budget runs as: the highest level <= budget (plans only change at grid steps)."""
        i = 0
        for j, b in enumerate(self.budgets):
            if b <= budget + 1e-9:
                i = j
        return i

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("budgets", "max_batch_size", "prefill_ms_1", "prefill_ms_b",
                                              "decode_ms_1", "decode_ms_b", "source")}  # fmt: skip


def batch_ms(profile: LatencyProfile, budget: float, n: float, tokens: int) -> float:
    """Wall time of one batch of n requests generating `tokens` tokens each at this budget (linear in n)."""
    i, B = profile.index(budget), profile.max_batch_size
    w = 0.0 if B <= 1 else (min(max(n, 1.0), B) - 1.0) / (B - 1.0)
    prefill = (1 - w) * profile.prefill_ms_1[i] + w * profile.prefill_ms_b[i]
    decode = (1 - w) * profile.decode_ms_1[i] + w * profile.decode_ms_b[i]
    return prefill + max(tokens - 1, 0) * decode


def predicted_latency_ms(profile: LatencyProfile, budget: float, load: float, tokens: int) -> float:
    """Predicted latency of a request that arrives when a replica holds `load` requests (its own included)."""
    load = max(float(load), 1.0)
    B = profile.max_batch_size
    return max(1.0, load / B) * batch_ms(profile, budget, min(load, B), tokens)


def levels(profile: LatencyProfile, cfg: PolicyConfig) -> list[float]:
    """The budgets the server may pick: the model's grid steps in [floor, ceiling] (the floor itself if none)."""
    inside = [b for b in profile.budgets if cfg.floor - 1e-9 <= b <= cfg.ceiling + 1e-9]
    return inside or [cfg.floor]


def budget_for_latency(target_ms: float, load: float, profile: LatencyProfile, cfg: PolicyConfig,
                       tokens: int | None = None) -> float:  # fmt: skip
    """The highest level predicted to finish within target_ms at this load; the floor when none does.
    This is the one place that maps latency to budget (both the SLO and a client's latency_ms go through it)."""
    tokens = cfg.tokens if tokens is None else tokens
    lv = levels(profile, cfg)
    ok = [b for b in lv if predicted_latency_ms(profile, b, load, tokens) <= target_ms]
    return max(ok) if ok else lv[0]


def budget_for_load(load: float, profile: LatencyProfile, cfg: PolicyConfig) -> float:
    """f(L): the instantaneous, monotone (non-increasing in L) policy."""
    return budget_for_latency(cfg.slo_ms, load, profile, cfg)


def retry_after_s(load: float, profile: LatencyProfile, cfg: PolicyConfig) -> int | None:
    """None when a request can be admitted; else the seconds to wait (>= 1) before the floor can meet the SLO."""
    if not cfg.reject:
        return None
    predicted = predicted_latency_ms(profile, levels(profile, cfg)[0], load, cfg.tokens)
    limit = cfg.reject_factor * cfg.slo_ms
    if predicted <= limit:
        return None
    return max(1, math.ceil((predicted - limit) / 1000.0))


def apply_caps(server_budget: float, budget_cap: float | None = None, latency_budget: float | None = None) -> float:
    """Client caps only lower the budget: never spend more than the client allows."""
    caps = [c for c in (budget_cap, latency_budget) if c is not None]
    return min([server_budget, *caps])


class BudgetController:
    """Smoothed load + hysteresis around budget_for_load (see the module docstring). One per replica."""

    def __init__(self, profile: LatencyProfile, cfg: PolicyConfig):
        self.profile, self.cfg = profile, cfg
        self.load: float | None = None  # smoothed requests per replica
        self.raw_load = 0.0
        self.budget = levels(profile, cfg)[-1]
        self._t: float | None = None

    def observe(self, load: float, now: float) -> float:
        """Feed one sample of the cluster load (requests per replica) taken at time `now` (seconds)."""
        self.raw_load = float(load)
        if self.load is None or self._t is None:
            self.load = float(load)
        else:
            alpha = 1.0 - math.exp(-max(now - self._t, 0.0) / self.cfg.smoothing_s)
            self.load += alpha * (float(load) - self.load)
        self._t = now
        return self.load

    def decide(self) -> float:
        """The budget for the next batch: falls with the load at once, rises only past the hysteresis band."""
        load = self.raw_load if self.load is None else self.load
        down = budget_for_load(load, self.profile, self.cfg)
        up = budget_for_load(load * (1.0 + self.cfg.hysteresis), self.profile, self.cfg)
        self.budget = min(down, max(self.budget, up))
        return self.budget

    def admit(self, load: float) -> int | None:
        """Admission on the instantaneous load (a burst must be refused now, not after smoothing catches up)."""
        return retry_after_s(load, self.profile, self.cfg)
