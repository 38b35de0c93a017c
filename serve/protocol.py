"""The OpenAI chat-completions schema (the subset we serve) plus AdaLLaVA's two request extensions, and the checks
that turn bad input into a 4xx with an OpenAI-style error body instead of a 500.

Everything here is pure (pydantic, PIL, base64): no Ray, no torch, so the unit tier can test it in milliseconds.

No parameter is silently ignored: every field of OpenAI's chat-completions request is either honoured (model,
messages, max_tokens, max_completion_tokens, temperature, top_p, n=1, stream, stream_options.include_usage, stop,
seed, user) or refused with a 400 that names it when it asks for something this server does not do (tools,
response_format other than text, logprobs, n > 1, penalties, logit_bias, audio, ...); a field OpenAI does not define is
refused as unrecognized, as OpenAI does. Hostile input (JSON nested thousands deep, integers of thousands of digits,
lone UTF-16 surrogates, extreme image shapes, anything Pillow raises on) is a 4xx, never a 500.

Extensions in the request body (both are caps: the server never spends more than the client allows):
- `budget`: the largest fraction of the language model's compute this request may use, in [P/L, 1].
- `latency_ms`: a latency target; it tightens the request's deadline (min with the server's SLO, serve/policy.py).
And one opt-in object (the playground's "compare budgets" view):
- `adallava: {"attention": true}`: the response's `adallava` object also carries the latency token's attention over
  the image (adallava.attention); needs exactly one image; unknown keys in this object are refused by name.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
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
    # Unknown keys are refused by name (parse_request words the error): nothing a client sends is silently dropped.
    model_config = ConfigDict(extra="forbid", strict=True)


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
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart] | None = None
    refusal: None = None  # an assistant message's refusal: only null is meaningful to send back


class StreamOptions(_Strict):
    include_usage: StrictBool | None = None


# OpenAI request fields this server does not implement, with the values that ask for nothing (their defaults):
# sent with one of those they are accepted, with anything else they are refused by name.
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,), "functions": (None, []), "function_call": (None, "none"), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,), "verbosity": (None,),
    "web_search_options": (None,), "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default"),
    "prompt_cache_key": (None,), "prompt_cache_retention": (None,), "best_of": (None, 1),
    "response_format": (None, {"type": "text"}),  # json_object / json_schema would need guided decoding
}  # fmt: skip


# ---- issue 14 (playground): opt-in extras of the response's `adallava` object (our own namespace: a misspelt key is
# an error naming it and what the object accepts).
class AdaLlavaOptions(_Strict):
    attention: StrictBool = False


class ChatCompletionRequest(_Strict):
    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    user: StrictStr | None = None  # an end-user id: logged with the request id, nothing else
    safety_identifier: StrictStr | None = None  # the same, newer name
    # AdaLLaVA extensions (caps)
    budget: Number | None = None
    latency_ms: Number | None = None
    adallava: AdaLlavaOptions | None = None  # issue 14 (playground)


def parse_json(raw: bytes) -> Any:
    """Request body -> JSON value, or 400: malformed JSON, bad UTF-8, integers beyond Python's digit limit, nesting
    deeper than the parser's recursion limit (each a ValueError or RecursionError inside json)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise bad_request("malformed JSON body: nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, "Exceeds the limit (4300 digits)"
        raise bad_request(f"malformed JSON body: {_short(str(e), 200)}", code="invalid_json") from None


def parse_request(obj: Any) -> ChatCompletionRequest:
    """JSON value -> ChatCompletionRequest, or APIError(400) naming the first bad field."""
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    obj = dict(obj)
    for name in [k for k in obj if k in UNSUPPORTED_FIELDS]:
        value = obj.pop(name)
        if not any(type(value) is type(ok) and value == ok for ok in UNSUPPORTED_FIELDS[name]):
            raise bad_request(f"{name}: not supported by this server (got {_short(value)}); leave it out",
                              param=name, code="unsupported_parameter")  # fmt: skip
    try:
        return ChatCompletionRequest.model_validate(obj)
    except RecursionError:
        raise bad_request("the request is nested too deeply", code="invalid_json") from None
    except ValidationError as e:
        # Unions report one error per member; the deepest one says what the client got wrong.
        err = max(e.errors(include_url=False), key=lambda x: len(x["loc"]))
        param = _param(err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden" and param.startswith("adallava."):  # issue 14
            raise bad_request(f"{param}: unknown field; the adallava object accepts: "
                              f"{', '.join(AdaLlavaOptions.model_fields)}", param=param,
                              code="unknown_field") from None  # fmt: skip
        if kind == "extra_forbidden":
            if "." not in param:
                msg = f"unrecognized request argument supplied: {param}"
            else:
                msg = f"{param}: not supported by this server"
            raise bad_request(msg, param=param, code="unsupported_parameter") from None
        if kind == "literal_error" and param.endswith("role"):
            msg = (f"{param}: unknown role {_short(err.get('input'))}; expected one of system, developer, user, "
                   f"assistant (tool and function messages are not supported)")  # fmt: skip
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
    """A bounded, printable (ASCII-escaped) rendering of a client's value for an error message."""
    try:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
            return f"an integer of {len(str(abs(value)))} digits"
        text = ascii(value)
    except (RecursionError, ValueError):
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------------------- limits


@dataclass
class Limits:
    """Request limits (all configurable from the Serve config). Defaults follow common servers: TGI's 2 MB payload,
    vLLM's 5 s image-fetch timeout; one image per prompt because LLaVA-1.5 was trained with one."""

    max_body_bytes: int = 8_000_000
    max_image_bytes: int = 4_000_000  # decoded bytes of one image
    max_image_pixels: int = 4096 * 4096  # width * height, checked before decoding the pixels (decompression bombs)
    # longer side / shorter side, from the header: the processor resizes the shorter side to its input size (CLIP 336,
    # tiny 32) and keeps the aspect, so a 1 x 16M image within the pixel cap would become gigabytes; 20:1 is wider
    # than any panorama a VQA model is asked about
    max_image_aspect: float = 20.0
    image_formats: list[str] = field(default_factory=lambda: ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
    max_images: int = 1
    max_messages: int = 256
    max_parts: int = 512  # content parts over all messages
    max_stop: int = 4  # stop sequences (OpenAI's limit)
    max_stop_chars: int = 256
    max_prompt_chars: int = 32_000
    max_tokens_limit: int = 512
    default_max_tokens: int = 32
    # http(s) image URLs: off by default (SSRF). When on, only these hosts (exact match, or ".example.com" for any
    # subdomain) are fetched, with this timeout and at most max_image_bytes.
    fetch_images: bool = False
    allowed_image_hosts: list[str] = field(default_factory=list)
    fetch_timeout_s: float = 5.0


def check_number(value, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    """A JSON number in [lo, hi] (or (lo, hi]) -> float, or 400 naming the range. Integers are compared as integers
    first: float() of a 400-digit integer overflows."""
    if value is None:
        return None
    bracket = "(" if lo_open else "["
    out_of_range = bad_request(f"{name} must be a number in {bracket}{lo:g}, {hi:g}], got {_short(value)}", param=name)
    if isinstance(value, int) and (value > hi or value < lo):
        raise out_of_range
    value = float(value)
    if math.isnan(value) or math.isinf(value) or value > hi or value < lo or (lo_open and value == lo):
        raise out_of_range
    return value


def check_text(text: str, param: str) -> str:
    """Text the tokenizer can encode: a lone UTF-16 surrogate (valid JSON, not valid UTF-8) is a 400 here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{param}: not valid Unicode text ({e.reason} at position {e.start})", param=param,
                          code="invalid_unicode") from None  # fmt: skip
    return text


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
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    include_usage: bool = False
    user: str | None = None
    attention: bool = False  # issue 14: return the latency token's attention over the image
    image_parts: list = field(default_factory=list)  # (url, param) per image, in order, until decode_images


async def validate_request(req: ChatCompletionRequest, limits: Limits, budget_range: tuple[float, float],
                           image_loader) -> ParsedRequest:  # fmt: skip
    """check_request, then the images decoded (the ingress admits a request between the two)."""
    return await decode_images(check_request(req, limits, budget_range), image_loader)


async def decode_images(parsed: ParsedRequest, image_loader) -> ParsedRequest:
    """`await image_loader(url, param)` -> PIL image (or APIError), for each image part in order."""
    parsed.images = [await image_loader(url, where) for url, where in parsed.image_parts]
    return parsed


def check_request(req: ChatCompletionRequest, limits: Limits, budget_range: tuple[float, float]) -> ParsedRequest:
    """Range and structure checks that need the server's settings, and nothing decoded: cheap, so the ingress can
    refuse a request (admission) before paying for its images. temperature defaults to 0 (greedy, as LLaVA
    evaluates), not OpenAI's 1."""
    lo, hi = budget_range
    budget = check_number(req.budget, "budget", lo, hi)
    latency_ms = check_number(req.latency_ms, "latency_ms", 0.0, 3_600_000.0, lo_open=True)
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise bad_request("max_tokens and max_completion_tokens differ; send one (max_completion_tokens is the newer "
                          "name)", param="max_tokens")  # fmt: skip
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens_limit:
        raise bad_request(f"{param} must be an integer in [1, {limits.max_tokens_limit}], got {_short(max_tokens)}",
                          param=param)  # fmt: skip
    temperature = check_number(req.temperature, "temperature", 0.0, 2.0)
    top_p = check_number(req.top_p, "top_p", 0.0, 1.0, lo_open=True)
    if req.n not in (None, 1):
        raise bad_request(f"n must be 1 (one choice per request), got {_short(req.n)}", param="n")
    if req.seed is not None and not -(2**63) <= req.seed < 2**64:
        raise bad_request(f"seed must be a 64-bit integer, got {_short(req.seed)}", param="seed")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > limits.max_stop:
        raise bad_request(f"stop: at most {limits.max_stop} sequences, got {len(stops)}", param="stop")
    for i, s in enumerate(stops):
        if not 1 <= len(s) <= limits.max_stop_chars:
            raise bad_request(f"stop.{i}: a stop sequence needs 1 to {limits.max_stop_chars} characters", param="stop")
        check_text(s, "stop")
    for name in ("user", "safety_identifier"):
        value = getattr(req, name)
        if value is not None and (len(value) > 256 or not check_text(value, name)):
            raise bad_request(f"{name}: at most 256 characters", param=name)
    if len(req.messages) > limits.max_messages:
        raise bad_request(f"messages: at most {limits.max_messages} messages, got {len(req.messages)}",
                          param="messages", code="too_many_messages")  # fmt: skip
    n_parts = sum(len(m.content) if isinstance(m.content, list) else 1 for m in req.messages)
    if n_parts > limits.max_parts:
        raise bad_request(f"messages: at most {limits.max_parts} content parts, got {n_parts}", param="messages",
                          code="too_many_messages")  # fmt: skip
    if req.messages[-1].role == "assistant":
        raise bad_request("the last message must be from the user or system, not the assistant", param="messages")

    # cheap checks over every message first (characters, image count, URL shape), images decoded last
    messages, n_chars, image_parts = [], 0, []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for the system message
        if m.content is None or m.content == []:
            raise bad_request(f"messages.{i}.content: a message needs text or an image", param=f"messages.{i}.content")
        if isinstance(m.content, str):
            n_chars += len(check_text(m.content, f"messages.{i}.content"))
            messages.append({"role": role, "content": [{"type": "text", "text": m.content}]})
            continue
        parts = []
        for j, part in enumerate(m.content):
            where = f"messages.{i}.content.{j}"
            if isinstance(part, TextPart):
                n_chars += len(check_text(part.text, f"{where}.text"))
                parts.append({"type": "text", "text": part.text})
            else:
                if m.role != "user":
                    raise bad_request(f"{where}: images are accepted in user messages only", param=where)
                if part.image_url.detail not in (None, "auto"):
                    raise bad_request(f"{where}.image_url.detail: {part.image_url.detail!r} is not supported; the "
                                      "vision tower sees every image at its one input size ('auto')",
                                      param=f"{where}.image_url.detail", code="unsupported_parameter")  # fmt: skip
                if len(image_parts) >= limits.max_images:
                    raise bad_request(f"{where}: too many images; at most {limits.max_images} per request",
                                      param=where, code="too_many_images")  # fmt: skip
                image_parts.append((part.image_url.url, f"{where}.image_url.url"))
                parts.append({"type": "image"})
        messages.append({"role": role, "content": parts})
    if n_chars > limits.max_prompt_chars:
        raise bad_request(f"the messages hold {n_chars} characters; at most {limits.max_prompt_chars}",
                          param="messages", code="prompt_too_long")  # fmt: skip
    attention = bool(req.adallava and req.adallava.attention)  # issue 14
    if attention and len(image_parts) != 1:
        raise bad_request(f"adallava.attention: the latency token's attention is over one image; the request has "
                          f"{len(image_parts) or 'none'}", param="adallava.attention")  # fmt: skip
    return ParsedRequest(
        messages=messages, images=[], max_tokens=max_tokens,
        temperature=0.0 if temperature is None else temperature, top_p=1.0 if top_p is None else top_p,
        stream=bool(req.stream), budget_cap=budget, latency_ms=latency_ms, stop=stops, seed=req.seed,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        user=req.user or req.safety_identifier, attention=attention, image_parts=image_parts,
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
    """bytes -> RGB PIL image, or 400 for empty, non-image, corrupt, truncated, too large or too elongated input.
    Only the formats in limits.image_formats are opened (not every Pillow plugin), and every exception Pillow raises
    on bad data (its fuzzers list MemoryError, OverflowError, NotImplementedError beside OSError and ValueError) is
    the client's 400. CPU-bound: the ingress runs it in a thread."""
    from PIL import Image, UnidentifiedImageError

    if len(raw) > limits.max_image_bytes:
        raise image_too_large(param, limits, f"{len(raw)} bytes")
    if not raw:
        raise bad_request(f"{param}: the image is empty", param=param, code="invalid_image")
    try:
        img = Image.open(io.BytesIO(raw), formats=list(limits.image_formats))
        w, h = img.size
        if w * h > limits.max_image_pixels:  # checked from the header, before the pixels are decoded
            raise image_too_large(param, limits, f"{w}x{h} = {w * h} pixels")
        if min(w, h) < 1 or max(w, h) > limits.max_image_aspect * min(w, h):
            raise bad_request(f"{param}: image shape {w}x{h} is too elongated (aspect ratio at most "
                              f"{limits.max_image_aspect:g}:1)", param=param, code="image_aspect_ratio")  # fmt: skip
        img.load()  # truncated / corrupt data fails here, not later inside the model
        return img.convert("RGB")
    except APIError:
        raise
    except UnidentifiedImageError:
        raise bad_request(f"{param}: the data is not an image in a format this server reads "
                          f"({', '.join(limits.image_formats)})", param=param, code="invalid_image") from None
    except Image.DecompressionBombError as e:
        raise image_too_large(param, limits, str(e)[:120]) from None
    except Exception as e:  # noqa: BLE001 - whatever Pillow raises on hostile bytes is the client's error
        raise bad_request(f"{param}: corrupt or truncated image ({type(e).__name__}: {_short(str(e), 120)})",
                          param=param, code="invalid_image") from None  # fmt: skip


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
        async with asyncio.timeout(limits.fetch_timeout_s), httpx.AsyncClient(
            timeout=limits.fetch_timeout_s, follow_redirects=False, trust_env=False, headers={"Accept-Encoding": "identity"}
        ) as c:  # the timeout bounds the whole fetch, not each read (a trickling host cannot hold a slot)
            async with c.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise bad_request(f"{param}: fetching the image returned HTTP {resp.status_code}", param=param,
                                      code="image_fetch_failed")  # fmt: skip
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_image_bytes:
                    raise image_too_large(param, limits, f"{declared} bytes declared")
                buf = bytearray()
                async for chunk in resp.aiter_raw():  # raw: a gzip body cannot overshoot the cap
                    buf += chunk
                    if len(buf) > limits.max_image_bytes:
                        raise image_too_large(param, limits, f"more than {limits.max_image_bytes} bytes")
    except (httpx.TimeoutException, TimeoutError):
        raise bad_request(f"{param}: fetching the image timed out after {limits.fetch_timeout_s:g} s", param=param,
                          code="image_fetch_failed") from None  # fmt: skip
    except httpx.HTTPError as e:
        raise bad_request(f"{param}: fetching the image failed ({type(e).__name__})", param=param,
                          code="image_fetch_failed") from None  # fmt: skip
    return await asyncio.to_thread(decode_image_bytes, bytes(buf), param, limits)


async def load_image(url: str, param: str, limits: Limits):
    """A data: URL decoded, or an allow-listed http(s) URL fetched, in a worker thread (the event loop stays free)."""
    if url.startswith("data:"):
        return await asyncio.to_thread(decode_data_url, url, param, limits)
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


def usage_chunk(cid: str, created: int, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """stream_options.include_usage: the last chunk before [DONE], with no choices and the request's usage."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}  # fmt: skip


def error_body(message: str, type: str = "server_error", code: str | None = "internal_error", param=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------------------- stop


class StopText:
    """Stop sequences over a growing text (the detokenised answer so far), matched across token boundaries.

    update(text) returns (the text that is safe to send now, stopped). Text is held back while it could still be the
    start of a stop sequence (the longest one's length - 1 characters) or ends in an incomplete UTF-8 character
    (U+FFFD from a partial byte sequence); at a match the answer ends right before the stop sequence (OpenAI's
    semantics: the stop sequence is not returned)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.sent = 0  # characters already released
        self.text = ""  # the answer as released so far (final when stopped)
        self.stopped = False

    def update(self, text: str, final: bool = False) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        start = max(self.sent - self.hold, 0)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            delta = text[self.sent : cut] if cut > self.sent else ""
            self.text, self.sent, self.stopped = text[:cut], max(cut, self.sent), True
            return delta, True
        safe = len(text) if final else len(text) - self.hold
        if not final:
            while safe > self.sent and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe <= self.sent:
            return "", False
        delta = text[self.sent : safe]
        self.sent, self.text = safe, text[:safe]
        return delta, False
