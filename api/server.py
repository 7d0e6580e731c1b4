"""Running a frontend under uvicorn, with a drain before uvicorn's own shutdown.

uvicorn, on SIGTERM, closes its listening socket and every WebSocket at once. A
frontend first drains (:meth:`thoughtwire.api.frontend.Frontend.drain`): ``/readyz`` turns 503,
new sockets are refused, open ones are told to reconnect in staggered batches. Only
then does uvicorn shut down. A second signal skips the drain.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from thoughtwire.api.wsserver import http_protocol, ws_protocol
from thoughtwire.shared import loops
from thoughtwire.shared.settings import Settings

logger = logging.getLogger("thoughtwire.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which drains the frontend's sockets on the first signal."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._drain: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        """Serve until told to exit, noting the loop the signal handler hands the drain to."""
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """On the first signal start the drain; on the second, exit now."""
        # A signal handler: it only schedules the drain (or, the second time, exits).
        if self._drain is not None or self._loop is None or not self.started:
            super().handle_exit(sig, frame)
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.create_task(self._drain_then_exit(), name="frontend-drain")

    async def _drain_then_exit(self) -> None:
        try:
            logger.info("draining: refusing new sockets, moving open ones elsewhere")
            await self._app.state.frontend.drain()
        except Exception:
            logger.exception("drain failed; shutting down anyway")
        finally:
            self.should_exit = True


def config(
    app: FastAPI, settings: Settings, host: str, port: int, log_level: str = "info"
) -> uvicorn.Config:
    """uvicorn's settings for a frontend: its protocols and limits.

    The HTTP protocol bounds each request head and WebSocket handshake in time and
    size, and caps connections (``max_connections``); uvicorn's ``limit_concurrency``
    is left off, as it would refuse /healthz and /readyz but never a socket.
    ``ws_max_size`` bounds a whole message, fragmented or compressed, on every socket.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http_protocol(settings),
        ws=ws_protocol(settings),  # the lighter protocol with the fast paths on
        ws_max_size=settings.max_message_bytes,
        ws_per_message_deflate=settings.ws_per_message_deflate,
        timeout_graceful_shutdown=int(settings.drain_timeout) + 5,
        log_level=log_level,
        # Logging is set up once for the process (shared/logs.py): uvicorn's loggers
        # propagate to its handler, in its format and with its redaction of tokens.
        log_config=None,
    )


def serve(app: FastAPI, settings: Settings, host: str, port: int) -> None:
    """Run a frontend on ``host:port`` until it is stopped."""
    loops.settle()
    DrainingServer(config(app, settings, host, port), app).run()
