"""The ASGI app (Starlette): OpenAI's /v1/completions and /v1/chat/completions (whole answers
or server-sent events), /v1/models, /health and Prometheus /metrics, over one ``nbtrt.LLM``.

Every request becomes one ``llm.generate_async`` stream awaited on the server's event loop:
no thread per request; the LLM's own step-loop thread batches all of them in flight. A client
that goes away cancels its stream, and closing the stream aborts the request in the engine
(its KV blocks are freed within one step).

>>> app = create_app(nbtrt.LLM("smollm2-135m-instruct"), api_key="sk-local")  # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections import OrderedDict

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import is_whole
from ..generate import GenerationError
from . import protocol
from .metrics import ServerMetrics
from .protocol import APIError, Request

RECENT_REQUESTS = 4096  # finished requests whose metrics the server keeps (newest)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


def check_max_queue(max_queue: int | None) -> None:
    if max_queue is not None and not is_whole(max_queue, 0):
        raise ValueError(f"max_queue={max_queue!r}: the requests that may wait beyond a full batch, an integer "
                         ">= 0 (0: none wait, 429 at once)")


class ServerState:
    """What the routes share: the LLM, the served name, limits and metrics."""

    def __init__(self, llm, *, served_model_name: str | None = None, max_queue: int | None = None,
                 default_max_tokens: int = 512):
        check_max_queue(max_queue)
        self.llm = llm
        self.model_name = served_model_name or llm.model_name
        self.limits = llm.limits
        # requests the server holds at once: a full batch plus a bounded queue; beyond it, 429
        self.max_pending = self.limits.max_batch_size + (8 * self.limits.max_batch_size if max_queue is None else max_queue)
        self.default_max_tokens = default_max_tokens
        self.metrics = ServerMetrics()
        self.started = int(time.time())
        self.recent: OrderedDict[str, dict] = OrderedDict()  # request id -> the LLM's metrics, for timelines
        self.active: set[str] = set()  # ids of requests being answered (stop() aborts them so streams end cleanly)

    def remember(self, rid: str, final) -> None:
        self.recent[rid] = {**(final.metrics or {}), "finish_reason": final.finish_reason}
        while len(self.recent) > RECENT_REQUESTS:
            self.recent.popitem(last=False)

    # -------------------------------------------------------------- request -> engine input
    def prompt_ids(self, req: Request) -> list[int]:
        try:
            if req.kind == "chat":
                return self.llm.chat_ids(req.messages)  # the chat template; message text never becomes a control token
            return list(req.prompt) if isinstance(req.prompt, list) else self.llm.encode(req.prompt)
        except GenerationError as e:
            raise APIError(str(e), param=req.prompt_field) from None

    def sampling(self, req: Request, ids: list[int]):
        lim, field = self.limits, req.prompt_field
        if lim.max_input_len is not None and len(ids) > lim.max_input_len:
            raise APIError(f"the {field} has {len(ids)} tokens, more than this model's max_input_len="
                           f"{lim.max_input_len}; shorten it", param=field, code="context_length_exceeded")
        room = lim.max_seq_len - len(ids)
        if room < 1:
            raise APIError(f"the {field} has {len(ids)} tokens and leaves no room to generate within this model's "
                           f"maximum context length of {lim.max_seq_len} tokens; shorten it", param=field,
                           code="context_length_exceeded")
        if req.max_tokens is not None and req.max_tokens > room:
            raise APIError(f"this model's maximum context length is {lim.max_seq_len} tokens; you requested "
                           f"{len(ids) + req.max_tokens} ({len(ids)} in the {field}, {req.max_tokens} for the "
                           f"completion): lower max_tokens to at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        max_new = req.max_tokens or min(room, self.default_max_tokens)
        try:
            params = self.llm.sampling(max_new_tokens=max_new, **req.sampling)
        except GenerationError as e:  # e.g. "top_p=... is invalid": the message starts with the field
            name = str(e).split("=", 1)[0].split()[0]
            raise APIError(str(e), param={"max_new_tokens": "max_tokens", "stop_strings": "stop"}.get(name, name)) from None
        try:
            self.llm.check_prompt(ids, params)
        except GenerationError as e:
            raise APIError(str(e), param=field) from None
        return params

    def retry_after(self) -> str:
        """Seconds until a slot is likely free: the mean request latency so far (1 to 60)."""
        h = self.metrics.e2e
        mean = h.sum / sum(h.counts) if sum(h.counts) else 1.0
        return str(min(60, max(1, math.ceil(mean))))


def error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ------------------------------------------------------------------ generation routes
async def completions(request: HTTPRequest) -> Response:
    return await _generate(request, protocol.parse_completion)


async def chat_completions(request: HTTPRequest) -> Response:
    return await _generate(request, protocol.parse_chat)


async def _generate(request: HTTPRequest, parse) -> Response:
    st: ServerState = request.app.state.server
    try:
        req = parse(protocol.decode_body(await request.body()))
        if req.model is not None and req.model != st.model_name:
            raise APIError(f"the model {req.model!r} does not exist; this server serves {st.model_name!r}",
                           status=404, param="model", code="model_not_found")
        ids = st.prompt_ids(req)
        params = st.sampling(req, ids)
    except APIError as e:
        st.metrics.reject("bad_request")
        return error(e)
    if st.metrics.in_flight >= st.max_pending:
        st.metrics.reject("queue_full")
        return error(APIError(f"the server is at capacity ({st.max_pending} requests running or queued); "
                              "retry after the Retry-After seconds", status=429, type="rate_limit_error",
                              code="queue_full", headers={"Retry-After": st.retry_after()}))
    rid = req.new_id()
    try:  # the LLM refuses bad input here, before anything is queued
        stream = st.llm.generate_async(ids, params, streaming=req.stream, request_id=rid)
    except GenerationError as e:
        st.metrics.reject("bad_request")
        return error(APIError(str(e), param=req.prompt_field))
    st.metrics.in_flight += 1  # the event loop is single-threaded: no lock needed between routes
    st.active.add(rid)
    if req.stream:
        return EventStream(st, rid, _events(st, req, rid, ids, stream), stream)
    try:
        final = await _until_done_or_gone(request, _last(stream))
    except RuntimeError as e:  # the engine loop failed or was shut down
        return error(APIError(str(e), status=503, type="server_error", code="engine_unavailable"))
    finally:
        st.metrics.in_flight -= 1
        st.active.discard(rid)
        await stream.aclose()  # aborts the request if the client left before the end
    if final is None:  # the client left: nobody to answer
        st.metrics.observe_finished({}, "abort", 0.0)
        return Response(status_code=499)
    _record(st, rid, final)
    use = protocol.usage(len(ids), len(final.token_ids))
    return JSONResponse(protocol.response(req, rid, st.model_name, final.text, final.finish_reason, use))


async def _last(stream):
    final = None
    async for out in stream:
        final = out
    return final


async def _until_done_or_gone(request: HTTPRequest, coro, poll_s: float = 0.25):
    """Await ``coro``; if the client disconnects first, cancel it and return None."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():  # the client left (or we are cancelled): stop the task and let it unwind
            task.cancel()
            await asyncio.wait({task})


class EventStream(StreamingResponse):
    """A text/event-stream response that releases its request however it ends: finished, client
    gone (even before the first byte, when the body generator never started), or server shutdown."""

    def __init__(self, st: ServerState, rid: str, body, llm_stream):
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self.st, self.rid, self.llm_stream = st, rid, llm_stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # runs _events' cleanup if it started
            await self.llm_stream.aclose()     # a stream never iterated was never queued: nothing to abort
            self.st.metrics.in_flight -= 1
            self.st.active.discard(self.rid)


async def _events(st: ServerState, req: Request, rid: str, ids: list[int], stream):
    """The SSE body. Starlette cancels this generator when the client disconnects (ASGI spec
    2.3 listen-for-disconnect); the ``finally`` then closes the LLM stream, which aborts the request."""
    final = None
    try:
        if req.kind == "chat":  # OpenAI's first chat chunk announces the role before any text
            yield protocol.sse(protocol.chunk(req, rid, st.model_name, "", first=True))
        try:
            async for out in stream:
                final = out
                if out.delta_text:
                    yield protocol.sse(protocol.chunk(req, rid, st.model_name, out.delta_text))
        except RuntimeError as e:  # the engine failed mid-stream: headers are out, so say it in the stream
            yield protocol.sse(APIError(str(e), status=503, type="server_error", code="engine_unavailable").body())
        if final is not None and final.finished:
            yield protocol.sse(protocol.chunk(req, rid, st.model_name, None, final.finish_reason))
            if req.include_usage:
                use = protocol.usage(len(ids), len(final.token_ids))
                yield protocol.sse(protocol.usage_chunk(req, rid, st.model_name, use))
        yield protocol.DONE
    finally:
        await stream.aclose()
        if final is None or not final.finished:
            st.llm.abort(rid)  # belt and braces: the contract says aclose() already did
            st.metrics.observe_finished({}, "abort", 0.0)
        else:
            _record(st, rid, final)


def _record(st: ServerState, rid: str, final) -> None:
    st.remember(rid, final)
    m = final.metrics or {}
    e2e = (m["finish_time"] - m["arrival_time"]) if m.get("finish_time") and m.get("arrival_time") else 0.0
    st.metrics.observe_finished(m, final.finish_reason, e2e)


# ------------------------------------------------------------------ other routes
async def models(request: HTTPRequest) -> Response:
    st: ServerState = request.app.state.server
    card = {"id": st.model_name, "object": "model", "created": st.started, "owned_by": "nbtrt",
            "max_model_len": st.limits.max_seq_len}
    return JSONResponse({"object": "list", "data": [card]})


async def health(request: HTTPRequest) -> Response:
    st: ServerState = request.app.state.server
    try:
        st.llm.stats()
    except Exception as e:  # noqa: BLE001  (any failure of the engine means unhealthy)
        return JSONResponse({"status": "error", "message": str(e)}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: HTTPRequest) -> Response:
    st: ServerState = request.app.state.server
    return PlainTextResponse(st.metrics.render(st.llm.stats()), media_type="text/plain; version=0.0.4")


async def http_error(request: HTTPRequest, exc: HTTPException) -> Response:
    """404/405 and friends in OpenAI's error shape, so clients print a message, not HTML."""
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
    return error(APIError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code, type=kind))


async def server_error(request: HTTPRequest, exc: Exception) -> Response:
    return error(APIError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error"))


class BearerAuth:
    """ASGI middleware: /v1/* needs ``Authorization: Bearer <api_key>``; /health and /metrics stay
    open for probes and scrapers (they reveal no prompts)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                scope["app"].state.server.metrics.reject("unauthorized")  # Starlette sets scope["app"] first
                e = APIError("missing or wrong API key: send the header 'Authorization: Bearer <key>'", status=401,
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error(e)(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(llm, *, api_key: str | None = None, served_model_name: str | None = None,
               max_queue: int | None = None, default_max_tokens: int = 512):
    """The ASGI app serving ``llm`` (an ``nbtrt.LLM``). ``max_queue``: requests allowed to wait
    beyond a full batch before new ones get 429 (default 8 batches); ``default_max_tokens``: the
    cap when a request sets no max_tokens.

    >>> app = create_app(llm, api_key="sk-local")  # doctest: +SKIP
    """
    middleware = [Middleware(BearerAuth, api_key=api_key)] if api_key else []
    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], middleware=middleware, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.server = ServerState(llm, served_model_name=served_model_name, max_queue=max_queue,
                                   default_max_tokens=default_max_tokens)
    return app
