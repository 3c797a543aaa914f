"""The OpenAI wire format: request bodies checked field by field, response and stream-chunk
bodies, and OpenAI-style error bodies.

Validation is strict about the fields it knows (a wrong type is a 400 that names the field)
and ignores fields it does not know, as OpenAI's own server does for forward compatibility.
Nothing here touches the engine: :func:`parse_completion` and :func:`parse_chat` turn a body
into a :class:`Request` (prompt text or messages, sampling options, stream flags); the app
tokenizes it and checks it against the engine's limits.

>>> parse_completion({"model": "m", "prompt": "Hi", "max_tokens": 4}).max_tokens
4
>>> parse_completion({"prompt": "Hi", "n": 2})
Traceback (most recent call last):
...
nbtrt.server.protocol.APIError: n=2 is not supported: this server returns one choice per request (n=1)
"""
from __future__ import annotations

import json
import numbers
import time
import uuid
from dataclasses import dataclass, field


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """One parsed /v1/completions or /v1/chat/completions body."""

    kind: str                                   # "completion" | "chat"
    model: str | None
    prompt: str | list[int] | None = None       # completions
    messages: list[dict] | None = None          # chat
    max_tokens: int | None = None               # None: the rest of the context (capped by the server)
    sampling: dict = field(default_factory=dict)  # SamplingParams overrides, only those the client sent
    stream: bool = False
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_field(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"

    def new_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex


def decode_body(raw: bytes) -> dict:
    """The request's JSON object, or a 400 saying why it is not one."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


# ------------------------------------------------------------------ field checks
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _get(body: dict, name: str, check, rule: str, default=None):
    """``body[name]`` if present and not null, else ``default``; a 400 naming ``name`` when ``check`` fails."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise APIError(f"{name}={value!r} is invalid: it must be {rule}", param=name)
    return value


def _sampling(body: dict) -> dict:
    """SamplingParams overrides for the sampling fields the client sent (the model's generation_config fills the rest)."""
    out = {}
    t = _get(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number in [0, 2] (0 is greedy)")
    if t is not None:
        out["temperature"] = float(t)  # from_generation_config sets do_sample = temperature > 0
    p = _get(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    if p is not None:
        out["top_p"] = float(p)
    k = _get(body, "top_k", lambda v: _is_int(v) and v >= -1, "an integer >= 0 (0 or -1 disables top-k)")
    if k is not None:
        out["top_k"] = max(int(k), 0)
    r = _get(body, "repetition_penalty", lambda v: _is_number(v) and v > 0, "a number > 0 (1 disables it)")
    if r is not None:
        out["repetition_penalty"] = float(r)
    seed = _get(body, "seed", _is_int, "an integer")
    if seed is not None:
        out["seed"] = int(seed)
    stop = _get(body, "stop", lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
                "a string or a list of strings", default=[])
    stop = [stop] if isinstance(stop, str) else stop
    if any(not s for s in stop):
        raise APIError("stop strings must not be empty", param="stop")
    if stop:
        out["stop_strings"] = tuple(stop)
    return out


def _common(body: dict, kind: str) -> Request:
    model = _get(body, "model", lambda v: isinstance(v, str), "a string")
    n = _get(body, "n", _is_int, "an integer", default=1)
    if n != 1:
        raise APIError(f"n={n} is not supported: this server returns one choice per request (n=1)", param="n")
    names = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    max_tokens = None
    for name in names:
        max_tokens = _get(body, name, lambda v: _is_int(v) and v >= 1, "an integer >= 1", default=max_tokens)
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "true or false", default=False)
    options = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object such as {\"include_usage\": true}")
    include_usage = False
    if options is not None:
        if not stream:
            raise APIError("stream_options is only allowed with stream: true", param="stream_options")
        include_usage = _get(options, "include_usage", lambda v: isinstance(v, bool), "true or false", default=False)
    for name in ("presence_penalty", "frequency_penalty"):
        _get(body, name, lambda v: _is_number(v) and v == 0, "0 (this server does not apply it; use repetition_penalty)")
    _get(body, "logprobs", lambda v: v is False or (kind == "completion" and v == 0), "false: logprobs are not supported")
    _get(body, "logit_bias", lambda v: isinstance(v, dict) and not v, "empty: logit_bias is not supported")
    _get(body, "user", lambda v: isinstance(v, str), "a string")
    return Request(kind=kind, model=model, max_tokens=max_tokens, sampling=_sampling(body), stream=stream,
                   include_usage=include_usage)


def parse_completion(body: dict) -> Request:
    """A /v1/completions body: one ``prompt`` (text, or token ids), no echo/suffix/best_of."""
    req = _common(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise APIError("prompt is empty", param="prompt")
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt = [int(t) for t in prompt]
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise APIError(f"prompt holds {len(prompt)} prompts; send one prompt per request "
                       "(requests are batched on the server anyway)", param="prompt")
    else:
        raise APIError(f"prompt must be a non-empty string or a list of token ids, got {prompt!r:.80}", param="prompt")
    _get(body, "echo", lambda v: v is False, "false: echo is not supported")
    _get(body, "suffix", lambda v: v == "", "empty: suffix (insertion) is not supported")
    _get(body, "best_of", lambda v: v == 1, "1: best_of is not supported")
    req.prompt = prompt
    return req


def parse_chat(body: dict) -> Request:
    """A /v1/chat/completions body: ``messages`` with text content (a string, or a list of
    ``{"type": "text", "text": ...}`` parts, joined); tools are not supported."""
    req = _common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects", param="messages")
    flat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(f"messages[{i}] must be an object, got {type(m).__name__}", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(f"messages[{i}].content parts must be {{\"type\": \"text\", \"text\": ...}}: "
                               "this server takes text only", param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        role = "system" if m.get("role") == "developer" else m.get("role")
        flat.append({"role": role, "content": content})
    for name in ("tools", "functions", "response_format"):
        if body.get(name) not in (None, [], {"type": "text"}):
            raise APIError(f"{name} is not supported by this server", param=name)
    req.messages = flat
    return req


# ------------------------------------------------------------------ responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(req: Request, rid: str, model: str, text: str, finish_reason: str | None, use: dict) -> dict:
    """The whole (non-streamed) answer."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        return {"id": rid, "object": "chat.completion", "created": req.created, "model": model,
                "choices": [choice], "usage": use}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "text_completion", "created": req.created, "model": model,
            "choices": [choice], "usage": use}


def chunk(req: Request, rid: str, model: str, text: str | None, finish_reason: str | None = None,
          *, first: bool = False) -> dict:
    """One stream chunk carrying ``text`` (None: no choice content, e.g. only the finish reason)."""
    if req.kind == "chat":
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        body = {"id": rid, "object": "chat.completion.chunk", "created": req.created, "model": model,
                "choices": [choice]}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        body = {"id": rid, "object": "text_completion", "created": req.created, "model": model, "choices": [choice]}
    if req.include_usage:
        body["usage"] = None  # as OpenAI: every chunk has the key, only the last one a value
    return body


def usage_chunk(req: Request, rid: str, model: str, use: dict) -> dict:
    """The extra last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": req.created, "model": model, "choices": [], "usage": use}


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: <compact JSON>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")
