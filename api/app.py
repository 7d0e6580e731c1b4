"""The frontend's ASGI application: sockets, health checks and the chat page."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from api.frontend import Frontend, running
from api.http import router as http_router
from api.sockets import router as socket_router
from shared.connections import RedisFactory
from shared.settings import Settings

# Something else to run for the frontend's lifetime on the same Redis (the embedded
# mode's in-process workers); entered after the frontend starts, left before it stops.
Companion = Callable[[RedisFactory], AbstractAsyncContextManager[object]]


def create_app(
    settings: Settings,
    factory: RedisFactory | None = None,
    companions: tuple[Companion, ...] = (),
) -> FastAPI:
    factory = factory or RedisFactory(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running(settings, factory) as frontend, contextlib.AsyncExitStack() as stack:
            for companion in companions:
                await stack.enter_async_context(companion(factory))
            app.state.frontend = frontend
            yield

    app = FastAPI(title="thoughtwire", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.include_router(socket_router)
    app.include_router(http_router)
    page = resources.files("api").joinpath("static/index.html").read_text()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        frontend: Frontend = request.app.state.frontend
        if await frontend.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    return app
