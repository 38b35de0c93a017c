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

Online correction of the cost model (SlowdownEstimator). The profile is measured once, at replica start, usually on
a quiet machine; under load the proxy, the ingress and the load generator share the same cores and real batches run
several times slower than profiled, so a policy that trusts the profile keeps budgets too high and the queue grows
past the SLO. Each batch knows both numbers: the profile's prediction for its size, budgets and decoded steps, and
its measured wall time (preprocessing and streaming included: that is what the queue behind it waits for). The
replica keeps a slowdown factor

    phi = median of the last `slowdown_window` ratios measured/predicted, each clipped to [min, max],

seeded with the window full of 1.0 (trust the profile until batches say otherwise) and multiplies every prediction
by it: predicted_ms(b, L) * phi. The median, not a mean, so one slow batch (a GC pause, a co-tenant burst) moves
nothing: it takes more than half the window of slow batches to change phi, and phi never leaves [min, max] however
wild a sample is. A replica busy enough to matter runs several batches a second, so phi follows a change in
contention within a couple of seconds, about as fast as the smoothed load.

The factor is kept per replica, not shared through the load board: it corrects this replica's own profile, and what
it measures (co-tenants, CPU model, thermal state) is a property of the replica's node; a cluster-wide average would
slow down fast nodes and speed up slow ones. Replicas on one machine see the same contention and learn the same
factor on their own.

predicted_ms * phi is non-decreasing in L and in phi, so f stays monotone non-increasing in load (at a given phi)
and in phi (at a given load); the hysteresis band applies unchanged.

Admission: when even the floor is predicted (phi included) to take longer than reject_factor * slo_ms at the load the
request would join, it is refused at once with 429 and Retry-After = the predicted excess, rounded up to whole
seconds (what the queue needs to drain), rather than queued to miss the SLO anyway.

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
    # online correction of the start-up profile (see SlowdownEstimator); min == max == 1 turns it off
    slowdown_window: int = 8  # batches in the median; > half of them must be slow to move the factor
    slowdown_min: float = 0.5
    slowdown_max: float = 10.0  # bounds: one wild measurement can never collapse (or inflate) the budgets

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
        if not 0 < self.slowdown_min <= 1.0 <= self.slowdown_max:
            raise ValueError(f"policy needs 0 < slowdown_min <= 1 <= slowdown_max; got slowdown_min="
                             f"{self.slowdown_min}, slowdown_max={self.slowdown_max}")  # fmt: skip
        if not (isinstance(self.slowdown_window, int) and self.slowdown_window >= 1):
            raise ValueError(f"policy.slowdown_window must be an integer >= 1, got {self.slowdown_window!r}")
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


def predicted_latency_ms(profile: LatencyProfile, budget: float, load: float, tokens: int,
                         slowdown: float = 1.0) -> float:  # fmt: skip
    """Predicted latency of a request that arrives when a replica holds `load` requests (its own included),
    with the profile scaled by the replica's measured slowdown factor."""
    load = max(float(load), 1.0)
    B = profile.max_batch_size
    return slowdown * max(1.0, load / B) * batch_ms(profile, budget, min(load, B), tokens)


def predicted_batch_ms(profile: LatencyProfile, budgets: list[float], steps: int) -> float:
    """The profile's (unscaled) time for one generate() batch with these per-request budgets and `steps` decoded
    tokens: the batch runs at its largest budget's cost (rows at lower budgets do not make the others cheaper)."""
    if not budgets:
        return 0.0
    return batch_ms(profile, max(budgets), len(budgets), max(int(steps), 1))


def update_slowdown(window: list[float], measured_ms: float, predicted_ms: float, cfg: PolicyConfig) -> float:
    """Add one batch's ratio measured/predicted (clipped to the bounds) to the sliding window (in place, keeping the
    last cfg.slowdown_window) and return the new factor: the window's median. Non-positive or non-finite inputs
    are not a measurement and leave the window as it is."""
    if predicted_ms > 0 and measured_ms > 0 and math.isfinite(measured_ms) and math.isfinite(predicted_ms):
        window.append(min(max(measured_ms / predicted_ms, cfg.slowdown_min), cfg.slowdown_max))
        del window[: max(len(window) - cfg.slowdown_window, 0)]
    return slowdown_factor(window, cfg)


def slowdown_factor(window: list[float], cfg: PolicyConfig) -> float:
    """Median of the window (1.0 when empty), within [slowdown_min, slowdown_max]."""
    if not window:
        return 1.0
    v = sorted(window)
    n = len(v)
    med = v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])
    return min(max(med, cfg.slowdown_min), cfg.slowdown_max)


def levels(profile: LatencyProfile, cfg: PolicyConfig) -> list[float]:
    """The budgets the server may pick: the model's grid steps in [floor, ceiling] (the floor itself if none)."""
    inside = [b for b in profile.budgets if cfg.floor - 1e-9 <= b <= cfg.ceiling + 1e-9]
    return inside or [cfg.floor]


def budget_for_latency(target_ms: float, load: float, profile: LatencyProfile, cfg: PolicyConfig,
                       tokens: int | None = None, slowdown: float = 1.0) -> float:  # fmt: skip
    """The highest level predicted to finish within target_ms at this load; the floor when none does.
    This is the one place that maps latency to budget (both the SLO and a client's latency_ms go through it)."""
    tokens = cfg.tokens if tokens is None else tokens
    lv = levels(profile, cfg)
    ok = [b for b in lv if predicted_latency_ms(profile, b, load, tokens, slowdown) <= target_ms]
    return max(ok) if ok else lv[0]


def budget_for_load(load: float, profile: LatencyProfile, cfg: PolicyConfig, slowdown: float = 1.0) -> float:
    """f(L, phi): the instantaneous policy, monotone non-increasing in the load and in the slowdown factor."""
    return budget_for_latency(cfg.slo_ms, load, profile, cfg, slowdown=slowdown)


def retry_after_s(load: float, profile: LatencyProfile, cfg: PolicyConfig, slowdown: float = 1.0) -> int | None:
    """None when a request can be admitted; else the seconds to wait (>= 1) before the floor can meet the SLO."""
    if not cfg.reject:
        return None
    predicted = predicted_latency_ms(profile, levels(profile, cfg)[0], load, cfg.tokens, slowdown)
    limit = cfg.reject_factor * cfg.slo_ms
    if predicted <= limit:
        return None
    return max(1, math.ceil((predicted - limit) / 1000.0))


def apply_caps(server_budget: float, budget_cap: float | None = None, latency_budget: float | None = None) -> float:
    """Client caps only lower the budget: never spend more than the client allows."""
    caps = [c for c in (budget_cap, latency_budget) if c is not None]
    return min([server_budget, *caps])


class BudgetController:
    """Smoothed load + hysteresis around budget_for_load, with the profile corrected online by the measured slowdown
    (see the module docstring). One per replica."""

    def __init__(self, profile: LatencyProfile, cfg: PolicyConfig):
        self.profile, self.cfg = profile, cfg
        self.load: float | None = None  # smoothed requests per replica
        self.raw_load = 0.0
        self.budget = levels(profile, cfg)[-1]
        self._t: float | None = None
        # the last slowdown_window measured/predicted batch ratios (clipped), seeded full of 1.0: trust the profile
        # until more than half a window of batches says otherwise (one slow first batch must not move the factor)
        self.ratios: list[float] = [1.0] * cfg.slowdown_window
        self.slowdown = 1.0
        self.batches_seen = 0

    def observe_batch(self, measured_ms: float, groups: list[tuple[list[float], int]]) -> float:
        """Feed one finished batch: its wall time and, per generate() call it made, (budgets, tokens decoded).
        Returns the updated slowdown factor."""
        predicted = sum(predicted_batch_ms(self.profile, budgets, steps) for budgets, steps in groups)
        self.batches_seen += 1
        self.slowdown = update_slowdown(self.ratios, measured_ms, predicted, self.cfg)
        return self.slowdown

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
        down = budget_for_load(load, self.profile, self.cfg, self.slowdown)
        up = budget_for_load(load * (1.0 + self.cfg.hysteresis), self.profile, self.cfg, self.slowdown)
        self.budget = min(down, max(self.budget, up))
        return self.budget

    def admit(self, load: float) -> int | None:
        """Admission on the instantaneous load (a burst must be refused now, not after smoothing catches up)."""
        return retry_after_s(load, self.profile, self.cfg, self.slowdown)
