"""Run the app with uvicorn: :func:`serve` in a background thread (notebooks, tests) and the
``nbtrt serve`` command in the foreground. Both bind loopback unless told otherwise.

>>> with serve("smollm2-135m-instruct") as server:  # doctest: +SKIP
...     print(server.url)  # http://127.0.0.1:54321/v1
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
import warnings

import uvicorn

from ..errors import is_whole
from .app import check_max_queue, create_app


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless ``allow_remote``; warn when it is allowed."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return
    if not allow_remote:
        raise ValueError(f"host {host!r} is not a loopback address: anyone who can reach it could use the model. "
                         "Bind 127.0.0.1 (the default), or pass --allow-remote (allow_remote=True) to mean it")
    warnings.warn(f"serving on {host!r}: reachable from other machines; set an API key and put TLS in front",
                  stacklevel=3)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (bound here, so a busy port fails in the caller and port=0 is known at once)."""
    if not is_whole(port, 0, 65535):
        raise ValueError(f"port={port!r} is not a TCP port: pick one in 0-65535 (0 = any free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (0 = any free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _as_llm(model_or_llm, llm_options: dict):
    """(llm, owned): an ``nbtrt.LLM`` as given, or one made from a zoo name / directory (then owned: shut down on stop)."""
    if hasattr(model_or_llm, "generate_async"):
        if llm_options:
            raise ValueError(f"LLM options {sorted(llm_options)} only apply when serve() builds the LLM from a model name")
        return model_or_llm, False
    from ..serving.llm import LLM

    return LLM(model_or_llm, **llm_options), True


class ServerHandle:
    """A server running in a background thread. ``url`` is the OpenAI base URL (…/v1);
    ``stop()`` (or leaving the ``with`` block) ends it: the thread joined, the port closed, and
    the LLM shut down if serve() created it."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket, llm, owns_llm: bool, app):
        self._server, self._sock, self.llm, self._owns_llm, self.app = server, sock, llm, owns_llm, app
        host, port = sock.getsockname()[:2]
        self.host, self.port = host, port
        self.base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.url = self.base + "/v1"
        self._thread = threading.Thread(target=self._run, name=f"nbtrt-serve-{port}", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as e:  # noqa: BLE001  (reported by start()/stop() in the caller's thread)
            self._error = e

    def start(self, timeout_s: float = 30.0) -> "ServerHandle":
        self._thread.start()
        self._thread.join(0)  # let it begin
        waited = 0.0
        while not self._server.started and self._thread.is_alive() and waited < timeout_s:
            self._thread.join(0.02)
            waited += 0.02
        if not self._server.started:
            self.stop()
            raise RuntimeError(f"the server did not start within {timeout_s:.0f} s: {self._error!r}")
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self._server.started and not self._server.should_exit

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving: requests still running are aborted (streams end with finish_reason "abort"
        and ``[DONE]``), then the server closes; a stream still open after a grace period is cut."""
        state = self.app.state.server
        for rid in list(state.active):
            self.llm.abort(rid)
        deadline = time.monotonic() + 2.0
        while state.active and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()
        if self._owns_llm:
            self.llm.shutdown()
        if self._thread.is_alive():
            raise RuntimeError(f"the server thread did not stop within {timeout_s:.0f} s")

    def request_metrics(self, request_ids: list[str]) -> list[dict | None]:
        """The LLM's metrics (arrival / first token / finish times, token counts) of finished requests,
        by the ``id`` their responses carried; None for ids the server does not remember."""
        recent = self.app.state.server.recent
        return [recent.get(rid) for rid in request_ids]

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<nbtrt server {self.url} model={self.app.state.server.model_name!r} running={self.running}>"


def make_server(model_or_llm, *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                allow_remote: bool = False, served_model_name: str | None = None, max_queue: int | None = None,
                log_level: str = "warning", **llm_options) -> ServerHandle:
    """The server, bound but not started (see :func:`serve`)."""
    check_host(host, allow_remote)
    check_max_queue(max_queue)  # before the model loads
    sock = bind(host, port)
    try:
        llm, owned = _as_llm(model_or_llm, llm_options)
    except BaseException:
        sock.close()
        raise
    app = create_app(llm, api_key=api_key, served_model_name=served_model_name, max_queue=max_queue)
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("debug", "info"),
                            timeout_graceful_shutdown=2, lifespan="off")
    return ServerHandle(uvicorn.Server(config), sock, llm, owned, app)


def serve(model_or_llm, *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
          allow_remote: bool = False, served_model_name: str | None = None, max_queue: int | None = None,
          log_level: str = "warning", **llm_options) -> ServerHandle:
    """Serve ``model_or_llm`` (an ``nbtrt.LLM``, or a zoo name / model or engine directory, with
    ``llm_options`` for ``nbtrt.LLM``) over OpenAI's HTTP API from a background thread.
    ``port=0`` picks a free port; ``handle.url`` is the base URL for ``openai.OpenAI(base_url=...)``.
    ``tensor_parallel_size=N`` (an LLM option) serves the model split over N rank processes.

    >>> server = nbtrt.serve("smollm2-135m-instruct")  # doctest: +SKIP
    >>> server = nbtrt.serve("work/ckpt", tensor_parallel_size=2)  # doctest: +SKIP
    >>> client = openai.OpenAI(base_url=server.url, api_key="none")  # doctest: +SKIP
    >>> server.stop()  # doctest: +SKIP
    """
    handle = make_server(model_or_llm, host=host, port=port, api_key=api_key, allow_remote=allow_remote,
                         served_model_name=served_model_name, max_queue=max_queue, log_level=log_level, **llm_options)
    return handle.start()  # on failure start() has already stopped it (and shut down an LLM it made)
