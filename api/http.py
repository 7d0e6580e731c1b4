"""HTTP endpoints: background jobs, and a session's events as server-sent events."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from thoughtwire.api.auth import AuthError, Principal, check_origin, token_from
from thoughtwire.api.frontend import Frontend, new_id
from thoughtwire.api.metrics import Refusal, refused
from thoughtwire.api.sse import EventStream
from thoughtwire.api.viewer import Viewer
from thoughtwire.shared import logs, tracing
from thoughtwire.shared.backoff import UNAVAILABLE
from thoughtwire.shared.bus import Busy, Keyed, KeyReused
from thoughtwire.shared.closecodes import Close, ErrorCode
from thoughtwire.shared.protocol import (
    MAX_REASON_CHARS,
    ProtocolError,
    parse_event_id,
    valid_id,
)
from thoughtwire.shared.vocab import Decision, Multitask, OnDisconnect, Replay, RunStatus, ViewScope

router = APIRouter(prefix="/v1")
logger = logging.getLogger("thoughtwire.http")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Body(BaseModel):
    """A request body. A field it does not know is refused (422, naming it), not dropped:
    a misspelt ``idempotency_key`` would run a retry twice, a misspelt ``scope`` would
    mint a token that shows everything."""

    model_config = ConfigDict(extra="forbid")


class JobRequest(Body):
    """The body of ``POST /v1/jobs``: a prompt, and where and how it runs."""

    prompt: str = Field(min_length=1)
    session: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    on_disconnect: OnDisconnect = OnDisconnect.CONTINUE
    multitask: Multitask | None = None  # None: THOUGHTWIRE_MULTITASK


def _frontend(request: Request) -> Frontend:
    frontend: Frontend = request.app.state.frontend
    return frontend


async def principal(request: Request) -> Principal:
    """Who is calling: from ``Authorization: Bearer`` (or ``?token=``); counted against the rate."""
    frontend = _frontend(request)
    token, _ = token_from(request.query_params, request.headers)
    caller = await frontend.auth.principal(token)
    logs.bind(user=caller.user)  # the request's lines name its (hashed) user
    if caller.expires is not None and caller.expires <= time.time():
        # The leeway is for clocks that disagree; a socket closes at exp, and so does this.
        raise AuthError("token expired")
    await frontend.guard.check_rate(caller)
    return caller


Caller = Annotated[Principal, Depends(principal)]


async def _job_state(request: Request, job: str) -> dict[str, str]:
    state = await _frontend(request).bus.run_state(job) if valid_id(job) else None
    if state is None:
        raise HTTPException(404, "no such job (or its result has expired)")
    return state


@router.post("/jobs", status_code=202)
async def submit_job(body: JobRequest, request: Request, caller: Caller) -> JSONResponse:
    """Queue a prompt; it runs whether or not anyone watches (unless on_disconnect=cancel)."""
    frontend = _frontend(request)
    if len(body.prompt) > frontend.settings.max_prompt_chars or not body.prompt.strip():
        raise HTTPException(422, "prompt is empty or too long")
    session = body.session
    keyed: Keyed | Literal[False] | None = False  # False: its key not looked up here
    if session is None and body.idempotency_key is not None:
        # Sent again without a session: the key's run's, which this prompt may yet have
        # to queue (its first frontend went between admitting and queueing it).
        keyed = await frontend.keyed_run(caller, body.idempotency_key)
        session = keyed.session if keyed is not None else None
    session = session or new_id()
    logs.bind(session=session)
    try:
        with tracing.span("prompt", {"thoughtwire.session": session}, kind="producer"):
            run, session, created = await frontend.start_run(
                caller,
                session,
                body.prompt,
                on_disconnect=body.on_disconnect,
                idempotency_key=body.idempotency_key,
                multitask=body.multitask,
                keyed=keyed,  # looked up once
            )
    except Busy as exc:
        return JSONResponse(
            {"detail": str(exc), "code": ErrorCode.BUSY, "run": exc.run}, status_code=409
        )
    except KeyReused as exc:
        return JSONResponse({"detail": exc.message, "code": exc.code}, status_code=422)
    logger.info("run queued: session %s, run %s", session, run, extra={"run": run})
    return JSONResponse({"job": run, "session": session, "created": created}, status_code=202)


@router.get("/jobs/{job}")
async def job_status(job: str, request: Request, caller: Caller) -> dict[str, object]:
    """A run's status, attempts, and result or error (``GET /v1/jobs/{job}``)."""
    state = await _job_state(request, job)
    await _frontend(request).guard.check_read(caller, state["session"])
    status = (
        "cancelling"
        if state.get("cancel") == "1" and state["status"] in (RunStatus.QUEUED, RunStatus.RUNNING)
        else state["status"]
    )
    body: dict[str, object] = {
        "job": job,
        "session": state["session"],
        "status": status,
        "attempts": int(state.get("attempt", 0)),
    }
    if state["status"] == RunStatus.DONE:
        body["result"] = state.get("result", "")
    elif state["status"] in (RunStatus.FAILED, RunStatus.CANCELLED):
        body["error"] = state.get("result", "")
    return body


@router.delete("/jobs/{job}", status_code=202)
async def cancel_job(job: str, request: Request, caller: Caller) -> dict[str, object]:
    """Cancel a queued or running run (``DELETE /v1/jobs/{job}``)."""
    frontend = _frontend(request)
    bus = frontend.bus
    frontend.guard.check_writer(caller)
    state = await _job_state(request, job)
    await frontend.guard.check_write(caller, state["session"])
    if not await bus.cancel(state["session"], job):
        raise HTTPException(409, f"the job has already ended: {state['status']}")
    return {"job": job, "status": "cancelling"}


class ApprovalBody(Body):
    """The body of ``POST /v1/runs/{run}/approvals/{call_id}``: allow or deny, and why."""

    decision: Decision
    reason: str | None = Field(default=None, max_length=MAX_REASON_CHARS)


@router.post("/runs/{run}/approvals/{call_id}")
async def approve(
    run: str, call_id: str, body: ApprovalBody, request: Request, caller: Caller
) -> JSONResponse:
    """Allow or deny a tool call waiting for approval; the session's owner only."""
    if not valid_id(run) or not 0 < len(call_id) <= 200:
        raise HTTPException(422, "no such run or call id")
    if not await _frontend(request).approve(caller, run, call_id, body.decision, body.reason):
        return JSONResponse(
            {"detail": "that call is not waiting for an approval", "code": ErrorCode.NOT_WAITING},
            status_code=409,
        )
    return JSONResponse({"run": run, "call_id": call_id, "decision": body.decision})


@router.get("/budget")
async def budget(request: Request, caller: Caller) -> dict[str, dict[str, int | None]]:
    """The caller's token budget per window (``minute``, ``day``): limit, used,
    remaining and resets_at (Unix ms); a window without a limit has null ones."""
    return await _frontend(request).guard.budget_report(caller)


class ViewerTokenBody(Body):
    """The body of ``POST /v1/sessions/{session}/viewer-token`` (optional): what it shows."""

    scope: ViewScope = ViewScope.FULL


@router.post("/sessions/{session}/viewer-token")
async def viewer_token(
    session: str, request: Request, caller: Caller, body: ViewerTokenBody | None = None
) -> dict[str, object]:
    """A short-lived, read-only token for one session; only its owner may mint one."""
    frontend = _frontend(request)
    if not valid_id(session):
        raise HTTPException(422, "session ids are 1-64 characters of [A-Za-z0-9._-]")
    if not frontend.auth.enabled:
        raise HTTPException(404, "authentication is off: there is nothing to grant")
    await frontend.guard.check_write(caller, session)
    scope = ViewScope.FULL if body is None else body.scope
    token, expires = frontend.auth.viewer_token(caller.user, session, scope=scope)
    return {"token": token, "session": session, "expires": expires, "scope": scope}


@router.get("/sessions/{session}/presence")
async def session_presence(session: str, request: Request, caller: Caller) -> dict[str, object]:
    """Who watches the session, across frontends: sockets, distinct users, first names;
    its owner and its viewers may ask, as for its events."""
    if not valid_id(session):
        raise HTTPException(422, "session ids are 1-64 characters of [A-Za-z0-9._-]")
    frontend = _frontend(request)
    await frontend.guard.check_read(caller, session)
    if frontend.presence is None:
        raise HTTPException(503, "presence is not kept here", headers={"Retry-After": "1"})
    figures = await frontend.presence.read(session)
    return {
        "session": session,
        "sockets": figures.sockets,
        "users": figures.users,
        "names": figures.names(),
    }


@router.get("/sessions/{session}/events")
async def session_events(session: str, request: Request, caller: Caller) -> StreamingResponse:
    """The session's events as SSE; ``id`` is ``<epoch>-<seq>``, so ``Last-Event-ID`` resumes."""
    if not valid_id(session):
        raise HTTPException(422, "session ids are 1-64 characters of [A-Za-z0-9._-]")
    raw = request.headers.get("last-event-id") or request.query_params.get("after")
    try:
        after, epoch = (None, None) if raw is None else parse_event_id(raw)
    except ProtocolError as exc:
        raise HTTPException(422, exc.message) from None
    frontend = _frontend(request)
    if frontend.draining:
        refused(Refusal.DRAINING)
        raise HTTPException(503, "frontend restarting", headers={"Retry-After": "1"})
    check_origin(request.headers, frontend.settings, Close.FORBIDDEN)  # as sockets are refused
    await frontend.guard.check_read(caller, session)
    # A stream holds one of the user's connection slots, as a socket does.
    stream = new_id()
    await frontend.guard.take_socket(caller, stream)
    events = EventStream(caller.expires)
    viewer = Viewer(
        frontend.bus,
        frontend.hub,
        events,
        queue_size=frontend.settings.send_queue_size,
        queue_bytes=frontend.settings.send_queue_bytes,
        scope=caller.scope,
    )

    watching = frontend.presence  # a stream counts in presence as a socket does
    watched = False
    opened = ("/v1/sessions/{session}/events", "sse")
    frontend.open_sockets[opened] += 1

    async def ended() -> None:
        frontend.open_sockets[opened] -= 1
        if watching is not None and watched:
            watching.unwatch(session, caller.user)
        await viewer.detach()
        with contextlib.suppress(*UNAVAILABLE):
            await frontend.guard.free_socket(caller, stream)

    try:
        raw_replay = request.query_params.get("replay") == Replay.RAW
        await viewer.follow(
            session,
            after,
            epoch or request.query_params.get("epoch") or None,
            replay=Replay.RAW if raw_replay else Replay.SNAPSHOT,
        )
    except BaseException:
        await ended()
        raise
    if watching is not None:
        watching.watch(session, caller.user)
        watched = True
    return _EventStream(events.events(), ended)


class _EventStream(StreamingResponse):
    """An SSE response that calls ``ended`` however it ends: done, client gone, shutdown."""

    def __init__(self, events: AsyncIterator[str], ended: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._ended = ended

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._ended()
