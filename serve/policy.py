"""Deadlines -> admission and budgets (SlackFit for AdaLLaVA). Pure functions over a latency profile; no Ray, no torch.

Every request carries a deadline, fixed at the ingress when it arrives:

    deadline = arrival + min(slo_ms, the client's latency_ms)

and every decision below (admission, budgets, the gate) plans for arrival + (1 - headroom) x that (`plan_deadline`,
policy.headroom, 0 by default), keeping the rest for what the model does not see; the gate still protects the real
deadline of a row that slipped past its planned one.

Latency model (no feedback loop). A replica runs adallava.engine's continuous batching: one engine step decodes one
token for every running request, then prefills waiting requests one by one while a row is free (at most B =
max_batch_size running). The profile holds, per budget level b of the model's grid, the engine's own costs measured on
the engine alone: prefill(b) (one request), decode(b, 1) and decode(b, B) (one step with 1 or B rows; straight line in
between), and apart from them a fixed per-request overhead (template, tokenizer, image processor: it does not follow
the budget). A step with rows at budgets b_1..b_n costs the mean of decode(b_i, n). The replica measures a contention
factor kappa on engine steps only: measured step time over the profile's prediction *for the same work* (the same
rows at the same budgets), median of recent windows, within [1/contention_max, contention_max]. A lower budget lowers
both sides of that ratio, so kappa cannot feed back through the budget (the old design divided whole-batch wall time,
overheads included, by generate time: a lower budget read as more slowdown). kappa multiplies engine compute only.

Lengths (`LengthModel`): a request's tokens (the engine's: an EOS takes a step too) are predicted as the
policy.length_quantile of the lengths of the last policy.length_window completions this process has seen, capped by its
max_tokens (the longest seen until 16 were, max_tokens itself before the first, or with length_quantile None; before
the first a request with nobody ahead or behind it is predicted at one token, so an idle server serves, and learns,
even when the worst case would miss the SLO). Predicting every request at its max_tokens refuses work the server can
do when answers are short. A running request's remaining tokens are the same quantile of the lengths that ran past
what it has produced, less that (a request that outran the prediction is not one token from its end), at least one
until its max_tokens.

The prefill gate (`may_prefill`). A prefill stalls every running row for its duration. A replica that prefills
whatever waits before its rows' next decode lets a burst of joiners push a running request's next token out by up to
max_batch_size - 1 prefills, which no prediction made at that request's join can see (measured under 2x overload on
the smol checkpoint: a 2-token answer's second token waited 1.7-2.2 s). So a waiting request is prefilled only when
that makes no running row miss a deadline it would meet without the prefill; otherwise it waits for the next step
(FIFO: those behind it wait too). Rows late anyway, or without a deadline, hold nobody back.

`simulate` (`play`) plays the engine forward from now, in the engine's own order: each step decodes the running rows
(budget, remaining steps), then prefills the FIFO queue behind them (budget, predicted tokens) while a row is free and
the gate lets them, jumping from one finish to the next while nobody can join (the composition is constant in
between), and returns each request's predicted finish (and the steps before its prefill). It is exact for this model
and costs O(requests x steps while someone waits), whatever max_tokens is.

Edge admission (ingress, before any image is decoded). The ingress counts exactly the requests it has sent to the
model and not yet seen finish, and splits them over the live replicas in send order (Serve's router balances them);
the new request goes behind the shortest share. With everything at the floor budget:

    admit  iff  overhead + finish_floor(share + new) <= deadline

where the share is played forward from when its oldest request was sent (the edge sees no replica's progress, only
its own send times and the deadlines it set: the engine is taken as busy with them since, each prefilled in turn as
the gate allows), moved out by however much
its first finish is overdue (a request still in flight has not finished), and never sooner than the new request alone
from now
    else 429 "overloaded", Retry-After = ceil((predicted - deadline) / 1 s) (>= 1)   [policy.reject=True]

and, whatever the policy, at most replicas * (max_batch_size + max_queued_requests) in flight: back-pressure beyond it.

Budget at join (`choose_budget`, the replica's engine thread, when a request takes a row). With the rows running, the
requests already joining, the new request r at budget b and the requests behind it at the floor the edge admitted
them at (queued for a row, or still in preprocessing):

    feasible(b) = finish_b(r) <= deadline(r)  and  late_b(others) is a subset of late_floor(others)
    budget(r)   = max{ b in levels : feasible(b) }                 (levels: the grid within [floor, ceiling])

the highest budget that meets r's deadline without making anyone behind or beside it miss a deadline they would have
met had r run at the floor. The play applies the gate with r's deadline on r's slot, so the choice may be to wait a
step (Choice.now False: r stays first in line, and the replica asks again after the next decode), when waiting gives
a higher budget in time than being prefilled now at a lower one. When even the floor misses r's deadline: refused with 429 "deadline_exceeded" at once,
never computed (reject=True), or run at the floor anyway (reject=False: bounded queues, served late). The choice is
monotone: more work ahead or a tighter deadline never gives a higher budget, and an idle replica gives the ceiling
to any request that can meet its deadline at the ceiling (no state survives a burst: budgets are back at full as soon
as the queue has drained). A client's `budget` only caps it (`apply_caps`).

Autoscaling (serve/autoscaling.py): a replica's capacity at a budget is 1000 / (overhead + prefill + (T-1) *
decode(b, B) / B) requests per second (B rows sharing each decode step, T = policy.tokens).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

EPS = 1e-9


def _among(budget: float, values) -> bool:
    """Is this budget one of `values` (a level list, the model's grid), within float noise (1e-6)?"""
    return any(abs(budget - v) <= 1e-6 for v in values)


@dataclass
class PolicyConfig:
    floor: float = 0.5  # the lowest budget the server picks by itself (clients may ask for less)
    ceiling: float = 1.0  # the highest; floor == ceiling gives a static budget (the benchmark's baselines)
    slo_ms: float = 2000.0  # every request's deadline is arrival + min(slo_ms, the client's latency_ms)
    # True: a request whose deadline the floor cannot meet is refused with 429 at once (at the edge, or at its turn);
    # False: it waits in the bounded queues and runs at the floor, late
    reject: bool = True
    tokens: int = 32  # tokens per request the autoscaler's capacity assumes (the server's default max_tokens)
    target_utilization: float = 0.8  # the autoscaler sizes replicas so the ceiling budget runs at this utilization
    contention_window: int = 8  # windows of engine steps in the contention factor's median
    contention_max: float = 10.0  # kappa stays within [1/contention_max, contention_max]; 1 turns it off
    # predicted tokens per request: this quantile of the last length_window completions' lengths (capped by the
    # request's max_tokens; the longest seen until LENGTH_MIN_SAMPLES were); None: always max_tokens (the worst case)
    length_quantile: float | None = 0.9
    length_window: int = 256
    # the fraction of each request's deadline (from its arrival) kept in reserve for what the latency model does not
    # see: admission, budgets and the gate plan for arrival + (1 - headroom) x deadline (`plan_deadline`), and the gate
    # still protects a row's real deadline once it has slipped past the planned one. 0: plan to the deadline itself
    headroom: float = 0.0
    # the budgets the server may pick (each on the model's budget grid, floor and ceiling among them); None: every grid
    # step in [floor, ceiling]. For a checkpoint whose accuracy does not rise at every step, the steps on its accuracy
    # / budget Pareto front (`pareto_levels`): a budget no more accurate than a cheaper one only spends compute
    levels: list[float] | None = None

    def check(self, budget_range: tuple[float, float]) -> "PolicyConfig":
        lo, hi = budget_range
        if not lo - EPS <= self.floor <= self.ceiling <= hi + EPS:
            raise ValueError(f"policy needs {lo:g} <= floor <= ceiling <= {hi:g}; got floor={self.floor}, "
                             f"ceiling={self.ceiling}")  # fmt: skip
        for name in ("slo_ms", "tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"policy.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.target_utilization <= 1:
            raise ValueError(f"policy.target_utilization must be in (0, 1], got {self.target_utilization}")
        if not self.contention_max >= 1:
            raise ValueError(f"policy.contention_max must be >= 1, got {self.contention_max}")
        if not (isinstance(self.contention_window, int) and self.contention_window >= 1):
            raise ValueError(f"policy.contention_window must be an integer >= 1, got {self.contention_window!r}")
        if self.length_quantile is not None and not 0 < self.length_quantile <= 1:
            raise ValueError(f"policy.length_quantile must be in (0, 1] or null, got {self.length_quantile}")
        if not (isinstance(self.length_window, int) and self.length_window >= 1):
            raise ValueError(f"policy.length_window must be an integer >= 1, got {self.length_window!r}")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"policy.headroom must be in [0, 1), got {self.headroom}")
        if self.levels is not None:
            lv = self.levels
            number = lambda b: isinstance(b, (int, float)) and not isinstance(b, bool)  # noqa: E731 - True is not 1.0
            if not (isinstance(lv, (list, tuple)) and lv and all(map(number, lv))):
                raise ValueError(f"policy.levels must be a non-empty list of budgets or null, got {lv!r}")
            out = [b for b in lv if not self.floor - EPS <= b <= self.ceiling + EPS]
            if out:
                raise ValueError(f"policy.levels {out} lie outside [floor, ceiling] = [{self.floor:g}, "
                                 f"{self.ceiling:g}]")  # fmt: skip
            for name in ("floor", "ceiling"):
                if not _among(getattr(self, name), lv):
                    raise ValueError(f"policy.levels {list(lv)} must include the {name} ({getattr(self, name):g})")
        return self

    def check_levels(self, grid: list[float]) -> "PolicyConfig":
        """policy.levels against the model's budget grid: a level the model cannot run as given is refused by name."""
        for b in self.levels or []:
            if not _among(b, grid):
                raise ValueError(f"policy.levels: {b:g} is not on the model's budget grid "
                                 f"{[round(g, 6) for g in grid]}")  # fmt: skip
        return self


def plan_deadline(arrival_ms: float, deadline_ms: float, headroom: float) -> float:
    """The deadline admission, budgets and the gate plan for (same clock as arrival_ms): arrival + (1 - headroom) x
    the relative deadline. With every choice made to just meet the deadline, a request finishes at it whenever the
    prediction holds, so any error the model does not see (measured: the prefills of requests that join later, a few
    hundred ms at the median, over a second at p95 on smol at 2x) makes it late; the headroom is kept for that."""
    return arrival_ms + (1.0 - headroom) * deadline_ms


LENGTH_MIN_SAMPLES = 16  # completions seen before their quantile replaces the longest of them


class LengthModel:
    """How many tokens a request will produce, learned from the completions this process has seen: the
    policy.length_quantile of the last policy.length_window completions' lengths, capped by the request's max_tokens;
    the longest seen until LENGTH_MIN_SAMPLES completions have been, and max_tokens itself before the first (or with
    length_quantile None). A fresh deployment predicting max_tokens until 16 answers were seen refused work at half
    its capacity (measured on smol at 0.5x: 0-13 of 47-66 requests in a cell that starts cold).
    Predicting every request at its max_tokens refuses work the server can do: short answers (a VQA answer is 1-3
    tokens under max_tokens 16) read as up to 16x the decode they need. A request that runs longer than predicted is
    already admitted and finishes; the next predictions see its length. observe() may run on another thread."""

    def __init__(self, cfg: PolicyConfig):
        self.quantile = cfg.length_quantile
        self.seen: deque[int] = deque(maxlen=cfg.length_window)

    def observe(self, tokens: int) -> None:
        if isinstance(tokens, int) and tokens >= 1:
            self.seen.append(tokens)

    def _pick(self, values: list[int], cold: bool) -> int:
        """The quantile of sorted `values`; their largest while fewer than LENGTH_MIN_SAMPLES were seen (`cold`)."""
        if cold:
            return values[-1]
        return values[min(len(values) - 1, max(0, math.ceil(self.quantile * len(values)) - 1))]

    def typical(self) -> int | None:
        """The quantile of recent lengths; the longest seen while fewer than LENGTH_MIN_SAMPLES have been (a handful
        of samples has no quantile, but the longest of them is a length answers do reach); None while none has been
        seen, or with length_quantile None (the worst case always)."""
        v = sorted(self.seen)  # a snapshot: appends from another thread do not disturb it
        if self.quantile is None or not v:
            return None
        return self._pick(v, len(v) < LENGTH_MIN_SAMPLES)

    def expect(self, max_tokens: int, alone: bool = False) -> int:
        """Tokens a new request with this max_tokens is predicted to produce. Before the first length is seen, a
        request with nothing ahead of it is predicted at one token (the least it can produce): at the worst case an SLO
        shorter than max_tokens' decode would refuse every request on an idle server, nothing would ever complete and
        nothing would be learned. It delays no one; the lengths it teaches replace the guess."""
        t = self.typical()
        if t is None:
            return 1 if alone and self.quantile is not None else max_tokens
        return max(1, min(max_tokens, t))

    def remaining(self, max_tokens: int, generated: int) -> int:
        """Tokens a running request that has produced `generated` still has to produce: the quantile of the lengths
        seen that ran past `generated`, less `generated` (the length given that it has come this far), at least one
        while it runs, never more than max_tokens allows; max_tokens' worth when no length seen ran that far (or while
        lengths are not known). The unconditional prediction less what it has would read a request that has outrun
        it as one token from its end at every step, and the gate would let every later prefill stall it (measured at
        2x on smol: later joiners' prefills were most of the overrun)."""
        left = max_tokens - generated
        if left <= 0:
            return 0
        seen = list(self.seen)  # a snapshot (observe() may run on another thread)
        if self.quantile is None or not seen:  # nothing known (or length_quantile None): the worst case
            return left
        longer = sorted(n for n in seen if n > generated)
        if not longer:
            return left
        return max(1, min(left, self._pick(longer, len(seen) < LENGTH_MIN_SAMPLES) - generated))


PROFILE_KEYS = ("budgets", "max_batch_size", "prefill_ms", "decode_ms_1", "decode_ms_b", "overhead_ms")


@dataclass
class LatencyProfile:
    """Engine costs per budget level (lists aligned with `budgets`, ascending), measured or given as a table."""

    budgets: list[float]
    max_batch_size: int
    prefill_ms: list[float]  # one request's prefill (the engine prefills each joining request alone)
    decode_ms_1: list[float]  # one decode step, 1 running request
    decode_ms_b: list[float]  # one decode step, max_batch_size running requests
    overhead_ms: float = 0.0  # per request, whatever the budget: template, tokenizer, image processor
    source: str = "measured"  # measured | cache | config

    def __post_init__(self):
        if not self.budgets or list(self.budgets) != sorted(self.budgets):
            raise ValueError("profile budgets must be a non-empty ascending list")
        if not (isinstance(self.max_batch_size, int) and self.max_batch_size >= 1):
            raise ValueError(f"profile.max_batch_size must be an integer >= 1, got {self.max_batch_size!r}")
        # more compute never predicts less time: cummax over budgets removes measurement noise
        for name in ("prefill_ms", "decode_ms_1", "decode_ms_b"):
            vals = [float(v) for v in getattr(self, name)]
            if len(vals) != len(self.budgets):
                raise ValueError(f"profile.{name} needs one value per budget ({len(self.budgets)}), got {len(vals)}")
            if not all(math.isfinite(v) and v >= 0 for v in vals):
                raise ValueError(f"profile.{name} must hold finite values >= 0, got {vals}")
            setattr(self, name, [max(vals[: i + 1]) for i in range(len(vals))])
        self.decode_ms_b = [max(a, b) for a, b in zip(self.decode_ms_1, self.decode_ms_b)]  # more rows never cost less
        if not (math.isfinite(float(self.overhead_ms)) and self.overhead_ms >= 0):
            raise ValueError(f"profile.overhead_ms must be finite and >= 0, got {self.overhead_ms}")
        self.overhead_ms = float(self.overhead_ms)

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "LatencyProfile":
        unknown = set(d) - set(PROFILE_KEYS) - {"source"}
        missing = set(PROFILE_KEYS) - {"overhead_ms"} - set(d)
        if unknown or missing:
            raise ValueError(f"profile: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; "
                             f"a profile has {list(PROFILE_KEYS)}")  # fmt: skip
        return cls(**{k: d[k] for k in PROFILE_KEYS if k in d}, source=source or d.get("source", "config"))

    def index(self, budget: float) -> int:
        """The grid level a budget runs as: the highest level <= budget (plans only change at grid steps)."""
        i = 0
        for j, b in enumerate(self.budgets):
            if b <= budget + EPS:
                i = j
        return i

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in (*PROFILE_KEYS, "source")}


def prefill_ms(p: LatencyProfile, budget: float) -> float:
    return p.prefill_ms[p.index(budget)]


def decode_ms(p: LatencyProfile, budget: float, n: int) -> float:
    """One decode step's cost for one row at this budget when n rows run (straight line from 1 to B rows)."""
    i, B = p.index(budget), p.max_batch_size
    w = 0.0 if B <= 1 else (min(max(n, 1), B) - 1) / (B - 1)
    return (1 - w) * p.decode_ms_1[i] + w * p.decode_ms_b[i]


def step_ms(p: LatencyProfile, budgets: list[float]) -> float:
    """One engine decode step with rows at these budgets: the mean of their per-budget step costs."""
    n = len(budgets)
    return sum(decode_ms(p, b, n) for b in budgets) / n if n else 0.0


@dataclass
class Slot:
    """One request in a prediction: its budget, the tokens it still has to produce, its deadline (ms, same clock as
    `now`; None: none) and whether it already runs (prefilled) or waits for a row."""

    budget: float
    tokens: int
    deadline: float | None = None
    running: bool = False
    hard: float | None = None  # the real deadline when `deadline` is a planned one before it (policy.headroom)


def may_prefill(p: LatencyProfile, t: float, rows: list, budget: float, tokens: int, kappa: float = 1.0) -> bool:
    """The engine's gate (`simulate` and the replica apply the same one): may a waiting request at this budget be
    prefilled at time t, before the running rows' next decode step? rows: (budget, tokens left, deadline or None[, real
    deadline or None]). No: when some row would still meet its deadline if its remaining steps ran now, but not after
    this prefill (and, when the request stays on as a row, with its share in every step); with a real deadline beyond
    the planned one (policy.headroom), the same for it: a row that slipped past its plan keeps its real deadline. A row
    late anyway holds nobody back, and neither does a row without a deadline. Without it a server that prefills whatever
    waits stalls its running rows for as long as requests keep arriving: under overload a request's second token waited
    for seven others' prefills (up to max_batch_size), which no prediction made at its join could see."""
    if not rows:
        return True
    now_step = kappa * step_ms(p, [r[0] for r in rows])
    with_step = kappa * step_ms(p, [r[0] for r in rows] + ([budget] if tokens > 1 else []))
    pre = kappa * prefill_ms(p, budget)
    for row in rows:
        left = row[1]
        for deadline in row[2:4]:
            if deadline is None:
                continue
            if t + left * now_step <= deadline + EPS and t + pre + left * with_step > deadline + EPS:
                return False
    return True


def play(p: LatencyProfile, now: float, slots: list[Slot], kappa: float = 1.0) -> tuple[list[float], list[int]]:
    """`simulate`, and for each slot the number of decode steps the engine runs before its prefill (0 for one that
    already runs): a waiting slot with 0 (no rows running) or 1 (after the next step's decode) is prefilled by the
    engine's next step."""
    finish, steps = [now] * len(slots), [0] * len(slots)
    rows = [[s.budget, s.tokens, i] for i, s in enumerate(slots) if s.running and s.tokens > 0]
    queue = deque(i for i, s in enumerate(slots) if not s.running)
    B, t, n = p.max_batch_size, now, 0
    while rows or queue:
        if rows:  # an engine step decodes its running rows first, then prefills waiting requests
            # steps until the next row leaves (the composition is constant until then), or one when a waiting request
            # may join after it
            k = 1 if queue and len(rows) < B else min(r[1] for r in rows)
            t += k * kappa * step_ms(p, [r[0] for r in rows])
            n += k
            for r in rows:
                r[1] -= k
                if r[1] == 0:
                    finish[r[2]] = t
            rows = [r for r in rows if r[1] > 0]
        while queue and len(rows) < B:
            s = slots[queue[0]]
            if not may_prefill(p, t, [(r[0], r[1], slots[r[2]].deadline, slots[r[2]].hard) for r in rows], s.budget,
                               s.tokens, kappa):  # fmt: skip
                break  # it waits for the next decode step
            i = queue.popleft()
            steps[i] = n
            t += kappa * prefill_ms(p, s.budget)
            if s.tokens <= 1:
                finish[i] = t
            else:
                rows.append([s.budget, s.tokens - 1, i])
    return finish, steps


def simulate(p: LatencyProfile, now: float, slots: list[Slot], kappa: float = 1.0) -> list[float]:
    """Each slot's predicted finish (ms) when the engine plays forward from `now`, step by step as it runs: each step
    decodes one token of every running slot, then prefills waiting ones (FIFO, in list order) alone, one by one, while
    a row is free and `may_prefill` lets them (a prefill gives a request its first token)."""
    return play(p, now, slots, kappa)[0]


def levels(profile: LatencyProfile, cfg: PolicyConfig) -> list[float]:
    """The budgets the server may pick: the model's grid steps in [floor, ceiling], only those in policy.levels when
    it is set (the floor itself if none)."""
    inside = [b for b in profile.budgets if cfg.floor - EPS <= b <= cfg.ceiling + EPS]
    if cfg.levels is not None:
        inside = [b for b in inside if _among(b, cfg.levels)]
    return inside or [cfg.floor]


def pareto_levels(accuracy: dict[float, float]) -> list[float]:
    """The budgets on the accuracy / budget Pareto front, ascending: each kept budget is more accurate than every
    cheaper one kept (SuperServe serves the Pareto-optimal subnetworks of its supernet). A budget that answers no
    better than a cheaper one costs more for nothing; a policy that picks it under load serves fewer requests at the
    same accuracy. accuracy: {budget: accuracy measured on the same questions}."""
    front, best = [], -math.inf
    for b in sorted(accuracy):
        a = accuracy[b]
        if a is None or not math.isfinite(a):
            raise ValueError(f"pareto_levels: accuracy at budget {b:g} is {a!r}, not a number")
        if a > best:
            front.append(b)
            best = a
    return front


@dataclass
class Choice:
    budget: float  # the budget to run at
    feasible: bool  # False: even the floor misses the request's deadline
    predicted: float  # the request's predicted finish at that budget (ms, the caller's clock)
    now: bool = True  # the engine's next step prefills it; False: the gate holds it back a step (it stays queued)


def choose_budget(p: LatencyProfile, cfg: PolicyConfig, now: float, ahead: list[Slot], new: Slot,
                  behind: list[Slot], kappa: float = 1.0) -> Choice:  # fmt: skip
    """SlackFit at join: the highest level that meets `new`'s deadline and makes nobody in `ahead` (running or
    joining before it) or `behind` (queued after it, assumed at the floor) late who would not be late anyway."""
    lv = levels(p, cfg)
    me = len(ahead)

    first = 1 if any(s.running and s.tokens > 0 for s in ahead) else 0  # decode steps before the next prefills

    def run(b):  # the newcomer's deadline decides apart (from `new`); in the play it is a row the gate protects
        slots = [*ahead, Slot(b, new.tokens, new.deadline, hard=new.hard),
                 *[Slot(lv[0], s.tokens, s.deadline, hard=s.hard) for s in behind]]  # fmt: skip
        fin, steps = play(p, now, slots, kappa)
        late = {i for i, s in enumerate(slots) if i != me and s.deadline is not None and fin[i] > s.deadline + EPS}
        return fin[me], late, steps[me] <= first

    at_floor, late_floor, now_floor = run(lv[0])
    if new.deadline is not None and at_floor > new.deadline + EPS:
        return Choice(lv[0], False, at_floor, now_floor)
    for b in reversed(lv[1:]):
        fin, late, joins = run(b)
        if (new.deadline is None or fin <= new.deadline + EPS) and late <= late_floor:
            return Choice(b, True, fin, joins)
    return Choice(lv[0], True, at_floor, now_floor)  # the floor meets the deadline (above), makes nobody newly late


def share(inflight: list, replicas: int) -> list:
    """The ingress's in-flight requests (in send order) as the shortest replica's share: request k went to replica
    k mod n (Serve's router balances them), the new one joins the replica holding the fewest."""
    n = max(int(replicas), 1)
    return inflight[len(inflight) % n :: n]  # replica len % n is next in turn: it holds the fewest


def _played(p: LatencyProfile, floor: float, now: float, mine: list, extra: list[Slot], kappa: float):
    """A replica's share of the in-flight requests played forward, then `extra` behind them: the predicted finishes
    of mine + extra. An entry is (predicted tokens, ms it was sent[, its deadline]) or a bare token count (sent now,
    no deadline); deadlines let the play apply the engine's gate (`may_prefill`) as the replica will. The edge does not
    see a replica's progress, only when it sent each request, so its engine is taken as busy with the share since the
    oldest was sent: all waiting then, FIFO, each prefilled alone when a row frees, all at the floor. None of them has
    finished (they are still in flight), so when the first is predicted done before now the engine is behind by at
    least that much, and every finish moves out by it."""
    ent = [(e, now, None) if isinstance(e, int) else (int(e[0]), float(e[1]), e[2] if len(e) > 2 else None)
           for e in mine]  # fmt: skip
    start = min([now, *(sent for _, sent, _ in ent)])
    fin = simulate(p, start, [Slot(floor, t, d) for t, _, d in ent] + extra, kappa)
    lag = max(0.0, now - min(fin[: len(ent)])) if ent else 0.0
    return [f + lag for f in fin]


def edge_finish_ms(p: LatencyProfile, cfg: PolicyConfig, now: float, inflight: list, replicas: int, tokens: int,
                   kappa: float = 1.0) -> float:  # fmt: skip
    """A new request's predicted finish at the floor behind its replica's share of the in-flight requests (all at the
    floor; see _played), its per-request overhead included; never sooner than it would finish alone from now."""
    floor = levels(p, cfg)[0]
    alone = simulate(p, now, [Slot(floor, tokens)], kappa)[0]
    behind = _played(p, floor, now, share(inflight, replicas), [Slot(floor, tokens)], kappa)[-1]
    return max(alone, behind) + p.overhead_ms


def drain_ms(p: LatencyProfile, cfg: PolicyConfig, now: float, inflight: list, replicas: int,
             kappa: float = 1.0) -> float:  # fmt: skip
    """How long until the shortest share's first in-flight request finishes (at the floor): when a row frees."""
    fin = _played(p, levels(p, cfg)[0], now, share(inflight, replicas), [], kappa)
    return max(0.0, min(fin) - now) if fin else 0.0


def admission(p: LatencyProfile, cfg: PolicyConfig, now: float, deadline: float, inflight: list, replicas: int,
              tokens: int, kappa: float = 1.0) -> int | None:  # fmt: skip
    """None: admit. Else the seconds (>= 1) a client should wait: the predicted excess over its deadline at the floor.
    Never refuses when cfg.reject is False (the bounded queues still do)."""
    if not cfg.reject:
        return None
    predicted = edge_finish_ms(p, cfg, now, inflight, replicas, tokens, kappa)
    if predicted <= deadline + EPS:
        return None
    return max(1, math.ceil((predicted - deadline) / 1000.0))


def alone_ms(p: LatencyProfile, budget: float, tokens: int) -> float:
    """One request alone on an idle replica: overhead, its prefill, then tokens - 1 decode steps of one row."""
    return p.overhead_ms + prefill_ms(p, budget) + max(tokens - 1, 0) * decode_ms(p, budget, 1)


def achievable_ms(p: LatencyProfile, cfg: PolicyConfig, tokens: int) -> tuple[float, float]:
    """The latency range the model reaches alone for this many tokens: at the floor budget and at the ceiling."""
    lv = levels(p, cfg)
    return alone_ms(p, lv[0], tokens), alone_ms(p, lv[-1], tokens)


def capacity_rps(p: LatencyProfile, budget: float, tokens: int) -> float:
    """Requests per second one replica sustains at this budget with full batches (B rows share each decode step)."""
    B = p.max_batch_size
    per_request = p.overhead_ms + prefill_ms(p, budget) + max(tokens - 1, 0) * decode_ms(p, budget, B) / B
    return 1000.0 / per_request if per_request > 0 else math.inf


def apply_caps(server_budget: float, budget_cap: float | None = None) -> float:
    """A client's budget only lowers the server's choice: never spend more than the client allows."""
    return server_budget if budget_cap is None else min(server_budget, budget_cap)


def update_contention(window: list[float], measured_ms: float, predicted_ms: float, cfg: PolicyConfig) -> float:
    """Add one window's ratio measured/predicted engine-step time (the same rows at the same budgets; clipped) to the
    sliding window (in place, the last cfg.contention_window kept) and return kappa: the window's median. Non-positive
    or non-finite inputs are not a measurement and leave the window as it is."""
    lo, hi = 1.0 / cfg.contention_max, cfg.contention_max
    if predicted_ms > 0 and measured_ms > 0 and math.isfinite(measured_ms) and math.isfinite(predicted_ms):
        window.append(min(max(measured_ms / predicted_ms, lo), hi))
        del window[: max(len(window) - cfg.contention_window, 0)]
    if not window:
        return 1.0
    v = sorted(window)
    n = len(v)
    return min(max(v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2]), lo), hi)


def predicted_step_ms(p: LatencyProfile, joining: list[float], decoding: list[float]) -> float:
    """The profile's time for one engine step: one decode step of the running rows, then each joining prefill."""
    return step_ms(p, decoding) + sum(prefill_ms(p, b) for b in joining)
