"""The frontend's ASGI application: sockets, health checks and the chat page."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response

from thoughtwire.api.assets import Asset
from thoughtwire.api.auth import AuthError
from thoughtwire.api.bounds import Bounds, invalid_request
from thoughtwire.api.frontend import Frontend, running
from thoughtwire.api.guard import LimitError
from thoughtwire.api.http import router as http_router
from thoughtwire.api.lane import Gateway
from thoughtwire.api.metrics import Refusal, refusal, watching
from thoughtwire.api.metrics import refused as count_refused
from thoughtwire.api.sockets import routes as socket_routes
from thoughtwire.shared import metrics
from thoughtwire.shared.redis import RedisError, RedisFactory
from thoughtwire.shared.settings import Settings

# The page runs only its own files: model text that got past the sanitiser still could
# not run script, load a remote image or post anywhere (docs/page.md).
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)

PAGE_TYPES = {".js": "text/javascript", ".css": "text/css"}
PLAIN_TEXT = "text/plain; charset=utf-8"  # the rest: licences and the vendor README


def _page_assets() -> dict[str, Asset]:
    """The page's files under ``api/static``, by name."""
    root = resources.files("thoughtwire.api").joinpath("static")
    files = {name: root.joinpath(name) for name in ("page.js", "page.css")}
    for file in root.joinpath("vendor").iterdir():
        if file.is_file():
            files[f"vendor/{file.name}"] = file
    return {
        name: Asset.of(file.read_bytes(), PAGE_TYPES.get(Path(name).suffix, PLAIN_TEXT))
        for name, file in files.items()
    }


# Something else to run for the frontend's lifetime on the same Redis (the embedded
# mode's in-process workers); entered after the frontend starts, left before it stops.
Companion = Callable[[RedisFactory], AbstractAsyncContextManager[object]]


# The app's wiring: the lifespan and the middleware share one Frontend through closures.
# Splitting it belongs with the move of the packages under thoughtwire/.
def create_app(  # noqa: C901
    settings: Settings,
    factory: RedisFactory | None = None,
    companions: tuple[Companion, ...] = (),
) -> FastAPI:
    """The frontend's ASGI app: routes, sockets, bounds, and the lifespan that owns Redis."""
    factory = factory or RedisFactory(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with (
            factory.following(),  # behind Sentinel: the master, across failovers
            running(settings, factory) as frontend,
            contextlib.AsyncExitStack() as stack,
        ):
            stack.enter_context(watching(frontend))
            for companion in companions:
                await stack.enter_async_context(companion(factory))
            app.state.frontend = frontend
            yield

    app = Gateway(
        socket_routes=socket_routes,
        settings=settings,
        title="thoughtwire",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # The schema maps every endpoint: with authentication on it is not handed out
        # to whoever asks (docs/security.md lists what answers without a token).
        openapi_url=None if settings.auth_enabled else "/openapi.json",
    )
    # Added before CORS, so inside it: preflights are answered and refusals carry
    # CORS headers; outside FastAPI, so that nothing is read before it is bounded.
    app.add_middleware(Bounds, settings=settings)
    app.add_exception_handler(RequestValidationError, invalid_request)
    if settings.origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
        )

    @app.exception_handler(AuthError)
    async def refused(request: Request, exc: AuthError) -> JSONResponse:
        count_refused(refusal(exc.code))
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        body = {"detail": exc.message}
        if isinstance(exc, LimitError):  # which limit: rate_limited or budget
            body["code"] = exc.error_code
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(RedisError)
    async def unavailable(request: Request, exc: RedisError) -> JSONResponse:
        count_refused(Refusal.UNAVAILABLE)
        return JSONResponse(
            {"detail": "the service is briefly unavailable"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    app.include_router(http_router)
    page = resources.files("thoughtwire.api").joinpath("static/index.html").read_text()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    # The page's script, styles and vendored libraries (docs/page.md), read once and
    # served by name from memory, gzipped: no request path ever reaches the file system.
    assets = _page_assets()

    @app.get("/static/{name:path}", include_in_schema=False)
    async def page_asset(name: str, request: Request) -> Response:
        """One of the page's files; revalidated on every load, so an upgrade shows at once."""
        if name not in assets:
            raise HTTPException(404, "no such file")
        return assets[name].response(request, "no-cache")

    client_module = Asset.of(
        resources.files("thoughtwire.api").joinpath("static/thoughtwire.js").read_bytes(),
        "text/javascript",
    )

    @app.get("/thoughtwire.js", include_in_schema=False)
    async def thoughtwire_js(request: Request) -> Response:
        """The JavaScript client (clients/js), for pages to import."""
        return client_module.response(request, "public, max-age=3600")

    if settings.metrics:

        @app.get("/metrics", include_in_schema=False)
        async def metrics_page() -> Response:
            """Prometheus metrics: this frontend's (docs/operations.md, "Metrics")."""
            return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

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
