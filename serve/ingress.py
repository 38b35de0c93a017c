"""The HTTP edge: an OpenAI-compatible FastAPI app in front of the model deployment.

`OpenAIServer` holds the request handling (API key, body read with its size limit, JSON, validation, images decoded in
threads, the call to the model and the response or the server-sent events) against a `backend` with four coroutines
(info, generate, stream, ping), so it runs without Ray in unit tests; `create_app(server)` builds the FastAPI app
(routes, CORS, error bodies); the `Ingress` deployment builds one per replica at start (`__serve_build_asgi_app__`, where
more routes can be mounted; Serve keeps it as `self.app`), and talks to the model through its DeploymentHandle.

Admission at the edge, in `chat_completions`, after the cheap checks (body, JSON, schema, structure: check_request)
and before any image is decoded or any model replica is touched:
  1. the deadline: arrival + min(policy.slo_ms, latency_ms); a latency_ms below what the model reaches alone at the
     floor budget is a 400 naming the achievable range;
  2. the bound: at most replicas * (max_batch_size + max_queued_requests) requests in flight (sent to the model, not
     finished), counted exactly here; beyond it 429 "overloaded" + Retry-After (whatever policy.reject says);
  3. the prediction (policy.reject=True): serve.policy.admission over this ingress's in-flight requests split over
     the replicas, the replica profile from info() and the contention factor piggybacked on responses (no
     per-request actor call); a request whose deadline even the floor cannot meet gets 429 "overloaded" +
     Retry-After at once, its image never decoded.
The handle's own bound (the model deployment's max_queued_requests, max_replicas * (max_batch_size +
max_queued_requests): never below what this count admits) raises BackPressureError: 429 "overloaded" too.
Every request counts in `offered` (admitted or refused), stamped on each job for the autoscaler.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from serve.config import ServeConfig
from serve.playground import mount_playground
from serve.policy import LatencyProfile, LengthModel, achievable_ms, admission, drain_ms, plan_deadline, share
from serve.protocol import (
    APIError, ParsedRequest, bad_request, check_request, chunk_body, completion_body, decode_images, error_body,
    load_image, parse_json, parse_request, usage_chunk,
)  # fmt: skip
from serve.replica import Job

logger = logging.getLogger("ray.serve")


class SafeJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a client's lone surrogate echoed in an error message can never
    make the response itself fail to encode (a 500)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _sse(body) -> str:
    return f"data: {json.dumps(body, ensure_ascii=True)}\n\n"


class HandleBackend:
    """The model deployment behind a DeploymentHandle."""

    def __init__(self, handle):
        self.handle = handle

    async def info(self) -> dict:
        return await self.handle.info.remote()

    async def generate(self, job: Job) -> dict:
        return await self.handle.generate.remote(job)

    def stream(self, job: Job):
        return self.handle.options(stream=True).generate_stream.remote(job)

    async def ping(self):
        return await self.handle.ping.remote()


class OpenAIServer:
    def __init__(self, backend, cfg: ServeConfig):
        self.backend, self.cfg = backend, cfg
        self.api_key = cfg.resolved_api_key()
        self.info: dict | None = None
        self.profile: LatencyProfile | None = None
        self._decode_slots: asyncio.Semaphore | None = None
        # admission state, exact and local: requests sent to the model and not finished (id -> (predicted tokens,
        # ms sent, deadline in ms), in send order), the live replicas and the contention factor (both piggybacked on
        # responses), offered requests, and the lengths of the completions seen here (serve.policy.LengthModel)
        self.inflight: dict[str, tuple[int, float, float]] = {}
        self.replicas, self.kappa, self.offered = 1, 1.0, 0
        self.lengths = LengthModel(cfg.policy)

    # ---- edge checks
    def check_api_key(self, request: Request):
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'",
                           code="invalid_api_key")  # fmt: skip

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit: the declared Content-Length first, then the
        bytes actually read (a chunked or lying client cannot make the ingress buffer more than the limit)."""
        limit = self.cfg.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or len(declared) > 18 or int(declared) > limit):
            raise APIError(413, f"request body is {declared[:24]} bytes; at most {limit}", code="payload_too_large")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise APIError(413, f"request body is more than {limit} bytes", code="payload_too_large")
        return bytes(buf)

    async def model_info(self) -> dict:
        if self.info is None:
            info = await self.backend.info()
            self.profile = LatencyProfile.from_dict(info["profile"])
            self._learn(info)
            self.info = info
        return self.info

    def _learn(self, ada: dict):
        """The replicas' view, piggybacked on info() and on every response: live replicas, contention factor."""
        load = ada.get("load") or {}
        if isinstance(load.get("replicas"), int) and load["replicas"] >= 1:
            self.replicas = load["replicas"]
        if isinstance(load.get("contention"), (int, float)) and load["contention"] > 0:
            self.kappa = float(load["contention"])

    def admit(self, rid: str, parsed: ParsedRequest, t0: float) -> float:
        """Edge admission (see the module docstring): the request's deadline (ms after arrival), or an APIError. On
        success the request counts as in flight (the caller releases it)."""
        policy, p = self.cfg.policy, self.profile
        inflight = list(self.inflight.values())
        # the achievable range at the predicted length (max_tokens until a completion has been seen); admission below
        # predicts one token for a request with nothing ahead of it until then (serve.policy.LengthModel)
        lo, hi = achievable_ms(p, policy, self.lengths.expect(parsed.max_tokens))
        if parsed.latency_ms is not None and parsed.latency_ms < lo:
            raise bad_request(f"latency_ms={parsed.latency_ms:g} is below what this model can reach for "
                              f"max_tokens={parsed.max_tokens}: the achievable range is {lo:.0f} ms (budget "
                              f"{policy.floor:g}, alone) to {hi:.0f} ms (budget {policy.ceiling:g}, alone) and more "
                              f"under load", param="latency_ms", code="latency_unreachable")  # fmt: skip
        deadline_ms = min(policy.slo_ms, parsed.latency_ms if parsed.latency_ms is not None else math.inf)
        now = time.time() * 1000
        bound = self.replicas * (self.cfg.max_batch_size + self.cfg.max_queued_requests)
        if len(inflight) >= bound:
            retry = max(1, math.ceil(drain_ms(p, policy, now, inflight, self.replicas, self.kappa) / 1000))
            raise overloaded(f"overloaded: {len(inflight)} requests in flight, the bound is {bound} "
                             f"({self.replicas} replica(s) x (max_batch_size {self.cfg.max_batch_size} + "
                             f"max_queued_requests {self.cfg.max_queued_requests})); retry after {retry} s", retry)
        tokens = self.lengths.expect(parsed.max_tokens, alone=not share(inflight, self.replicas))
        planned = plan_deadline(t0 * 1000, deadline_ms, policy.headroom)  # = the deadline with headroom 0
        retry = admission(p, policy, now, planned, inflight, self.replicas, tokens, self.kappa)
        if retry is not None:
            raise overloaded(f"overloaded: even the lowest budget ({policy.floor:g}) cannot meet this request's "
                             f"{deadline_ms:g} ms deadline behind the {len(inflight)} requests in flight; retry after "
                             f"{retry} s", retry)  # fmt: skip
        self.inflight[rid] = (tokens, now, planned)
        return deadline_ms

    async def _load_image(self, url: str, param: str):
        if self._decode_slots is None:
            self._decode_slots = asyncio.Semaphore(max(1, self.cfg.image_decode_concurrency))
        async with self._decode_slots:  # at most this many decoded images in flight: memory stays bounded
            return await load_image(url, param, self.cfg.limits)

    # ---- routes
    async def health(self):
        try:
            replica = await asyncio.wait_for(self.backend.ping(), timeout=self.cfg.health_timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure to answer means no replica can serve now
            reason = "timeout" if isinstance(e, (asyncio.TimeoutError, TimeoutError)) else type(e).__name__
            return SafeJSONResponse({"status": "unhealthy", "reason": f"no model replica answered ({reason})"}, 503)
        return {"status": "ok", "replica": replica}

    def models(self, request: Request):
        self.check_api_key(request)
        return {"object": "list", "data": [self._model_card()]}

    def model(self, request: Request, model_id: str):
        self.check_api_key(request)
        if model_id != self.cfg.model_name:
            raise self._not_found(model_id)
        return self._model_card()

    # issue 14 (playground): what a client needs to draw budgets and plans
    INFO_KEYS = ("model_name", "budget_range", "grid", "num_layers", "num_prefix_layers", "granularity",
                 "token_selection")

    async def adallava_info(self, request: Request):
        self.check_api_key(request)
        info = await self.model_info()
        return {k: info[k] for k in self.INFO_KEYS}

    def _model_card(self) -> dict:
        card = {"id": self.cfg.model_name, "object": "model", "created": 0, "owned_by": "adallava"}
        if self.info is not None:
            card["budget_range"] = self.info.get("budget_range")
            card["max_model_len"] = self.info.get("max_context")
        return card

    def _not_found(self, model_id) -> APIError:
        shown = model_id if isinstance(model_id, str) and len(model_id) <= 100 else str(model_id)[:100] + "..."
        return APIError(404, f"model {ascii(shown)} not found; this server serves {self.cfg.model_name!r}",
                        param="model", code="model_not_found")  # fmt: skip

    async def chat_completions(self, request: Request):
        t0 = time.time()
        self.check_api_key(request)
        req = parse_request(parse_json(await self.read_body(request)))
        if req.model is not None and req.model != self.cfg.model_name:
            raise self._not_found(req.model)
        info = await self.model_info()
        parsed: ParsedRequest = check_request(req, self.cfg.limits, tuple(info["budget_range"]))
        self.offered += 1
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        deadline_ms = self.admit(rid, parsed, t0)  # before any image is decoded
        handed_over = False  # a stream releases its in-flight slot when it ends
        try:
            await decode_images(parsed, self._load_image)
            job = Job(request_id=rid, messages=parsed.messages, images=parsed.images, max_tokens=parsed.max_tokens,
                      temperature=parsed.temperature, top_p=parsed.top_p, budget_cap=parsed.budget_cap,
                      latency_ms=parsed.latency_ms, stop=parsed.stop, seed=parsed.seed, stream=parsed.stream,
                      t_ingress=t0, attention=parsed.attention, deadline_ms=deadline_ms,
                      offered=self.offered)  # fmt: skip
            if parsed.user:
                logger.info(f"{job.request_id} user={ascii(parsed.user)}")
            created = int(t0)
            if not parsed.stream:
                try:
                    ev = await self.backend.generate(job)
                except BackPressureError as e:
                    raise overloaded(f"overloaded: the model's queue is full ({e}); retry", _retry(e)) from None
                except Exception as e:  # noqa: BLE001 - the model deployment failed, not the client
                    logger.exception("model call failed")
                    return SafeJSONResponse(error_body(f"the model deployment failed ({type(e).__name__}); retry"), 503)
                if ev["type"] == "error":
                    return SafeJSONResponse(ev["body"], status_code=ev["status"], headers=ev.get("headers") or {})
                self._learn(ev["adallava"])
                self.lengths.observe(ev["adallava"]["engine_steps"])  # EOS included, as the replica
                ev["adallava"]["latency_ms"]["server"] = round((time.time() - t0) * 1000, 2)
                return SafeJSONResponse(completion_body(job.request_id, created, self.cfg.model_name, ev["text"],
                                                        ev["finish_reason"], ev["prompt_tokens"],
                                                        ev["completion_tokens"], ev["adallava"]))  # fmt: skip
            gen = self.backend.stream(job)
            try:  # the status is sent with the first event: a refusal at its turn (429) must come before it
                first = await gen.__anext__()
                while first["type"] == "admitted":
                    first = await gen.__anext__()
            except BackPressureError as e:
                raise overloaded(f"overloaded: the model's queue is full ({e}); retry", _retry(e)) from None
            except Exception as e:  # noqa: BLE001
                logger.exception("model call failed")
                return SafeJSONResponse(error_body(f"the model deployment failed ({type(e).__name__}); retry"), 503)
            if first["type"] == "error":
                return SafeJSONResponse(first["body"], status_code=first["status"], headers=first.get("headers") or {})
            handed_over = True
            return StreamingResponse(self._events(_chain(first, gen), job.request_id, created, t0, parsed.include_usage),
                                     media_type="text/event-stream")  # fmt: skip
        finally:
            if not handed_over:
                self.inflight.pop(rid, None)

    async def _events(self, gen, cid: str, created: int, t0: float, include_usage: bool):
        """Server-sent events. An error after the stream began cannot change the status code any more: it goes out
        as an error event (OpenAI's {"error": ...} shape), then [DONE], so a client never hangs on a cut stream."""
        name = self.cfg.model_name
        try:
            yield _sse(chunk_body(cid, created, name, {"role": "assistant", "content": ""}))
            async for ev in gen:
                if ev["type"] == "delta":
                    yield _sse(chunk_body(cid, created, name, {"content": ev["text"]}))
                elif ev["type"] == "done":
                    self._learn(ev["adallava"])
                    self.lengths.observe(ev["adallava"]["engine_steps"])  # EOS included, as the replica
                    ev["adallava"]["latency_ms"]["server"] = round((time.time() - t0) * 1000, 2)
                    yield _sse(chunk_body(cid, created, name, {}, ev["finish_reason"], ev["adallava"]))
                    if include_usage:
                        yield _sse(usage_chunk(cid, created, name, ev["prompt_tokens"], ev["completion_tokens"]))
                elif ev["type"] == "error":
                    yield _sse(ev["body"])
                    break
        except Exception as e:  # noqa: BLE001
            logger.exception("stream failed")
            yield _sse(error_body(f"the stream failed ({type(e).__name__})"))
        finally:
            self.inflight.pop(cid, None)
        yield "data: [DONE]\n\n"


async def _chain(first, gen):
    yield first
    async for ev in gen:
        yield ev


def overloaded(message: str, retry_s: int) -> APIError:
    return APIError(429, message, code="overloaded", type="rate_limit_error", headers={"Retry-After": str(retry_s)})


def _retry(e: BackPressureError) -> int:
    return max(1, math.ceil(e.retry_after_s or 1))


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI app for one OpenAIServer: routes, CORS (off unless origins are configured), error bodies."""
    cfg = server.cfg
    app = FastAPI(title="AdaLLaVA", description="OpenAI-compatible chat completions with per-request compute budgets")
    app.state.server = server
    if cfg.cors_allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_allow_origins),
                           allow_methods=list(cfg.cors_allow_methods), allow_headers=list(cfg.cors_allow_headers),
                           allow_credentials=cfg.cors_allow_credentials)  # fmt: skip

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError):
        return SafeJSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, e: Exception):  # a bug, not the client's fault: say so in the same shape
        logger.exception("unexpected error")
        return SafeJSONResponse(error_body(f"internal error ({type(e).__name__})"), status_code=500)

    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id}", server.model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/adallava/info", server.adallava_info, methods=["GET"])
    # issue 14: the web page at / and /playground (static files, same origin as the API). Open without the API key:
    # the page holds no secret, and every API call it makes sends the key the user typed.
    mount_playground(app)
    return app


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0})  # bounds: serve/app.py
@serve.ingress()
class Ingress:
    def __init__(self, model, cfg: ServeConfig):
        self.server = OpenAIServer(HandleBackend(model), cfg)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve once per replica after __init__; the app is then Serve's `self.app` (read-only property)
        and `self.server`'s routes; mount more routes on it here, before returning it."""
        return create_app(self.server)


__all__ = ["OpenAIServer", "HandleBackend", "create_app", "Ingress", "SafeJSONResponse"]
