"""The model deployment: each AdaLlavaModel replica runs adallava.engine's continuous batching in one thread.

A request arrives from the ingress (validated, images decoded), is templated, tokenized and preprocessed in the
replica's preprocessing thread, passes admission (429 when even the floor budget cannot meet the SLO at this load) and
waits in `pending`. The engine thread loops: it moves pending requests into the engine while it has free rows (each
request's budget is decided at that moment, from the load then, and capped by the client's `budget`/`latency_ms`),
runs one engine step (one token for every running request, the prefill of those joining), and hands each token to its
request's asyncio queue. A request leaves the running batch at EOS, at its max_tokens, at a stop string (matched on the
event loop, which cancels it in the engine) or when its client goes away; the next waiting request takes its row at the
next step. Nobody waits for the longest request of a batch.

How a replica sees cluster-wide load (Ray 2.60). Serve pushes no cluster-wide load *to* replicas: signals flow replica
-> controller (autoscaling) and replica -> router. We add the missing return path with a *deployment-scoped actor*
(`DeploymentActorConfig`, managed by the Serve controller, shared by all replicas of the deployment, deleted with it,
recreated if it dies): `LoadBoard`. Every replica reports its ongoing count (admitted and not finished: running plus
waiting) every `load_report_interval_s` and gets back the sum over all live replicas and their number; reports older
than `stale_after_s` are dropped, so a dead replica stops counting within a second. If the board cannot be reached the
replica falls back to its own count and says so in the response (load.source).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import ray
from ray import serve

from serve.config import ServeConfig
from serve.policy import BudgetController, LatencyProfile, apply_caps, batch_ms, budget_for_latency, update_slowdown
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
    latency_ms: float | None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    t_ingress: float = 0.0  # time.time() when the ingress received it (queue wait and TTFT count from here)
    attention: bool = False  # issue 14: return the latency token's attention over the image (adallava.attention)
    arrival: float = 0.0  # time.time() at the replica (set on admission)
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
    batch_size: int = 0  # requests running when it joined
    t_join: float | None = None
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
        cfg.policy.check(self.budget_range)
        self.max_context = int(getattr(mc.text_config, "max_position_embeddings", 4096))
        self.eos_id = self.processor.tokenizer.eos_token_id
        # The fast tokenizer keeps padding/truncation as mutable state that every call resets: the event loop's
        # detokenisation gets its own copy, apart from the preprocessing thread's processor.
        self.loop_tokenizer = copy.deepcopy(self.processor.tokenizer)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prep")
        self.profile = self._measure_profile()
        self.controller = BudgetController(self.profile, cfg.policy)
        self.engine = Engine(self.model, max_batch_size=cfg.max_batch_size, eos_token_id=self.eos_id)
        self._make_engine = lambda: Engine(self.model, max_batch_size=cfg.max_batch_size, eos_token_id=self.eos_id)
        self.pending: deque[_Live] = deque()  # admitted, waiting for a row (appended on the loop, taken by the thread)
        self.live: dict[str, _Live] = {}  # in the engine
        self.cancels: deque[tuple[str, str]] = deque()  # (request id, reason) for the engine thread
        self.wakeup = threading.Event()
        self.ongoing = 0
        self.others, self.n_replicas, self.load_source = 0.0, 1, "local"
        self.board = None
        self.reporter: asyncio.Task | None = None
        self.failed_reason: str | None = None
        self.consecutive_failures = 0
        self._acc = (0.0, 0.0, 0)  # measured ms, predicted ms, steps since the last slowdown sample
        edges = sorted({round((a + b) / 2, 6) for a, b in zip(self.grid, self.grid[1:])}) or [1.0]
        ms = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
        self.m_budget = Histogram("adallava_budget", description="budget chosen per request", boundaries=edges)
        self.m_load = Gauge("adallava_load_per_replica", description="smoothed ongoing requests per replica "
                            "(cluster-wide, running + waiting)")  # fmt: skip
        self.m_slowdown = Gauge("adallava_slowdown_factor", description="this replica's measured/profiled engine "
                                "step time (median over recent windows of steps); multiplies every latency prediction")  # fmt: skip
        self.m_latency = Histogram("adallava_latency_ms", description="request latency in the replica by budget",
                                   boundaries=ms, tag_keys=("budget",))  # fmt: skip
        self.m_reject = Counter("adallava_rejections", description="requests refused with 429",
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

    # ---- start-up profile: the cost model's numbers, measured on this replica's hardware, on the engine it serves
    # with (n requests prefilled one by one, then decoded together), so the step-time correction starts near 1
    def _measure_profile(self) -> LatencyProfile:
        from PIL import Image

        from adallava.engine import Engine, Request

        torch, B, K = self.torch, self.cfg.max_batch_size, max(self.cfg.profile_tokens, 2)
        img = Image.new("RGB", (64, 64), (128, 64, 32))
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
        prompt = self.processor.apply_chat_template(msgs, add_generation_prompt=True)
        enc = self.processor(images=[img], text=[prompt], return_tensors="pt")

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
        p1, pb, d1, db = [], [], [], []
        for b in self.grid:
            for n, pre, dec in ((1, p1, d1), (B, pb, db)):
                t1 = min(timed(n, b, 1) for _ in range(2))
                tk = min(timed(n, b, K) for _ in range(2))
                pre.append(t1)
                dec.append(max(tk - t1, 0.0) / (K - 1))
        return LatencyProfile(self.grid, B, p1, pb, d1, db)

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
            self.controller.observe(self.cluster_load(), time.monotonic())
            self.m_load.set(self.controller.load or 0.0)
            await asyncio.sleep(self.cfg.load_report_interval_s)

    def load_info(self) -> dict:
        c = self.controller
        return {"requests_per_replica": round(c.load or 0.0, 3), "requests_per_replica_now": round(c.raw_load, 3),
                "cluster_ongoing": round(self.others + self.ongoing, 3), "replicas": self.n_replicas,
                "source": self.load_source, "slowdown": round(c.slowdown, 3),
                "slowdown_batches": c.batches_seen}  # fmt: skip

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
                "budget": self.controller.budget, "max_context": self.max_context,
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

    async def inject_fault(self) -> str:
        """Test hook (config fault_injection=True only): the next health check fails and Serve replaces us."""
        if not self.cfg.fault_injection:
            raise PermissionError("fault injection is off (config fault_injection=false)")
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
        loop = asyncio.get_running_loop()
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
        retry = self.controller.admit((self.others + self.ongoing + 1) / max(self.n_replicas, 1))
        # An idle replica always serves: its slowdown factor is only measured on steps it runs, so refusing while idle
        # could keep a factor left high by a past burst forever (nothing would run to bring it down).
        if retry is not None and self.ongoing > 0:
            self.m_reject.inc(tags={"reason": "overload"})
            msg = (f"overloaded: even the lowest budget ({self.controller.cfg.floor:g}) cannot meet the "
                   f"{self.controller.cfg.slo_ms:g} ms target at this load; retry after {retry} s")  # fmt: skip
            yield self._error(APIError(429, msg, code="overloaded", type="rate_limit_error",
                                       headers={"Retry-After": str(retry)}))  # fmt: skip
            return
        self.ongoing += 1
        job.arrival = time.time()
        live = _Live(job, request, asyncio.Queue(), loop)
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
        reason = "stop" if stopped or fin.finish_reason in ("eos", "stop") else "length"
        total_ms = (now - job.arrival) * 1000
        self.m_budget.observe(live.budget)
        self.m_latency.observe(total_ms, tags={"budget": f"{live.budget:.3f}"})
        if t_first is not None:
            self.m_ttft.observe((t_first - job.t_ingress) * 1000)
        if t_first is not None and n_tokens > 1:
            self.m_tpot.observe((t_last - t_first) * 1000 / (n_tokens - 1))
        steps = fin.finished_step - fin.joined_step + 1
        return {
            "type": "done", "text": text, "finish_reason": reason,
            "prompt_tokens": job.prompt_tokens, "completion_tokens": n_tokens,
            "adallava": {
                "budget": live.budget, "budget_server": live.server_budget, "budget_cap": job.budget_cap,
                "latency_ms_target": job.latency_ms, "execution_plan": fin.execution_plan, "flops": fin.flops,
                "latency_ms": {"total": round(total_ms, 2), "queue": round((live.t_join - job.arrival) * 1000, 2),
                               "prefill": round(fin.prefill_s * 1000, 2),
                               "decode": round((now - live.t_join) * 1000 - fin.prefill_s * 1000, 2),
                               "time_to_first_token": None if t_first is None else round((t_first - job.t_ingress)
                                                                                         * 1000, 2)},
                "load": self.load_info(), "batch_size": live.batch_size, "engine_steps": steps,
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
        while self.pending and engine.num_running + engine.num_waiting < engine.max_batch_size:
            live = self.pending.popleft()
            if live.gone:
                continue
            self._join(live)
        if not engine.has_work:
            self.wakeup.wait(timeout=0.5)
            self.wakeup.clear()
            return
        joining = [r.budget for r in engine.waiting]
        decoding = [row.req.budget for row in engine.running]
        t = time.perf_counter()
        try:
            events = engine.step()
            self.consecutive_failures = 0
        except Exception as e:  # noqa: BLE001
            self.consecutive_failures += 1
            if self.consecutive_failures >= 3:  # the model itself is broken: let Serve replace this replica
                self.failed_reason = f"{self.consecutive_failures} engine steps failed in a row ({type(e).__name__})"
            logger.exception("engine step failed; its running requests get an error")
            self._fail_running(e)
            return
        self._observe_step((time.perf_counter() - t) * 1000, joining, decoding, flush=not engine.has_work)
        self.m_running.set(engine.num_running)
        for ev in events:
            live = self.live.get(ev.request_id)
            if live is None:
                continue
            if ev.finished is not None:
                self.live.pop(ev.request_id, None)
            live.put({"type": "event", "event": ev})

    def _observe_step(self, ms: float, joining: list[float], decoding: list[float], flush: bool):
        """The slowdown correction from engine steps: measured step time against the profile's prediction for the
        same work (one prefill of a batch of one per joining request, one decode token for the running batch at its
        largest budget), summed over `slowdown_steps` steps (or until the engine idles) before one ratio enters the
        controller's window. Per request instead, other requests' prefills inside its lifetime would read as slowdown
        and feed back on admission."""
        p = self.profile
        pred = sum(batch_ms(p, b, 1, 1) for b in joining)
        if decoding:
            b, n = max(decoding), len(decoding)
            pred += batch_ms(p, b, n, 2) - batch_ms(p, b, n, 1)
        self._acc = (self._acc[0] + ms, self._acc[1] + pred, self._acc[2] + 1)
        if self._acc[2] >= 16 or flush:
            c = self.controller
            c.slowdown = update_slowdown(c.ratios, self._acc[0], self._acc[1], c.cfg)
            c.batches_seen += 1
            self.m_slowdown.set(c.slowdown)
            self._acc = (0.0, 0.0, 0)

    def _join(self, live: _Live):
        """Decide the request's budget now (the load when it joins), then hand it to the engine."""
        job = live.job
        self.controller.observe(self.cluster_load(), time.monotonic())
        live.server_budget = self.controller.decide()
        lat_budget = None
        if job.latency_ms is not None:
            lat_budget = budget_for_latency(job.latency_ms, self.controller.load or 0.0, self.profile,
                                            self.cfg.policy, job.max_tokens, self.controller.slowdown)  # fmt: skip
        live.budget = apply_caps(live.server_budget, job.budget_cap, lat_budget)
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
                return
        try:
            self.engine.add(live.request)
        except ValueError as e:  # refused by the engine: this request alone fails
            live.put(self._error(bad_request(f"the request could not be run: {e}", code="invalid_request")))
            return
        self.live[job.request_id] = live

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
