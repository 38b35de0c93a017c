"""The model deployment: each AdaLlavaModel replica runs adallava.engine's continuous batching in one thread.

A request arrives from the ingress already admitted (serve/ingress.py: its deadline fixed, refused there when even the
floor budget could not meet it), with its images decoded. The replica templates, tokenizes and preprocesses it in its
preprocessing thread and puts it in `pending`, which Serve bounds: the deployment's max_ongoing_requests is
max_batch_size + max_queued_requests, so at most max_queued_requests wait for a row. The engine thread loops: it moves
pending requests into the engine while it has free rows, choosing each one's budget at that moment from deadlines
(serve.policy.choose_budget, SlackFit: the highest budget that meets its deadline and makes nobody running, joining or
waiting behind it late; behind it count the requests waiting for a row and those still in preprocessing, at the floor
the edge admitted them at), or refusing it with 429 "deadline_exceeded" when even the floor cannot meet its deadline any
more (policy.reject; never computed), or holding the first in line (and so everyone behind it) for one step when its
prefill now would make a running row miss its deadline (serve.policy.may_prefill, counted in info()["held"]); then it
runs one engine step (one token for every running request, then the prefill of those joining) and hands each token to
its request's asyncio queue as soon as it exists (the decode's tokens before the step's prefills). A request leaves the
running batch at EOS, at its max_tokens, at a stop string (matched on the event loop, which cancels it in the engine) or
when its client goes away; the next waiting request takes its row at the next step. Nobody waits for the longest request
of a batch.

The latency profile (serve/policy.py's model) is a table given in config (`profile`), or the one cached for this
hardware kind in `profile_cache` (CPU model / GPU name, torch threads, max_batch_size, the model's architecture), or
measured at start on the engine alone and cached. A contention factor is measured on engine steps only, against the
profile's prediction for the same rows at the same budgets (it cannot feed back through the budget); a config profile
is taken as is (factor 1).

Cluster view: a deployment-scoped actor (`LoadBoard`, DeploymentActorConfig, managed by the Serve controller) collects
every replica's ongoing count each `load_report_interval_s` and returns the sum and the number of live replicas (reports
older than `stale_after_s` dropped); responses carry it (`adallava.load`), which is how the ingress learns how many
replicas share its in-flight requests. Autoscaling: `record_autoscaling_stats` reports the offered demand the ingress
stamps on each job (refusals included) and this replica's capacity at the ceiling (serve/autoscaling.py).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import math
import os
import platform
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray import serve

from serve.autoscaling import CAPACITY, OFFERED, OfferedRate
from serve.config import ServeConfig
from serve.policy import (
    LatencyProfile, LengthModel, Slot, apply_caps, capacity_rps, choose_budget, levels, plan_deadline,
    predicted_step_ms, update_contention,
)  # fmt: skip
from serve.protocol import APIError, StopText, bad_request, error_body

logger = logging.getLogger("ray.serve")


@ray.remote(num_cpus=0)
class LoadBoard:
    """Deployment-scoped actor: the replicas' ongoing counts, summed. Small and synchronous on purpose."""

    def __init__(self, stale_after_s: float = 1.0):
        self.stale_after_s = stale_after_s
        self.reports: dict[str, tuple[float, float]] = {}

    def report(self, replica_id: str, ongoing: float) -> tuple[float, int]:
        now = time.monotonic()
        self.reports[replica_id] = (float(ongoing), now)
        self.reports = {k: v for k, v in self.reports.items() if now - v[1] <= self.stale_after_s}
        return sum(v[0] for v in self.reports.values()), len(self.reports)


@dataclass
class Job:
    """One request as the ingress hands it to a model replica (validated)."""

    request_id: str
    messages: list[dict]
    images: list
    max_tokens: int
    temperature: float
    top_p: float
    budget_cap: float | None
    latency_ms: float | None  # the client's latency target (it tightened the deadline)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    t_ingress: float = 0.0  # time.time() when the ingress received it (latency, queue wait and TTFT count from here)
    attention: bool = False  # issue 14: return the latency token's attention over the image (adallava.attention)
    deadline_ms: float = math.inf  # min(policy.slo_ms, latency_ms): the deadline, relative to t_ingress
    offered: int = 0  # the ingress's running total of offered requests (admitted or refused), for the autoscaler
    prompt_tokens: int = 0


@dataclass(eq=False)
class _Live:
    """A request inside the replica: its engine request, its event queue, its timings."""

    job: Job
    request: object  # adallava.engine.Request
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    budget: float | None = None
    server_budget: float | None = None
    deadline_ms: float = math.inf  # absolute, in the replica's clock (ms)
    plan_ms: float = math.inf  # the deadline its choices plan for (policy.plan_deadline; deadline_ms at headroom 0)
    batch_size: int = 0  # requests running when it joined
    t_join: float | None = None
    predicted_ms: float | None = None  # the finish its join predicted (work present then), from arrival (ms)
    tokens_predicted: int | None = None  # the tokens its join predicted it would produce (serve.policy.LengthModel)
    # the replica's running total of prefill ms (AdaLlavaModel.prefill_ms_total) at its own prefill's end and at its
    # finish: the difference is the prefills of requests that joined after it and ran before it finished
    prefills_at_own: float | None = None
    prefills_at_finish: float | None = None
    attention: dict | None = None  # issue 14: adallava.attention, computed in the engine thread when it joins
    gone: bool = False  # the client went away (or a stop string ended it) before it joined

    def put(self, item):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@serve.deployment(name="AdaLlavaModel")
class AdaLlavaModel:
    def __init__(self, cfg: ServeConfig):
        import torch
        from ray.serve.metrics import Counter, Gauge, Histogram

        from adallava import budget as budgets
        from adallava.engine import Engine
        from adallava.presets import load

        torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.torch = torch
        from registry import local_model  # models:/<name>/<version>: downloaded once per version into this node's cache

        self.model, self.processor = load(cfg.model, seed=cfg.seed) if cfg.model == "tiny" else load(local_model(cfg.model))
        self.model.eval()
        mc = self.model.config
        self.budget_range = budgets.budget_range(mc)
        self.grid = budgets.budget_grid(mc)
        cfg.policy.check(self.budget_range).check_levels(self.grid)
        self.max_context = int(getattr(mc.text_config, "max_position_embeddings", 4096))
        self.eos_id = self.processor.tokenizer.eos_token_id
        # The fast tokenizer keeps padding/truncation as mutable state that every call resets: the event loop's
        # detokenisation gets its own copy, apart from the preprocessing thread's processor.
        self.loop_tokenizer = copy.deepcopy(self.processor.tokenizer)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prep")
        self.profile = self._load_profile()
        self.floor = levels(self.profile, cfg.policy)[0]
        self.kappa, self.kappa_window = 1.0, []  # contention factor (engine steps only) and its recent ratios
        self.lengths = LengthModel(cfg.policy)  # tokens per request, learned from the completions (serve.policy)
        self.offered = OfferedRate(cfg.look_back_period_s)
        self.paused, self.clock_offset_s = False, 0.0  # test hooks (fault_injection)
        self.prep_open = threading.Event()  # test hook hold_preprocessing: cleared, the preprocessing thread waits
        self.prep_open.set()
        # requests handed to the engine / refused at their turn / times the first in line was held back a step
        self.joined = self.refused_deadline = self.held = 0
        # the engine thread's seconds in iterations that had work: all of them, in engine steps (what the profile and
        # the contention factor model), and in choosing joins (budget choices, refusals; not modelled)
        self.thread_s = {"busy": 0.0, "step": 0.0, "join": 0.0}
        # ms of prefills run so far (each timed by its event's delivery inside the step), the step's time mark, and
        # the ids joining in the current step (engine thread only)
        self.prefill_ms_total, self._mark, self._joining = 0.0, 0.0, set()
        self.engine = Engine(self.model, max_batch_size=cfg.max_batch_size, eos_token_id=self.eos_id)
        self._make_engine = lambda: Engine(self.model, max_batch_size=cfg.max_batch_size, eos_token_id=self.eos_id)
        # admitted, waiting for a row (appended on the loop, taken by the thread); Serve's max_ongoing_requests bounds
        # it to max_queued_requests beyond the running batch
        self.pending: deque[_Live] = deque()
        # admitted and in (or waiting for) the preprocessing thread: (planned deadline, deadline, max_tokens), the
        # deadlines in the replica's clock (ms)
        self.preparing: dict[object, tuple[float, float, int]] = {}
        self.live: dict[str, _Live] = {}  # in the engine
        self.cancels: deque[tuple[str, str]] = deque()  # (request id, reason) for the engine thread
        self.wakeup = threading.Event()
        self.ongoing = 0
        self.others, self.n_replicas, self.load_source = 0.0, 1, "local"
        self.board = None
        self.reporter: asyncio.Task | None = None
        self.failed_reason: str | None = None
        self.consecutive_failures = 0
        self._acc = (0.0, 0.0, 0)  # measured ms, predicted ms, steps since the last contention sample
        edges = sorted({round((a + b) / 2, 6) for a, b in zip(self.grid, self.grid[1:])}) or [1.0]
        ms = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
        self.m_budget = Histogram("adallava_budget", description="budget chosen per request", boundaries=edges)
        self.m_load = Gauge("adallava_load_per_replica", description="ongoing requests per replica (cluster-wide, "
                            "running + waiting)")  # fmt: skip
        self.m_contention = Gauge("adallava_contention_factor", description="this replica's measured/profiled engine "
                                  "step time for the same rows and budgets (median over recent windows of steps); "
                                  "multiplies predicted engine compute")  # fmt: skip
        self.m_latency = Histogram("adallava_latency_ms", description="request latency in the replica by budget",
                                   boundaries=ms, tag_keys=("budget",))  # fmt: skip
        self.m_reject = Counter("adallava_rejections", description="requests refused with 429 at their turn",
                                tag_keys=("reason",))  # fmt: skip
        self.m_ttft = Histogram("adallava_time_to_first_token_ms", description="ingress arrival to the first token",
                                boundaries=ms)  # fmt: skip
        self.m_tpot = Histogram("adallava_time_per_output_token_ms", description="mean time between a request's "
                                "tokens after the first", boundaries=[1, 2, 5, 10, 25, 50, 100, 250, 500, 1000])
        self.m_queue = Histogram("adallava_queue_wait_ms", description="ingress arrival to joining the running batch",
                                 boundaries=ms)  # fmt: skip
        self.m_running = Gauge("adallava_running_requests", description="requests in this replica's running batch")
        self.thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)
        self.thread.start()

    # ---- the latency profile: a config table, the cached one for this hardware kind, or measured now (and cached)
    def _load_profile(self) -> LatencyProfile:
        cfg = self.cfg
        if cfg.profile is not None:
            p = LatencyProfile.from_dict(dict(cfg.profile), source="config")
            if len(p.budgets) != len(self.grid) or any(abs(a - b) > 1e-6 for a, b in zip(p.budgets, self.grid)):
                raise ValueError(f"profile.budgets {p.budgets} must be the model's budget grid {self.grid}")
            if p.max_batch_size != cfg.max_batch_size:
                raise ValueError(f"profile.max_batch_size {p.max_batch_size} must be max_batch_size "
                                 f"{cfg.max_batch_size}")  # fmt: skip
            return p
        path = self._profile_path()
        if path.exists():
            try:
                return LatencyProfile.from_dict(json.loads(path.read_text()), source="cache")
            except (OSError, ValueError, TypeError) as e:
                logger.warning(f"cached profile {path} unreadable ({type(e).__name__}: {e}); measuring again")
        p = self._measure_profile()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(p.to_dict()))
            os.replace(tmp, path)  # atomic: replicas starting together never read half a file
        except OSError as e:
            logger.warning(f"could not cache the profile in {path} ({e}); the next replica measures again")
        return p

    def _profile_path(self) -> Path:
        """One file per hardware kind: CPU model or GPU name, torch threads, max_batch_size, profile_tokens and the
        model's architecture (its config without names and versions: weights do not change the cost)."""
        torch = self.torch
        cpu = platform.processor() or platform.machine()
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        names = ("_name_or_path", "transformers_version")
        arch = {k: v for k, v in self.model.config.to_dict().items() if k not in names}
        key = json.dumps({"cpu": cpu, "gpu": gpu, "threads": self.cfg.torch_threads, "B": self.cfg.max_batch_size,
                          "K": self.cfg.profile_tokens, "arch": arch}, sort_keys=True, default=str)  # fmt: skip
        root = Path(self.cfg.profile_cache or Path.home() / ".cache" / "adallava" / "profiles").expanduser()
        return root / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def _measure_profile(self) -> LatencyProfile:
        """On the engine alone: per budget, one request's prefill, and a decode step with 1 and with B rows; apart
        from them, the per-request preprocessing (template + processor), which does not follow the budget."""
        from PIL import Image

        from adallava.engine import Engine, Request

        torch, B, K = self.torch, self.cfg.max_batch_size, max(self.cfg.profile_tokens, 2)
        img = Image.new("RGB", (64, 64), (128, 64, 32))
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]

        def prepare():
            t = time.perf_counter()
            prompt = self.processor.apply_chat_template(msgs, add_generation_prompt=True)
            enc = self.processor(images=[img], text=[prompt], return_tensors="pt")
            return enc, (time.perf_counter() - t) * 1000

        enc, _ = prepare()
        overhead = min(prepare()[1] for _ in range(3))

        def timed(n, budget, tokens):
            engine = Engine(self.model, max_batch_size=n, eos_token_id=-1)
            for i in range(n):
                engine.add(Request(f"profile-{i}", enc["input_ids"], pixel_values=enc["pixel_values"], budget=budget,
                                   max_new_tokens=tokens))  # fmt: skip
            with torch.inference_mode():
                t = time.perf_counter()
                while engine.has_work:
                    engine.step()
                return (time.perf_counter() - t) * 1000

        timed(1, 1.0, 2)  # warm-up
        pre, d1, db = [], [], []
        for b in self.grid:
            t1 = min(timed(1, b, 1) for _ in range(2))
            pre.append(t1)
            d1.append(max(min(timed(1, b, K) for _ in range(2)) - t1, 0.0) / (K - 1))
            tb1 = min(timed(B, b, 1) for _ in range(2))
            db.append(max(min(timed(B, b, K) for _ in range(2)) - tb1, 0.0) / (K - 1))
        return LatencyProfile(self.grid, B, pre, d1, db, overhead_ms=overhead)

    # ---- cluster-wide load
    def cluster_load(self) -> float:
        """Ongoing requests per live replica, cluster-wide (own count fresh, the others' as last reported)."""
        return (self.others + self.ongoing) / max(self.n_replicas, 1)

    def _ensure_reporter(self):
        if self.reporter is None or self.reporter.done():
            self.reporter = asyncio.get_running_loop().create_task(self._report_loop())

    async def _report_loop(self):
        while True:
            try:
                if self.board is None:
                    self.board = serve.get_deployment_actor("load_board")
                reported = self.ongoing
                total, n = await self.board.report.remote(self.replica_id, reported)
                self.others, self.n_replicas, self.load_source = max(total - reported, 0.0), max(n, 1), "load_board"
            except Exception as e:  # board being (re)created: count locally until it is back
                if self.load_source != "local":
                    logger.warning(f"load board unreachable ({type(e).__name__}); using this replica's own load")
                self.board, self.others, self.n_replicas, self.load_source = None, 0.0, 1, "local"
            self.m_load.set(self.cluster_load())
            await asyncio.sleep(self.cfg.load_report_interval_s)

    def load_info(self) -> dict:
        return {"requests_per_replica": round(self.cluster_load(), 3),
                "cluster_ongoing": round(self.others + self.ongoing, 3), "replicas": self.n_replicas,
                "source": self.load_source, "running": self.engine.num_running, "waiting": len(self.pending),
                "contention": round(self.kappa, 3)}  # fmt: skip

    def now_ms(self) -> float:
        """The replica's clock for deadlines (ms): wall time, moved only by the advance_clock test hook."""
        return (time.time() + self.clock_offset_s) * 1000

    async def record_autoscaling_stats(self) -> dict:
        """Serve calls this and pushes the result to the controller (serve/autoscaling.py reads it): the offered
        demand (the ingress's totals, refusals included) and what this replica sustains at the ceiling budget."""
        cap = capacity_rps(self.profile, levels(self.profile, self.cfg.policy)[-1], self.cfg.policy.tokens)
        return {OFFERED: self.offered.rate(time.monotonic()), CAPACITY: cap * self.cfg.policy.target_utilization}

    # ---- health and info
    async def check_health(self):
        self._ensure_reporter()
        if self.failed_reason:
            raise RuntimeError(f"replica unhealthy: {self.failed_reason}")
        if not self.thread.is_alive():
            raise RuntimeError("replica unhealthy: the engine thread stopped")

    async def ping(self) -> str:
        """The ingress's /health: answers only while this replica can serve."""
        await self.check_health()
        return self.replica_id

    async def info(self) -> dict:
        self._ensure_reporter()
        return {"model_name": self.cfg.model_name, "budget_range": list(self.budget_range), "grid": self.grid,
                "profile": self.profile.to_dict(), "replica": self.replica_id, "load": self.load_info(),
                "contention": self.kappa, "max_context": self.max_context, "paused": self.paused,
                "joined": self.joined, "refused_deadline": self.refused_deadline, "held": self.held,
                "preparing": len(self.preparing), "engine_thread_s": {k: round(v, 3) for k, v in self.thread_s.items()},
                **self.model_facts()}  # fmt: skip

    # ---- issue 14 (playground) begin: what a client needs to draw plans, and the opt-in attention map
    def model_facts(self) -> dict:
        mc = self.model.config
        return {"num_layers": mc.text_config.num_hidden_layers, "num_prefix_layers": mc.num_prefix_layers,
                "granularity": mc.granularity, "token_selection": mc.token_selection}  # fmt: skip

    def _attention(self, request, budget: float) -> dict:
        """Engine thread (the model's only user: the hooks adallava.attention sets would see another thread's
        forward): the latency token's attention over the image's patch grid in the last prefix layer (mean over heads,
        sums to 1), for one request alone, one extra prefill. `region`: the part of the image the patch grid covers."""
        from adallava.attention import attention_map, latency_token_attention

        ids = request.input_ids if request.input_ids.dim() == 2 else request.input_ids[None]
        mask = request.attention_mask if request.attention_mask is not None else self.torch.ones_like(ids)
        with self.torch.inference_mode():
            grid = attention_map(latency_token_attention(self.model, ids, request.pixel_values, mask, budget))
        ip = self.processor.image_processor
        return {"layer": self.model.config.num_prefix_layers - 1, "grid": [[round(float(x), 5) for x in row]
                for row in grid], "region": "center_square" if getattr(ip, "do_center_crop", False) else "whole"}
    # ---- issue 14 (playground) end

    def _test_hook(self, name: str):
        if not self.cfg.fault_injection:
            raise PermissionError(f"{name}: test hooks are off (config fault_injection=false)")

    async def pause_engine(self, paused: bool = True) -> dict:
        """Test hook: while paused the engine thread neither takes pending requests nor steps (they stay queued)."""
        self._test_hook("pause_engine")
        self.paused = paused
        self.wakeup.set()
        return await self.info()

    async def hold_preprocessing(self, held: bool = True) -> dict:
        """Test hook: while held, admitted requests stay in (or waiting for) the preprocessing thread."""
        self._test_hook("hold_preprocessing")
        if held:
            self.prep_open.clear()
        else:
            self.prep_open.set()
        return await self.info()

    async def advance_clock(self, seconds: float) -> float:
        """Test hook: move this replica's deadline clock forward (requests' deadlines come nearer)."""
        self._test_hook("advance_clock")
        self.clock_offset_s += float(seconds)
        return self.clock_offset_s

    async def inject_fault(self) -> str:
        """Test hook (config fault_injection=True only): the next health check fails and Serve replaces us."""
        self._test_hook("inject_fault")
        self.failed_reason = "fault injected"
        return self.replica_id

    # ---- requests
    async def generate(self, job: Job) -> dict:
        """Non-streaming: the final event (or an error event)."""
        last = None
        async for ev in self._events(job):
            if ev["type"] in ("error", "done"):
                last = ev
        return last

    async def generate_stream(self, job: Job):
        async for ev in self._events(job):
            yield ev

    @staticmethod
    def _error(e: APIError) -> dict:
        return {"type": "error", "status": e.status, "body": e.body(), "headers": e.headers}

    async def _events(self, job: Job):
        self._ensure_reporter()
        self.offered.observe(time.monotonic(), job.offered)
        loop = asyncio.get_running_loop()
        arrival = (job.t_ingress + self.clock_offset_s) * 1000  # replica clock (ms)
        deadline, plan = arrival + job.deadline_ms, plan_deadline(arrival, job.deadline_ms, self.cfg.policy.headroom)
        key = object()  # request ids are the client's to choose: two in preprocessing may share one
        self.preparing[key] = (plan, deadline, job.max_tokens)
        try:
            request = await loop.run_in_executor(self.prep, self._prepare, job)
        except APIError as e:
            yield self._error(e)
            return
        except Exception as e:  # noqa: BLE001 - the processor refusing validated input is still that input's fault
            logger.warning(f"{job.request_id}: preprocessing failed: {type(e).__name__}: {e}")
            yield self._error(bad_request(f"the request could not be preprocessed ({type(e).__name__})",
                                          code="invalid_request"))  # fmt: skip
            return
        finally:
            self.preparing.pop(key, None)
        self.ongoing += 1
        live = _Live(job, request, asyncio.Queue(), loop)
        live.deadline_ms, live.plan_ms = deadline, plan
        finished = False
        try:
            self.pending.append(live)
            self.wakeup.set()
            yield {"type": "admitted"}
            async for ev in self._follow(live):
                finished = ev["type"] in ("done", "error")
                yield ev
        finally:
            self.ongoing -= 1
            if not finished:  # the client went away: free its row now
                live.gone = True
                self.cancels.append((job.request_id, "cancelled"))
                self.wakeup.set()

    def _prepare(self, job: Job):
        """Preprocessing thread: chat template, tokenizer and image processor, once, for one request."""
        from adallava.engine import Request

        if job.attention and self.model.config.token_selection != "none":  # issue 14
            raise bad_request(f"adallava.attention: not available with token selection "
                              f"({self.model.config.token_selection!r} drops image tokens)", param="adallava.attention")
        self.prep_open.wait()  # always set outside tests (hold_preprocessing)
        prompt = self.processor.apply_chat_template(job.messages, add_generation_prompt=True)
        enc = self.processor(images=job.images or None, text=[prompt], return_tensors="pt")
        n = int(enc["input_ids"].shape[1]) + 1  # + the latency token
        if n + job.max_tokens > self.max_context:
            raise bad_request(f"the prompt is {n} tokens; with max_tokens={job.max_tokens} it exceeds the model's "
                              f"context of {self.max_context} tokens", param="messages",
                              code="context_length_exceeded")  # fmt: skip
        job.prompt_tokens = n
        return Request(job.request_id, enc["input_ids"], pixel_values=enc.get("pixel_values"),
                       attention_mask=enc.get("attention_mask"), max_new_tokens=job.max_tokens,
                       temperature=job.temperature, top_p=job.top_p, seed=job.seed)  # fmt: skip

    async def _follow(self, live: _Live):
        """Event loop: turn the engine's tokens for one request into text deltas, stop strings and a final event."""
        job = live.job
        stop = StopText(job.stop)
        need_text = job.stream or bool(job.stop)
        tokens: list[int] = []
        t_first = t_last = None
        stopped = False
        while True:
            item = await live.queue.get()
            if item["type"] == "error":
                yield item
                return
            ev = item["event"]
            if ev.token is not None and ev.token != self.eos_id and not stopped:
                tokens.append(ev.token)
                t_last = time.time()
                t_first = t_first or t_last
                if need_text:
                    delta, stopped = stop.update(self.loop_tokenizer.decode(tokens, skip_special_tokens=True))
                    if delta and job.stream:
                        yield {"type": "delta", "text": delta}
                    if stopped:
                        self.cancels.append((job.request_id, "stop"))
                        self.wakeup.set()
            fin = ev.finished
            if fin is None:
                continue
            if fin.finish_reason == "error":
                logger.warning(f"{job.request_id}: prefill failed: {fin.error}")
                yield self._error(bad_request(f"the request could not be run ({fin.error.split(':')[0]})",
                                              code="invalid_request"))  # fmt: skip
                return
            text = self.loop_tokenizer.decode(tokens, skip_special_tokens=True)
            if need_text:
                delta, stopped = stop.update(text, final=True)
                if delta and job.stream:
                    yield {"type": "delta", "text": delta}
                text = stop.text
            yield self._done(live, fin, text, len(tokens), stopped, t_first, t_last)
            return

    def _done(self, live: _Live, fin, text: str, n_tokens: int, stopped: bool, t_first, t_last) -> dict:
        job, now = live.job, time.time()
        steps = fin.finished_step - fin.joined_step + 1
        # the length model predicts engine steps (what the latency model plays): an EOS takes one too, though it is
        # not in the completion's tokens; learning completion_tokens under-predicted every answer ended by EOS
        self.lengths.observe(steps)
        reason = "stop" if stopped or fin.finish_reason in ("eos", "stop") else "length"
        total_ms = (now - job.t_ingress) * 1000  # from the ingress's arrival: waits upstream count too
        self.m_budget.observe(live.budget)
        self.m_latency.observe(total_ms, tags={"budget": f"{live.budget:.3f}"})
        if t_first is not None:
            self.m_ttft.observe((t_first - job.t_ingress) * 1000)
        if t_first is not None and n_tokens > 1:
            self.m_tpot.observe((t_last - t_first) * 1000 / (n_tokens - 1))
        return {
            "type": "done", "text": text, "finish_reason": reason,
            "prompt_tokens": job.prompt_tokens, "completion_tokens": n_tokens,
            "adallava": {
                "budget": live.budget, "budget_server": live.server_budget, "budget_cap": job.budget_cap,
                "latency_ms_target": job.latency_ms, "deadline_ms": job.deadline_ms,
                "execution_plan": fin.execution_plan, "flops": fin.flops,
                "latency_ms": {"total": round(total_ms, 2), "queue": round((live.t_join - job.t_ingress) * 1000, 2),
                               "prefill": round(fin.prefill_s * 1000, 2),
                               "decode": round((now - live.t_join) * 1000 - fin.prefill_s * 1000, 2),
                               # what the join predicted for total (the play at that budget with the work present
                               # then, from arrival); total - predicted = later_prefills + the model's error
                               "predicted": None if live.predicted_ms is None else round(live.predicted_ms, 2),
                               # ms of prefills of requests that joined after it (known at its join or not), run
                               # between the end of its own prefill and its finish
                               "later_prefills": None if None in (live.prefills_at_own, live.prefills_at_finish)
                               else round(live.prefills_at_finish - live.prefills_at_own, 2),
                               "time_to_first_token": None if t_first is None else round((t_first - job.t_ingress)
                                                                                         * 1000, 2)},
                "load": self.load_info(), "batch_size": live.batch_size, "engine_steps": steps,
                "tokens_predicted": live.tokens_predicted,  # what its join planned for (completion_tokens: what ran)
                "replica": self.replica_id,
                # issue 14 (playground): which heads [0] and MLP neuron groups [1] ran in each schedulable layer
                "execution_units": None if fin.plan is None else fin.plan.round().int().tolist(),
                **({"attention": live.attention} if live.attention is not None else {}),
            },
        }  # fmt: skip

    # ---- the engine thread
    def _engine_loop(self):
        while True:
            try:
                self._engine_iteration()
            except Exception as e:  # noqa: BLE001 - a bug here must not kill the thread silently
                logger.exception("engine loop")
                self._fail_running(e)

    def _engine_iteration(self):
        engine = self.engine
        while self.cancels:
            rid, reason = self.cancels.popleft()
            live = self.live.pop(rid, None)
            fin = engine.cancel(rid, reason)
            if live is not None and fin is not None:
                live.put({"type": "event", "event": _Finished(rid, fin)})
        if self.paused:  # test hook: nothing joins, nothing steps
            self.wakeup.wait(timeout=0.05)
            self.wakeup.clear()
            return
        t0 = time.perf_counter()
        while self.pending and engine.num_running + engine.num_waiting < engine.max_batch_size:
            if self.pending[0].gone:
                self.pending.popleft()
                continue
            if not self._join(self.pending[0]):
                break  # the gate holds it (and, FIFO, everyone behind it) until after this step's decode
            self.pending.popleft()
        if not engine.has_work:
            self.wakeup.wait(timeout=0.5)
            self.wakeup.clear()
            return
        joining = [r.budget for r in engine.waiting]
        decoding = [row.req.budget for row in engine.running]
        t = time.perf_counter()
        self.thread_s["join"] += t - t0
        self._mark, self._joining = t, {r.request_id for r in engine.waiting}
        try:
            engine.step(on_event=self._deliver)  # each token goes to its request as it exists, not at the step's end
            self.consecutive_failures = 0
        except Exception as e:  # noqa: BLE001
            self.consecutive_failures += 1
            if self.consecutive_failures >= 3:  # the model itself is broken: let Serve replace this replica
                self.failed_reason = f"{self.consecutive_failures} engine steps failed in a row ({type(e).__name__})"
            logger.exception("engine step failed; its running requests get an error")
            self._fail_running(e)
            return
        t1 = time.perf_counter()
        self._observe_step((t1 - t) * 1000, joining, decoding, flush=not engine.has_work)
        self.m_running.set(engine.num_running)
        self.thread_s["step"] += t1 - t
        self.thread_s["busy"] += time.perf_counter() - t0

    def _deliver(self, ev):
        """Engine thread, inside a step: one event to its request's queue now. The running rows' tokens go before
        the step's prefills start, a joining request's first token right after its own prefill: the latency model
        (serve.policy.play) finishes a request when its token exists, and so does the server."""
        now = time.perf_counter()
        joining = ev.request_id in self._joining  # its first event: the time since the mark was its prefill
        if joining:
            self._joining.discard(ev.request_id)
            self.prefill_ms_total += (now - self._mark) * 1000
        self._mark = now
        live = self.live.get(ev.request_id)
        if live is None:
            return
        if joining:
            live.prefills_at_own = self.prefill_ms_total
        if ev.finished is not None:
            live.prefills_at_finish = self.prefill_ms_total
            self.live.pop(ev.request_id, None)
        live.put({"type": "event", "event": ev})

    def _observe_step(self, ms: float, joining: list[float], decoding: list[float], flush: bool):
        """The contention factor from engine steps: measured step time against the profile's prediction for the same
        work (each joining request's prefill at its budget, one decode step of the running rows at theirs), summed
        over 16 steps (or until the engine idles) before one ratio enters the window. Both sides follow the budgets,
        so the factor measures contention, not the budget. A config profile is taken as is."""
        if self.profile.source == "config":
            return
        pred = predicted_step_ms(self.profile, joining, decoding)
        self._acc = (self._acc[0] + ms, self._acc[1] + pred, self._acc[2] + 1)
        if self._acc[2] >= 16 or flush:
            self.kappa = update_contention(self.kappa_window, self._acc[0], self._acc[1], self.cfg.policy)
            self.m_contention.set(self.kappa)
            self._acc = (0.0, 0.0, 0)

    def _join(self, live: _Live) -> bool:
        """Choose the request's budget now, from deadlines (SlackFit), or refuse it when even the floor is too late;
        then hand it to the engine. False: it stays first in line, because at its budget the engine's gate
        (serve.policy.may_prefill) holds its prefill back until a running row has stepped (choose_budget plays that
        wait, and it found that waiting gives the higher budget in time); True: it left the line (joined or refused)."""
        job, engine, policy = live.job, self.engine, self.cfg.policy
        expect, left = self.lengths.expect, self.lengths.remaining  # predicted tokens (max_tokens until some were seen)
        ahead = [Slot(r.req.budget, left(r.req.max_new_tokens, len(r.tokens)), running=True,
                      **self._deadlines(r.req.request_id)) for r in engine.running]  # fmt: skip
        ahead += [Slot(r.budget, expect(r.max_new_tokens), **self._deadlines(r.request_id)) for r in engine.waiting]
        # behind it, at the floor the edge admitted them at: the requests waiting for a row, then those still in
        # preprocessing (admitted, not yet in line: a budget chosen now must leave them the time the edge counted on).
        # list(): one atomic copy each, the event loop appends meanwhile
        hard = self._hard
        behind = [Slot(self.floor, expect(w.job.max_tokens), w.plan_ms, hard=hard(w.deadline_ms))
                  for w in list(self.pending) if not w.gone and w is not live]  # fmt: skip
        behind += [Slot(self.floor, expect(tokens), plan, hard=hard(deadline))
                   for plan, deadline, tokens in list(self.preparing.values())]  # fmt: skip
        # nobody ahead or behind: while no lengths are known, predicted at one token (serve.policy.LengthModel)
        new = Slot(0.0, expect(job.max_tokens, alone=not ahead and not behind), live.plan_ms,
                   hard=hard(live.deadline_ms))  # fmt: skip
        choice = choose_budget(self.profile, policy, self.now_ms(), ahead, new, behind, self.kappa)
        if not choice.feasible and policy.reject:
            self.refused_deadline += 1
            self.m_reject.inc(tags={"reason": "deadline"})
            retry = max(1, math.ceil((choice.predicted - live.plan_ms) / 1000))
            over = (f"{choice.predicted - live.deadline_ms:.0f} ms after its {job.deadline_ms:g} ms deadline"
                    if policy.headroom == 0 else f"{choice.predicted - live.plan_ms:.0f} ms after the "
                    f"{(1 - policy.headroom) * job.deadline_ms:.0f} ms it plans for (its {job.deadline_ms:.0f} ms "
                    f"deadline less the headroom {policy.headroom:g})")  # fmt: skip
            msg = (f"deadline exceeded: by its turn even the lowest budget ({self.floor:g}) would finish {over}; "
                   f"retry after {retry} s")
            live.put(self._error(APIError(429, msg, code="deadline_exceeded", type="rate_limit_error",
                                          headers={"Retry-After": str(retry)})))  # fmt: skip
            return True
        if not choice.now:
            self.held += 1
            return False
        live.server_budget = choice.budget
        live.tokens_predicted = new.tokens
        if math.isfinite(live.deadline_ms):  # arrival = the absolute deadline minus the relative one (replica clock)
            live.predicted_ms = choice.predicted - (live.deadline_ms - job.deadline_ms)
        live.budget = apply_caps(live.server_budget, job.budget_cap)
        live.request.budget = live.budget
        live.batch_size = self.engine.num_running + 1
        live.t_join = time.time()
        self.m_queue.observe((live.t_join - job.t_ingress) * 1000)
        if job.attention:  # issue 14: opt-in, one extra prefill of this request alone, at its budget
            try:
                live.attention = self._attention(live.request, live.budget)
            except Exception as e:  # noqa: BLE001 - this request alone fails, the running batch goes on
                logger.exception(f"{job.request_id}: adallava.attention failed")
                live.put({"type": "error", "status": 500, "headers": {},
                          "body": error_body(f"adallava.attention could not be computed ({type(e).__name__})")})
                return True
        try:
            self.engine.add(live.request)
        except ValueError as e:  # refused by the engine: this request alone fails
            live.put(self._error(bad_request(f"the request could not be run: {e}", code="invalid_request")))
            return True
        self.joined += 1
        self.live[job.request_id] = live
        return True

    def _deadlines(self, request_id: str) -> dict:
        """A request in the engine, as Slot keywords: the deadline its choices plan for, and its real one where they
        differ (none for a request this replica does not follow)."""
        live = self.live.get(request_id)
        return {} if live is None else {"deadline": live.plan_ms, "hard": self._hard(live.deadline_ms)}

    def _hard(self, deadline: float) -> float | None:
        """The real deadline the gate protects past the planned one; None with no headroom (they are the same)."""
        return deadline if self.cfg.policy.headroom > 0 else None

    def _fail_running(self, e: Exception):
        """After a failed step the engine's caches cannot be trusted: every request in it gets an error event (the
        ones still pending are untouched) and a fresh engine takes over."""
        body = error_body(f"the model failed while running this request ({type(e).__name__})")
        for live in list(self.live.values()):
            live.put({"type": "error", "status": 500, "body": body, "headers": {}})
        self.live.clear()
        self.engine = self._make_engine()


class _Finished:
    """A cancellation's result in the shape of an engine event (no new token)."""

    def __init__(self, request_id, fin):
        self.request_id, self.token, self.finished = request_id, None, fin


__all__ = ["AdaLlavaModel", "LoadBoard", "Job"]
