"""The Ray Serve application: an OpenAI-compatible FastAPI ingress and an autoscaled AdaLLaVA model deployment whose
replicas pick each request's budget from the load on the whole deployment.

How a replica sees cluster-wide load (Ray 2.60). Serve pushes no cluster-wide load *to* replicas: signals flow replica
-> controller (autoscaling) and replica -> router. We add the missing return path with a *deployment-scoped actor*
(`DeploymentActorConfig`, managed by the Serve controller, shared by all replicas of the deployment, deleted with it,
recreated if it dies): `LoadBoard`. Every replica reports its ongoing count (admitted and not finished: running plus
waiting in its batch queue) every `load_report_interval_s` and gets back the sum over all live replicas and their
number; reports older than `stale_after_s` are dropped, so a dead replica stops counting within a second. The
replica adds its own fresh count to the others' last reported total. `max_ongoing_requests` is set well above the
batch size, so requests wait in the replicas' batch queues, where they are counted, rather than in the router.
If the board cannot be reached the replica falls back to its own count and says so in the response (load.source).

Why not the other options: the ingress stamping budgets sees only its own in-flight requests (one ingress replica is
the whole picture, several are not) and cannot know the batch a request lands in; routing stats and autoscaling
metrics are polled every few seconds and only by the router/controller; a PromQL query needs Prometheus running.

A request's budget is decided when its batch starts (not when it arrives), so requests that waited through a burst
get the budget that the load at run time allows; admission (429) is decided on arrival. Requests with different
budgets share a batch: the core's generate takes one budget per request.
"""

import asyncio
import copy
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.config import DeploymentActorConfig

from serve.policy import BudgetController, LatencyProfile, PolicyConfig, apply_caps, budget_for_latency
from serve.protocol import (
    APIError, Limits, ParsedRequest, bad_request, chunk_body, completion_body, load_image, parse_request,
    validate_request,
)  # fmt: skip

logger = logging.getLogger("ray.serve")


@dataclass
class ServeConfig:
    """Everything the application needs; YAML `args:` and `key=value` overrides map onto these names."""

    model: str = "tiny"  # "tiny" (random-init preset) or a checkpoint directory (adallava.presets.load)
    model_name: str = "adallava"  # the id /v1/models lists and responses carry
    seed: int = 0  # for the tiny preset's random init (every replica builds the same weights)
    # batching: LLaVA-sized batches; the 10 ms wait is Serve's default (collect a batch without hurting latency)
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    torch_threads: int = 1  # one core per replica on small CPU machines; raise on bigger ones
    num_cpus: float = 1.0  # Ray resources per model replica
    # autoscaling: scale on ongoing requests per replica (running + queued); target = one full batch
    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    max_ongoing_requests: int = 64  # high, so requests queue in the replica (where the load board counts them)
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    look_back_period_s: float = 5.0
    metrics_interval_s: float = 1.0  # how often replicas report to the autoscaler (must be < look_back_period_s)
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    load_report_interval_s: float = 0.1  # replicas <-> load board; budgets react within a few of these
    stale_after_s: float = 1.0  # a replica silent for this long no longer counts
    profile_tokens: int = 8  # decode steps per profile measurement at replica start
    fault_injection: bool = False  # lets tests make a replica fail its health check; never on in production
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    limits: Limits = field(default_factory=Limits)


def make_config(args: dict | None = None) -> ServeConfig:
    """dict (nested or dotted keys, e.g. {"policy": {"slo_ms": 900}} or {"policy.slo_ms": 900}) -> ServeConfig."""
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


# ---------------------------------------------------------------------------------------------------------- load board


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


# ---------------------------------------------------------------------------------------------------------- model


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
    arrival: float = 0.0  # time.time() at the replica (set on admission)
    prompt_tokens: int = 0


class _QueueStreamer:
    """generate()'s streamer (put(token_tensor [B]) / end()), bridged from the generate thread into asyncio."""

    def __init__(self, loop, queue, group: int):
        self.loop, self.queue, self.group = loop, queue, group

    def put(self, tokens):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.group, tokens.tolist()))

    def end(self):
        pass


_DONE = object()


@serve.deployment(name="AdaLlavaModel")
class AdaLlavaModel:
    def __init__(self, cfg: ServeConfig):
        import torch
        from ray.serve.metrics import Counter, Gauge, Histogram

        from adallava import budget as budgets
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
        self.image_seq_length = int(getattr(mc, "image_seq_length", 576))
        self.eos_id = self.processor.tokenizer.eos_token_id
        # The fast tokenizer keeps padding/truncation as mutable state that every call resets; the generate thread's
        # processor(..., padding=True) racing the event loop's unpadded calls left batches unpadded under load
        # ("Unable to create tensor", a 500 for the whole batch). The event loop gets its own copy.
        self.loop_tokenizer = copy.deepcopy(self.processor.tokenizer)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.executor = ThreadPoolExecutor(max_workers=1)
        self._run_batch.set_max_batch_size(cfg.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.profile = self._measure_profile()
        self.controller = BudgetController(self.profile, cfg.policy)
        self.ongoing = 0
        self.others, self.n_replicas, self.load_source = 0.0, 1, "local"
        self.board = None
        self.reporter: asyncio.Task | None = None
        self.failed_reason: str | None = None
        self.consecutive_failures = 0
        edges = sorted({round((a + b) / 2, 6) for a, b in zip(self.grid, self.grid[1:])}) or [1.0]
        self.m_budget = Histogram("adallava_budget", description="budget chosen per request", boundaries=edges)
        self.m_load = Gauge("adallava_load_per_replica", description="smoothed ongoing requests per replica "
                            "(cluster-wide, running + queued)")  # fmt: skip
        self.m_slowdown = Gauge("adallava_slowdown_factor", description="this replica's measured/profiled batch time "
                                "(median over recent batches); multiplies every latency prediction")  # fmt: skip
        self.m_latency = Histogram("adallava_latency_ms", description="request latency in the replica by budget",
                                   boundaries=[10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
                                   tag_keys=("budget",))  # fmt: skip
        self.m_reject = Counter("adallava_rejections", description="requests refused with 429",
                                tag_keys=("reason",))  # fmt: skip

    # ---- start-up profile: the cost model's numbers, measured on this replica's hardware
    def _measure_profile(self) -> LatencyProfile:
        from PIL import Image

        torch, B, K = self.torch, self.cfg.max_batch_size, max(self.cfg.profile_tokens, 2)
        img = Image.new("RGB", (64, 64), (128, 64, 32))
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
        prompt = self.processor.apply_chat_template(msgs, add_generation_prompt=True)

        def timed(n, budget, tokens):
            enc = self.processor(images=[img] * n, text=[prompt] * n, return_tensors="pt", padding=True)
            with torch.inference_mode():
                t = time.perf_counter()
                self.model.generate(**enc, budget=budget, max_new_tokens=tokens, eos_token_id=-1)
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

    async def info(self) -> dict:
        self._ensure_reporter()
        return {"model_name": self.cfg.model_name, "budget_range": list(self.budget_range), "grid": self.grid,
                "profile": self.profile.to_dict(), "replica": self.replica_id, "load": self.load_info(),
                "budget": self.controller.budget}  # fmt: skip

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

    async def _events(self, job: Job):
        self._ensure_reporter()
        try:
            job.prompt_tokens = self._prompt_tokens(job)
        except APIError as e:
            yield {"type": "error", "status": e.status, "body": e.body(), "headers": e.headers}
            return
        retry = self.controller.admit((self.others + self.ongoing + 1) / max(self.n_replicas, 1))
        if retry is not None:
            self.m_reject.inc(tags={"reason": "overload"})
            msg = (f"overloaded: even the lowest budget ({self.controller.cfg.floor:g}) cannot meet the "
                   f"{self.controller.cfg.slo_ms:g} ms target at this load; retry after {retry} s")  # fmt: skip
            e = APIError(429, msg, code="overloaded", type="rate_limit_error", headers={"Retry-After": str(retry)})
            yield {"type": "error", "status": 429, "body": e.body(), "headers": e.headers}
            return
        self.ongoing += 1
        job.arrival = time.time()
        try:
            yield {"type": "admitted"}
            async for ev in self._run_batch(job):
                if ev is not None:
                    yield ev
        finally:
            self.ongoing -= 1

    def _prompt_tokens(self, job: Job) -> int:
        prompt = self.processor.apply_chat_template(job.messages, add_generation_prompt=True)
        n = len(self.loop_tokenizer(prompt).input_ids) + len(job.images) * (self.image_seq_length - 1) + 1
        if n + job.max_tokens > self.max_context:
            raise bad_request(f"the prompt is {n} tokens; with max_tokens={job.max_tokens} it exceeds the model's "
                              f"context of {self.max_context} tokens", param="messages",
                              code="context_length_exceeded")  # fmt: skip
        return n

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _run_batch(self, jobs: "list[Job]"):
        """One batch: budgets decided now from the smoothed cluster load, capped per request; tokens streamed."""
        t_start = time.time()
        self.controller.observe(self.cluster_load(), time.monotonic())
        server_budget = self.controller.decide()
        load = self.controller.load or 0.0
        used = []
        for job in jobs:
            lat_budget = None
            if job.latency_ms is not None:
                lat_budget = budget_for_latency(job.latency_ms, load, self.profile, self.cfg.policy, job.max_tokens,
                                                self.controller.slowdown)  # fmt: skip
            used.append(apply_caps(server_budget, job.budget_cap, lat_budget))
        # generate takes one sampling setting per call: requests that differ run as consecutive groups
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.temperature, job.top_p), []).append(i)
        group_rows = list(groups.values())
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        future = loop.run_in_executor(self.executor, self._generate_groups, jobs, used, group_rows, loop, queue)

        tokens: list[list[int]] = [[] for _ in jobs]
        texts = [""] * len(jobs)
        finished = [False] * len(jobs)
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            g, step_tokens = item
            out: list[Any] = [None] * len(jobs)
            for row, tok in zip(group_rows[g], step_tokens):
                if finished[row]:
                    continue
                if tok == self.eos_id:
                    finished[row] = True
                    continue
                tokens[row].append(tok)
                if len(tokens[row]) >= jobs[row].max_tokens:
                    finished[row] = True
                text = self.loop_tokenizer.decode(tokens[row], skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > len(texts[row]):
                    out[row] = {"type": "delta", "text": text[len(texts[row]):]}
                    texts[row] = text
            if any(o is not None for o in out):
                yield out
        try:
            results = await future
            self.consecutive_failures = 0
        except Exception as e:
            self.consecutive_failures += 1
            if self.consecutive_failures >= 3:  # the model itself is broken: let Serve replace this replica
                self.failed_reason = f"{self.consecutive_failures} batches failed in a row ({type(e).__name__}: {e})"
            raise
        t_end = time.time()
        # the profile's prediction for what just ran vs what it took: corrects every later prediction on this replica
        ran = [([used[i] for i in rows], max(results[i]["steps"] for i in rows)) for rows in group_rows]
        self.m_slowdown.set(self.controller.observe_batch((t_end - t_start) * 1000, ran))
        final = []
        for i, job in enumerate(jobs):
            r = results[i]
            text = self.loop_tokenizer.decode(tokens[i], skip_special_tokens=True)
            total_ms = (t_end - job.arrival) * 1000
            self.m_budget.observe(used[i])
            self.m_latency.observe(total_ms, tags={"budget": f"{used[i]:.3f}"})
            hit_eos = len(tokens[i]) < job.max_tokens
            final.append({
                "type": "done", "text": text, "finish_reason": "stop" if hit_eos else "length",
                "prompt_tokens": job.prompt_tokens, "completion_tokens": len(tokens[i]),
                "adallava": {
                    "budget": used[i], "budget_server": server_budget, "budget_cap": job.budget_cap,
                    "latency_ms_target": job.latency_ms, "execution_plan": r["execution_plan"], "flops": r["flops"],
                    "latency_ms": {"total": round(total_ms, 2), "queue": round((t_start - job.arrival) * 1000, 2),
                                   "prefill": round(r["prefill_ms"], 2), "decode": round(r["decode_ms"], 2)},
                    "load": self.load_info(), "batch_size": len(jobs), "replica": self.replica_id,
                },
            })  # fmt: skip
        yield final

    def _generate_groups(self, jobs, used, group_rows, loop, queue):
        """Runs in the replica's generate thread: one generate() call per sampling group."""
        torch = self.torch
        results: list[dict | None] = [None] * len(jobs)
        try:
            for g, rows in enumerate(group_rows):
                prompts = [self.processor.apply_chat_template(jobs[i].messages, add_generation_prompt=True)
                           for i in rows]  # fmt: skip
                images = [img for i in rows for img in jobs[i].images]
                enc = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
                temperature, top_p = jobs[rows[0]].temperature, jobs[rows[0]].top_p
                with torch.inference_mode():
                    out = self.model.generate(
                        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        pixel_values=enc.get("pixel_values"), budget=[used[i] for i in rows],
                        max_new_tokens=max(jobs[i].max_tokens for i in rows), do_sample=temperature > 0,
                        temperature=temperature if temperature > 0 else 1.0, top_p=top_p,
                        eos_token_id=self.eos_id, streamer=_QueueStreamer(loop, queue, g),
                        return_dict_in_generate=True,
                    )  # fmt: skip
                for k, i in enumerate(rows):
                    results[i] = {
                        "execution_plan": [round(float(x), 4) for x in out.execution_plan[k]],
                        "flops": float(out.flops[k]),
                        "prefill_ms": out.timings["prefill_s"] * 1000, "decode_ms": out.timings["decode_s"] * 1000,
                        "steps": int(out.num_generated.max()),  # the group decodes until its longest row stops
                    }  # fmt: skip
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)
        return results


# ---------------------------------------------------------------------------------------------------------- ingress

api = FastAPI(title="AdaLLaVA", description="OpenAI-compatible chat completions with per-request compute budgets")


@api.exception_handler(APIError)
async def _api_error(_request: Request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@api.exception_handler(Exception)
async def _unexpected(_request: Request, e: Exception):  # a bug, not the client's fault: say so in the same shape
    logger.exception("unexpected error")
    body = {"error": {"message": f"internal error ({type(e).__name__})", "type": "server_error", "param": None,
                      "code": "internal_error"}}  # fmt: skip
    return JSONResponse(body, status_code=500)


@serve.deployment(name="Ingress", num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, model, cfg: ServeConfig):
        self.model, self.cfg = model, cfg
        self.info: dict | None = None

    async def _model_info(self) -> dict:
        if self.info is None:
            self.info = await self.model.info.remote()
        return self.info

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "adallava"}]}  # fmt: skip

    @api.get("/v1/models/{model_id}")
    async def model(self, model_id: str):
        if model_id != self.cfg.model_name:
            raise APIError(404, f"model {model_id!r} not found; this server serves {self.cfg.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "adallava"}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        t0 = time.time()
        limits = self.cfg.limits
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            raise APIError(413, f"request body is {len(raw)} bytes; at most {limits.max_body_bytes}",
                           code="payload_too_large")  # fmt: skip
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"malformed JSON body: {e}", code="invalid_json") from None
        req = parse_request(obj)
        if req.model is not None and req.model != self.cfg.model_name:
            raise APIError(404, f"model {req.model!r} not found; this server serves {self.cfg.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip
        info = await self._model_info()

        async def loader(url, param):
            return await load_image(url, param, limits)

        parsed: ParsedRequest = await validate_request(req, limits, tuple(info["budget_range"]), loader)
        job = Job(request_id=f"chatcmpl-{uuid.uuid4().hex[:24]}", messages=parsed.messages, images=parsed.images,
                  max_tokens=parsed.max_tokens, temperature=parsed.temperature, top_p=parsed.top_p,
                  budget_cap=parsed.budget_cap, latency_ms=parsed.latency_ms)  # fmt: skip
        created = int(t0)
        if not parsed.stream:
            ev = await self.model.generate.remote(job)
            if ev["type"] == "error":
                return JSONResponse(ev["body"], status_code=ev["status"], headers=ev.get("headers") or {})
            ev["adallava"]["latency_ms"]["server"] = round((time.time() - t0) * 1000, 2)
            return completion_body(job.request_id, created, self.cfg.model_name, ev["text"], ev["finish_reason"],
                                   ev["prompt_tokens"], ev["completion_tokens"], ev["adallava"])  # fmt: skip
        gen = self.model.options(stream=True).generate_stream.remote(job)
        first = await gen.__anext__()
        if first["type"] == "error":
            return JSONResponse(first["body"], status_code=first["status"], headers=first.get("headers") or {})
        return StreamingResponse(self._sse(gen, job.request_id, created, t0), media_type="text/event-stream")

    async def _sse(self, gen, cid: str, created: int, t0: float):
        name = self.cfg.model_name

        def event(body) -> str:
            return f"data: {json.dumps(body)}\n\n"

        yield event(chunk_body(cid, created, name, {"role": "assistant", "content": ""}))
        async for ev in gen:
            if ev["type"] == "delta":
                yield event(chunk_body(cid, created, name, {"content": ev["text"]}))
            elif ev["type"] == "done":
                ev["adallava"]["latency_ms"]["server"] = round((time.time() - t0) * 1000, 2)
                yield event(chunk_body(cid, created, name, {}, ev["finish_reason"], ev["adallava"]))
        yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------------- builder


def build_app(args: dict | None = None):
    """Application builder for `serve run serve.app:build_app` and Serve config files (args: see ServeConfig)."""
    cfg = args if isinstance(args, ServeConfig) else make_config(args)
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


def config_dict(cfg: ServeConfig) -> dict:
    return asdict(cfg)


__all__ = ["ServeConfig", "make_config", "build_app", "LoadBoard", "AdaLlavaModel", "Ingress", "Job"]
