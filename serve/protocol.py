"""The OpenAI chat-completions schema (the subset we serve) plus AdaLLaVA's two request extensions, and the checks
that turn bad input into a 4xx with an OpenAI-style error body instead of a 500.

Everything here is pure (pydantic, PIL, base64): no Ray, no torch, so the unit tier can test it in milliseconds.

Extensions in the request body (both are caps: the server never spends more than the client allows):
- `budget`: the largest fraction of the language model's compute this request may use, in [P/L, 1].
- `latency_ms`: a latency target; mapped to the largest budget predicted to meet it (serve.policy.budget_for_latency).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

# ---------------------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """A client-visible error: HTTP status + OpenAI-style body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------------------- schema

Number = Union[StrictInt, StrictFloat]  # "0.7" (a string) or true (a bool) is not a number: pydantic must not coerce


class _Strict(BaseModel):
    # OpenAI clients send fields we do not use (user, seed, stream_options, ...): ignore unknown keys, never fail.
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImageURL(_Strict):
    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(_Strict):
    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt | None = None
    stream: StrictBool | None = False
    stop: StrictStr | list[StrictStr] | None = None  # accepted for client compatibility; eos ends generation
    # AdaLLaVA extensions (caps)
    budget: Number | None = None
    latency_ms: Number | None = None


def parse_request(obj: Any) -> ChatCompletionRequest:
    """JSON value -> ChatCompletionRequest, or APIError(400) naming the first bad field."""
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(obj)
    except ValidationError as e:
        # Unions report one error per member; the deepest one says what the client got wrong.
        err = max(e.errors(include_url=False), key=lambda x: len(x["loc"]))
        param = _param(err["loc"])
        kind = err["type"]
        if kind == "literal_error" and param.endswith("role"):
            msg = f"{param}: unknown role {err.get('input')!r}; expected one of system, user, assistant"
        elif kind == "union_tag_invalid":
            msg = f"{param}: unknown content part type {_short(err.get('input'))}; expected 'text' or 'image_url'"
        elif kind == "missing":
            msg = f"{param}: field required"
        elif kind in ("int_type", "float_type") and param in ("budget", "latency_ms", "temperature", "top_p"):
            msg = f"{param}: must be a number, got {_short(err.get('input'))}"
        else:
            msg = f"{param}: {err['msg']} (got {_short(err.get('input'))})"
        raise bad_request(msg, param=param, code="missing_field" if kind == "missing" else "invalid_type") from None


_BRANCH_NAMES = ("str", "int", "float", "bool", "none")
_BRANCH_PREFIXES = ("list[", "tagged-union[", "literal[", "function-", "nullable[")


def _param(loc: tuple) -> str:
    """pydantic's error location -> the client's field path: drop union-branch names and tagged-union tags."""
    out, skip_tag = [], False
    for p in loc:
        if skip_tag:
            skip_tag = False
            continue
        if isinstance(p, str) and (p in _BRANCH_NAMES or p.startswith(_BRANCH_PREFIXES)):
            skip_tag = p.startswith("list[tagged-union[")  # next: the index, then the tag
            if skip_tag:
                skip_tag = False
                out.append("__list_of_tagged__")
            continue
        if out and out[-1] == "__list_of_tagged__":
            out[-1] = str(p)  # the index
            skip_tag = True  # the tag follows the index
            continue
        out.append(str(p))
    return ".".join(x for x in out if x != "__list_of_tagged__")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------------------- limits


@dataclass
class Limits:
    """Request limits (all configurable from the Serve config). Defaults follow common servers: TGI's 2 MB payload,
    vLLM's 5 s image-fetch timeout; one image per prompt because LLaVA-1.5 was trained with one."""

    max_body_bytes: int = 8_000_000
    max_image_bytes: int = 4_000_000  # decoded bytes of one image
    max_image_pixels: int = 4096 * 4096  # width * height, checked before decoding the pixels (decompression bombs)
    max_images: int = 1
    max_prompt_chars: int = 32_000
    max_tokens_limit: int = 512
    default_max_tokens: int = 32
    # http(s) image URLs: off by default (SSRF). When on, only these hosts (exact match, or ".example.com" for any
    # subdomain) are fetched, with this timeout and at most max_image_bytes.
    fetch_images: bool = False
    allowed_image_hosts: list[str] = field(default_factory=list)
    fetch_timeout_s: float = 5.0


def check_number(value, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    if value is None:
        return None
    value = float(value)
    if math.isnan(value) or math.isinf(value) or value > hi or value < lo or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise bad_request(f"{name} must be a number in {bracket}{lo:g}, {hi:g}], got {value!r}", param=name)
    return value


@dataclass
class ParsedRequest:
    """What the model deployment needs, validated: chat messages in the processor's chat-template format
    ({"type": "image"} placeholders), the decoded images in order, and the generation settings."""

    messages: list[dict]
    images: list  # PIL.Image.Image, RGB
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    budget_cap: float | None
    latency_ms: float | None


async def validate_request(req: ChatCompletionRequest, limits: Limits, budget_range: tuple[float, float],
                     image_loader) -> ParsedRequest:  # fmt: skip
    """Range checks that need the server's settings; `await image_loader(url, param)` -> PIL image (or APIError).
    temperature defaults to 0 (greedy, as LLaVA evaluates), not OpenAI's 1."""
    lo, hi = budget_range
    budget = check_number(req.budget, "budget", lo, hi)
    latency_ms = check_number(req.latency_ms, "latency_ms", 0.0, 3_600_000.0, lo_open=True)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens_limit:
        raise bad_request(f"{param} must be an integer in [1, {limits.max_tokens_limit}], got {max_tokens}", param=param)
    temperature = check_number(req.temperature, "temperature", 0.0, 2.0)
    top_p = check_number(req.top_p, "top_p", 0.0, 1.0, lo_open=True)
    if req.n not in (None, 1):
        raise bad_request(f"n must be 1 (one choice per request), got {req.n}", param="n")
    if req.messages[-1].role == "assistant":
        raise bad_request("the last message must be from the user or system, not the assistant", param="messages")

    messages, images, n_chars = [], [], 0
    for i, m in enumerate(req.messages):
        if m.content is None or m.content == []:
            raise bad_request(f"messages.{i}.content: a message needs text or an image", param=f"messages.{i}.content")
        if isinstance(m.content, str):
            n_chars += len(m.content)
            messages.append({"role": m.role, "content": [{"type": "text", "text": m.content}]})
            continue
        parts = []
        for j, part in enumerate(m.content):
            where = f"messages.{i}.content.{j}"
            if isinstance(part, TextPart):
                n_chars += len(part.text)
                parts.append({"type": "text", "text": part.text})
            else:
                if m.role != "user":
                    raise bad_request(f"{where}: images are accepted in user messages only", param=where)
                if len(images) >= limits.max_images:
                    raise bad_request(f"{where}: too many images; at most {limits.max_images} per request",
                                      param=where, code="too_many_images")  # fmt: skip
                images.append(await image_loader(part.image_url.url, f"{where}.image_url.url"))
                parts.append({"type": "image"})
        messages.append({"role": m.role, "content": parts})
    if n_chars > limits.max_prompt_chars:
        raise bad_request(f"the messages hold {n_chars} characters; at most {limits.max_prompt_chars}",
                          param="messages", code="prompt_too_long")  # fmt: skip
    return ParsedRequest(
        messages=messages, images=images, max_tokens=max_tokens,
        temperature=0.0 if temperature is None else temperature, top_p=1.0 if top_p is None else top_p,
        stream=bool(req.stream), budget_cap=budget, latency_ms=latency_ms,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- images

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)$",
                       re.DOTALL)  # fmt: skip


def decode_data_url(url: str, param: str, limits: Limits):
    m = _DATA_URL.match(url)
    if m is None:
        raise bad_request(f"{param}: not a valid data: URL (expected data:image/<type>;base64,<data>)", param=param,
                          code="invalid_image_url")  # fmt: skip
    if m["mime"] and not m["mime"].startswith("image/"):
        raise bad_request(f"{param}: data URL media type {m['mime']!r} is not an image", param=param,
                          code="invalid_image")  # fmt: skip
    if not m["b64"]:
        raise bad_request(f"{param}: data URL must be base64-encoded (';base64,')", param=param, code="invalid_image_url")
    data = m["data"].strip()
    # base64 grows 4/3: refuse before decoding what cannot fit
    if len(data) > limits.max_image_bytes * 4 // 3 + 4:
        raise image_too_large(param, limits, f"more than {limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{param}: invalid base64 in data URL ({e})", param=param, code="invalid_base64") from None
    return decode_image_bytes(raw, param, limits)


def image_too_large(param: str, limits: Limits, what: str) -> APIError:
    return bad_request(f"{param}: image too large ({what}; limits: {limits.max_image_bytes} bytes, "
                       f"{limits.max_image_pixels} pixels)", param=param, code="image_too_large")  # fmt: skip


def decode_image_bytes(raw: bytes, param: str, limits: Limits):
    """bytes -> RGB PIL image, or 400 for empty, non-image, corrupt, truncated or too large input."""
    from PIL import Image, UnidentifiedImageError

    if len(raw) > limits.max_image_bytes:
        raise image_too_large(param, limits, f"{len(raw)} bytes")
    if not raw:
        raise bad_request(f"{param}: the image is empty", param=param, code="invalid_image")
    try:
        img = Image.open(io.BytesIO(raw))
        w, h = img.size
        if w * h > limits.max_image_pixels:  # checked from the header, before the pixels are decoded
            raise image_too_large(param, limits, f"{w}x{h} = {w * h} pixels")
        img.load()  # truncated / corrupt data fails here, not later inside the model
        return img.convert("RGB")
    except APIError:
        raise
    except UnidentifiedImageError:
        raise bad_request(f"{param}: the data is not an image PIL can read", param=param, code="invalid_image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise bad_request(f"{param}: corrupt or truncated image ({e})", param=param, code="invalid_image") from None


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Exact host match, or a ".example.com" entry for the domain and its subdomains. Case-insensitive."""
    host = (host or "").lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("."):
            if host == entry[1:] or host.endswith(entry):
                return True
        elif host == entry:
            return True
    return False


def check_image_url(url: str, param: str, limits: Limits) -> str:
    """Decide whether an http(s) URL may be fetched; returns the URL or raises 400 naming why not."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise bad_request(f"{param}: not a valid URL", param=param, code="invalid_image_url") from None
    if parts.scheme not in ("http", "https"):
        raise bad_request(f"{param}: URL scheme {parts.scheme!r} is not allowed; send a base64 data: URL"
                          + (" or an http(s) URL" if limits.fetch_images else ""), param=param,
                          code="url_not_allowed")  # fmt: skip
    if not limits.fetch_images:
        raise bad_request(f"{param}: fetching image URLs is off on this server; send a base64 data: URL", param=param,
                          code="url_not_allowed")  # fmt: skip
    if parts.username or parts.password:
        raise bad_request(f"{param}: URLs with credentials are not allowed", param=param, code="url_not_allowed")
    if not host_allowed(parts.hostname or "", limits.allowed_image_hosts):
        raise bad_request(f"{param}: host {parts.hostname!r} is not in the server's allow-list", param=param,
                          code="url_not_allowed")  # fmt: skip
    return url


async def fetch_image(url: str, param: str, limits: Limits):
    """GET an allow-listed http(s) image with a timeout and a byte limit (stops reading past it)."""
    import httpx

    check_image_url(url, param, limits)
    try:
        async with httpx.AsyncClient(timeout=limits.fetch_timeout_s, follow_redirects=False, trust_env=False) as c:
            async with c.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise bad_request(f"{param}: fetching the image returned HTTP {resp.status_code}", param=param,
                                      code="image_fetch_failed")  # fmt: skip
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_image_bytes:
                    raise image_too_large(param, limits, f"{declared} bytes declared")
                buf = bytearray()
                async for chunk in resp.aiter_bytes():
                    buf += chunk
                    if len(buf) > limits.max_image_bytes:
                        raise image_too_large(param, limits, f"more than {limits.max_image_bytes} bytes")
    except httpx.TimeoutException:
        raise bad_request(f"{param}: fetching the image timed out after {limits.fetch_timeout_s:g} s", param=param,
                          code="image_fetch_failed") from None  # fmt: skip
    except httpx.HTTPError as e:
        raise bad_request(f"{param}: fetching the image failed ({type(e).__name__})", param=param,
                          code="image_fetch_failed") from None  # fmt: skip
    return decode_image_bytes(bytes(buf), param, limits)


async def load_image(url: str, param: str, limits: Limits):
    if url.startswith("data:"):
        return decode_data_url(url, param, limits)
    return await fetch_image(url, param, limits)


# ---------------------------------------------------------------------------------------------------------- responses


def completion_body(cid: str, created: int, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int, adallava: dict) -> dict:  # fmt: skip
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "adallava": adallava,
    }  # fmt: skip


def chunk_body(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               adallava: dict | None = None) -> dict:  # fmt: skip
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}  # fmt: skip
    if adallava is not None:
        body["adallava"] = adallava
    return body
