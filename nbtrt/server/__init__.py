"""An OpenAI-compatible HTTP server over ``nbtrt.LLM`` (Starlette + uvicorn): ``nbtrt serve`` and
:func:`serve` for notebooks. See :mod:`nbtrt.server.app` for the routes.

>>> with serve("smollm2-135m-instruct") as server:  # doctest: +SKIP
...     openai.OpenAI(base_url=server.url, api_key="none").models.list()
"""
from .app import create_app
from .run import ServerHandle, serve

__all__ = ["serve", "create_app", "ServerHandle"]
