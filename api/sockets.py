"""The WebSocket endpoints. Each one only queues prompts and relays what the hub delivers:
no agent runs in a frontend, so any frontend can serve any client.

=====================  =================================================================
``/ws``                echoes each text frame in upper case (run by a worker)
``/ws/agent``          plain-text answer chunks, then ``[DONE]``
``/ws/chat``           plain-text answer tokens, then ``\\n[DONE]``
``/ws/agent-thoughts`` JSON events; ``?session=S&after=N`` follows session S from N
``/ws/robust``         like agent-thoughts, plus a ``ping`` after an idle period
``/ws/secure``         like agent-thoughts, behind ``?token=<JWT>``
``/ws/{client_id}``    the connection manager: prompts, personal messages, broadcasts
=====================  =================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from thoughtwire.api import render
from thoughtwire.api.auth import ANONYMOUS, AuthError, check_origin, token_from
from thoughtwire.api.connection import Connection, Render, as_is
from thoughtwire.api.frontend import Frontend, new_id
from thoughtwire.api.guard import LimitError
from thoughtwire.api.lane import SocketRoutes
from thoughtwire.api.metrics import Refusal, refusal, refused
from thoughtwire.api.presence import Watch
from thoughtwire.shared import logs, tracing
from thoughtwire.shared.backoff import UNAVAILABLE
from thoughtwire.shared.bus import Busy
from thoughtwire.shared.closecodes import Close, ErrorCode
from thoughtwire.shared.protocol import (
    MAX_KEY_CHARS,
    Approve,
    Auth,
    Broadcast,
    Cancel,
    ClientMessage,
    Personal,
    Pong,
    Prompt,
    ProtocolError,
    Resume,
    error_reply,
    lenient_json,
    parse_after,
    parse_client_message,
    reply,
    valid_id,
    whole_text,
)
from thoughtwire.shared.vocab import OnDisconnect, Replay

routes = SocketRoutes()  # served by api.lane, ahead of FastAPI
_route = routes.route

MessageHandler = Callable[[ClientMessage, "SessionSocket"], Awaitable[None]]
UNAVAILABLE_SAID = "the service is briefly unavailable; try again"
UNAVAILABLE_REPLY = error_reply(ErrorCode.UNAVAILABLE, UNAVAILABLE_SAID)

logger = logging.getLogger("thoughtwire.sockets")


def _frontend(websocket: WebSocket) -> Frontend:
    frontend: Frontend = websocket.app.state.frontend
    return frontend


async def _refuse(
    websocket: WebSocket, code: int, reason: str, subprotocol: str | None = None
) -> None:
    """Accept, then close with a code the client can read (browsers cannot see a 403)."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):  # it left already
        await websocket.accept(subprotocol)
        await websocket.close(code, reason)


def _start_position(websocket: WebSocket) -> tuple[str, int | None, str | None]:
    """``?session=S&after=N&epoch=E``: which session to follow, and from where."""
    query = websocket.query_params
    session = query.get("session") or new_id()
    if not valid_id(session):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, "session ids are 1-64 characters of [A-Za-z0-9._-]"
        )
    after = query.get("after")
    return session, None if after is None else parse_after(after), query.get("epoch") or None


class Stop(Exception):
    """Close the socket with ``code``: raised inside the receive loop."""

    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason


class SessionSocket:
    """One client socket on one session, from admission to close.

    Prompts go to the workers and the session's events come back; no agent runs in
    a frontend, so any frontend can serve any client. Every frame is checked
    against the principal's grants and the per-user limits.
    """

    def __init__(
        self,
        websocket: WebSocket,
        *,
        render_frame: Render = as_is,
        agent: str | None = None,
        ping: float | None = None,
        raw_prompts: bool = False,
        require_auth: bool = False,
        hello: dict[str, Any] | None = None,
        on_message: MessageHandler | None = None,
        endpoint: str | None = None,
    ) -> None:
        self.websocket = websocket
        # Its route, for metrics: the path, or the template of a route with parameters.
        self.endpoint = endpoint or websocket.scope["path"]
        self.frontend = _frontend(websocket)
        self.render_frame = render_frame
        self.agent = agent
        self.hello = hello or {}
        if websocket.query_params.get("ping") == "1" and self.frontend.settings.ping_interval:
            # Asked for: a browser cannot send WebSocket pings, so a client that must
            # notice a dead link (no close ever comes) needs frames it can count on. The
            # greeting says how often: silence for longer means the link is dead.
            ping = self.frontend.settings.ping_interval
            self.hello = {**self.hello, "ping": ping}
        self.ping = ping
        self.raw_prompts = raw_prompts
        self.require_auth = require_auth
        self.on_message = on_message
        self.principal = ANONYMOUS
        self.socket_id = new_id()
        self.conn: Connection | None = None
        self.watch: Watch | None = None  # its place in its session's presence

    async def admit(self) -> tuple[str, int | None, str | None, str | None] | None:
        """Check everything before accepting; on refusal close and return None."""
        frontend, websocket = self.frontend, self.websocket
        token, subprotocol = token_from(websocket.query_params, websocket.headers)
        try:
            check_origin(websocket.headers, frontend.settings, Close.POLICY)
            if frontend.draining:
                raise AuthError("frontend restarting; reconnect", Close.RESTART)
            if self.require_auth and not frontend.auth.enabled:
                raise AuthError("authentication is not configured on this server")
            self.principal = await frontend.auth.principal(token)
            session, after, epoch = _start_position(websocket)
            await frontend.guard.check_read(self.principal, session)
            await frontend.guard.check_rate(self.principal)
            await frontend.guard.take_socket(self.principal, self.socket_id)
        except AuthError as exc:
            refused(refusal(exc.code))
            await _refuse(websocket, exc.code, exc.message, subprotocol)
            return None
        except ProtocolError as exc:
            refused(Refusal.INVALID)
            await _refuse(websocket, Close.POLICY, exc.message, subprotocol)
            return None
        except UNAVAILABLE:
            refused(Refusal.UNAVAILABLE)
            await _refuse(
                websocket, Close.TRY_LATER, "the service is briefly unavailable", subprotocol
            )
            return None
        return session, after, epoch, subprotocol

    async def serve(self, channels: Sequence[str] = ()) -> None:
        """Admit the socket, follow its session, and handle its frames until it closes."""
        admitted = await self.admit()
        if admitted is None:
            return
        session, after, epoch, subprotocol = admitted
        logs.bind(session=session, user=self.principal.user)  # this socket's task's lines
        frontend = self.frontend
        opened = (self.endpoint, "websocket")
        frontend.open_sockets[opened] += 1
        try:  # the slot admit() took is held from here, and freed however the socket ends
            await self.websocket.accept(subprotocol)
            await self._serve(session, after, epoch, channels)
        finally:
            frontend.open_sockets[opened] -= 1
            with contextlib.suppress(*UNAVAILABLE):
                await frontend.guard.free_socket(self.principal, self.socket_id)

    async def _serve(
        self, session: str, after: int | None, epoch: str | None, channels: Sequence[str]
    ) -> None:
        frontend = self.frontend
        conn = self.conn = Connection(
            self.websocket,
            frontend.bus,
            frontend.hub,
            queue_size=frontend.settings.send_queue_size,
            queue_bytes=frontend.settings.send_queue_bytes,
            render=self.render_frame,
            scope=self.principal.scope,  # the token's: no query or message changes it
        )
        viewer = conn.viewer
        try:
            for channel in channels:
                await viewer.join(channel)
            await viewer.follow(
                session,
                after,
                epoch,
                greeting=reply("session", session=session, **self.hello),
                replay=self._replay(),
            )
            await self._watch(session)
        except BaseException as exc:
            await viewer.detach()
            if isinstance(exc, TimeoutError | UNAVAILABLE):
                await self.websocket.close(
                    Close.TRY_LATER, "the event bus is unavailable; try again"
                )
                return
            raise
        try:
            await conn.serve(self._receive_loop)
        finally:
            if self.watch is not None:
                await self.watch.stop()

    async def _watch(self, session: str) -> None:
        """Count this socket in ``session``'s presence; with ``?presence=1``, send it the
        session's presence frames too (JSON endpoints only)."""
        assert self.conn is not None
        watching = self.frontend.presence
        if watching is None:
            return
        if self.watch is None:
            asked = self.websocket.query_params.get("presence") == "1"
            frames = asked and self.render_frame is as_is
            self.watch = Watch(watching, self.conn.viewer, self.principal.user, frames=frames)
        await self.watch.start(session)

    def _replay(self) -> Replay:
        """``?replay=raw`` asks for the log as it is; plain text shows no snapshot."""
        if self.render_frame is not as_is or self.websocket.query_params.get("replay") == "raw":
            return Replay.RAW
        return Replay.SNAPSHOT

    # --- receiving ----------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self.conn is not None
        clock = _Clock(self.conn, self.ping, self.frontend.settings.idle_timeout)
        try:
            while True:
                frame = await self._next_frame(clock)
                if frame is not None:
                    await self._handle_frame(frame)
        except Stop as stop:
            self.conn.close(stop.code, stop.reason)

    async def _next_frame(self, clock: _Clock) -> str | None:
        """The next text frame, or None after a ping, a binary frame or a refused one."""
        assert self.conn is not None
        try:
            async with asyncio.timeout(clock.wait(self.principal.expires)):
                message = await self.websocket.receive()
        except TimeoutError:
            self._on_quiet(clock)
            return None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", Close.NORMAL))
        clock.heard()
        text = message.get("text")
        if text is None:
            self.conn.send(
                error_reply(ErrorCode.BAD_FRAME, "binary frames are not supported; send text")
            )
        return text

    def _on_quiet(self, clock: _Clock) -> None:
        assert self.conn is not None
        if self.principal.expires is not None and time.time() >= self.principal.expires:
            raise Stop(Close.UNAUTHORIZED, "token expired")
        if clock.idle():
            raise Stop(Close.NORMAL, "idle timeout")
        if clock.ping_due():
            self.conn.send(reply("ping"))

    async def _handle_frame(self, frame: str) -> None:
        assert self.conn is not None
        limit = self.frontend.settings.max_prompt_chars
        try:
            await self.frontend.guard.check_rate(self.principal)
            message = (
                Prompt(frame)
                if self.raw_prompts
                else parse_client_message(frame, max_prompt_chars=limit)
            )
            await self._handle(message)
        except ProtocolError as exc:
            self.conn.send(error_reply(exc.code, exc.message, **_named(frame)))
        except Busy as exc:
            key = _named(frame)
            self.conn.send(
                reply("error", code=ErrorCode.BUSY, message=str(exc), run=exc.run, **key)
            )
        except LimitError as exc:  # rate_limited, or budget
            refused(Refusal.LIMIT)
            self.conn.send(error_reply(exc.error_code, exc.message, **_named(frame)))
        except AuthError as exc:
            raise Stop(exc.code, exc.message) from None
        except UNAVAILABLE:
            key = _named(frame)  # a prompt's, or an approval's: every refusal of one names it
            refusal = error_reply(ErrorCode.UNAVAILABLE, UNAVAILABLE_SAID, **key) if key else None
            self.conn.send(refusal or UNAVAILABLE_REPLY)

    async def _handle(self, message: ClientMessage) -> None:
        assert self.conn is not None
        frontend, viewer = self.frontend, self.conn.viewer
        session = viewer.session
        assert session is not None
        if isinstance(message, Prompt):
            await self._prompt(message, session)
        elif isinstance(message, Resume):
            await frontend.guard.check_read(self.principal, message.session)
            logs.bind(session=message.session)
            greeting = reply("session", session=message.session, **self.hello)
            await viewer.follow(
                message.session,
                message.after,
                message.epoch,
                greeting=greeting,
                replay=message.replay if self.render_frame is as_is else Replay.RAW,
            )
            await self._watch(message.session)
        elif isinstance(message, Cancel):
            await frontend.guard.check_write(self.principal, session)
            await frontend.bus.cancel(session, message.run)
        elif isinstance(message, Approve):
            await self._approve(message)
        elif isinstance(message, Auth):
            fresh = await frontend.auth.principal(message.token)
            if fresh.user != self.principal.user or fresh.viewer_of != self.principal.viewer_of:
                raise AuthError("a refreshed token must name the same user", Close.FORBIDDEN)
            if fresh.scope != self.principal.scope:
                # The socket's viewer shows what its first token's scope shows, for its life.
                raise AuthError("a refreshed token must have the same scope", Close.FORBIDDEN)
            self.principal = fresh
        elif self.on_message is not None:
            await self.on_message(message, self)
        elif not isinstance(message, Pong):
            self.conn.send(
                error_reply(ErrorCode.UNSUPPORTED, "this endpoint does not take that message")
            )

    async def _prompt(self, message: Prompt, session: str) -> None:
        """Queue a prompt in a ``prompt`` span (with tracing on), whose trace the run's first
        event relayed to this socket ends."""
        assert self.conn is not None
        received = time.time_ns()
        with tracing.span("prompt", {"thoughtwire.session": session}, kind="producer") as span:
            run, queued_in, created = await self.frontend.start_run(
                self.principal,
                session,
                message.content,
                self.agent,
                on_disconnect=OnDisconnect.CANCEL,
                idempotency_key=message.key,
                multitask=message.multitask,
            )
            if span is not None and created:
                span.set_attribute("thoughtwire.run", run)
                self.conn.transport.await_first(run, span, received)
        if queued_in != session:  # an idempotent repeat of a prompt this socket cannot see
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                "that key was used for a prompt of another session; send this one with a new key",
            )
        if message.key is not None:
            # Which run is this prompt's: the session may have other writers, whose runs'
            # events this socket sees too. A resent prompt (same key) names the same run.
            self.conn.send(reply("queued", session=session, run=run, key=message.key))
        logger.info("run queued: session %s, run %s", session, run, extra={"run": run})

    async def _approve(self, message: Approve) -> None:
        """Answer a tool call's approval (any run of a session this socket's token owns)."""
        assert self.conn is not None
        answered = await self.frontend.approve(
            self.principal, message.run, message.call_id, message.decision, message.reason
        )
        if not answered:
            # Named, so a client that sends an approval again on a new socket (its first
            # may have been applied just as the old one closed) knows which it was.
            self.conn.send(
                error_reply(
                    ErrorCode.NOT_WAITING,
                    "that call is not waiting for an approval",
                    run=message.run,
                    call_id=message.call_id,
                )
            )


def _named(frame: str) -> dict[str, str]:
    """What the reply to a refused frame names, whatever else its client has sent
    meanwhile: a prompt's ``key``, an approval's ``run`` and ``call_id``; else nothing. A
    client keeps either until its reply comes (and sends it again on a new socket)."""
    if "prompt" not in frame and "approve" not in frame:  # most are neither: no parse
        return {}
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError:  # a lone surrogate in its text, say: its names still count
        message = lenient_json(frame)
    if not isinstance(message, dict):
        return {}
    if message.get("type") == "prompt":
        names = {"key": message.get("key")}
    elif message.get("type") == "approve":
        names = {"run": message.get("run"), "call_id": message.get("call_id")}
    else:
        return {}
    named = {field: name for field, name in names.items() if isinstance(name, str)}
    if len(named) < len(names):
        return {}
    ok = all(0 < len(name) <= MAX_KEY_CHARS and whole_text(name) for name in named.values())
    return named if ok else {}


class _Clock:
    """When a socket last heard from its client, and whether it has gone quiet."""

    def __init__(self, conn: Connection, ping: float | None, idle: float) -> None:
        self.conn = conn
        self.ping = ping
        self.idle_after = idle
        self.last_heard = self.last_active = time.time()
        self.sent = conn.sent
        # When the client was last sent a frame, at the latest: a client that beats more
        # often than the interval must still hear something each interval, or it takes the
        # link for dead (`ping` in the greeting says it may).
        self.last_sent = self.looked = self.last_heard
        self.sent_seen = conn.sent

    def heard(self) -> None:
        self.last_heard = self.last_active = time.time()

    def wait(self, expires: float | None) -> float:
        """Seconds until something may need doing: a ping, an idle check, an expiry."""
        now = time.time()
        due = [self.last_active + self.idle_after]
        if self.ping:
            if self.conn.sent != self.sent_seen:
                # Written since the last look: count from that look, so a ping comes early
                # rather than late.
                self.sent_seen, self.last_sent = self.conn.sent, self.looked
            self.looked = now
            due.append(min(self.last_heard, self.last_sent) + self.ping)
        if expires is not None:
            due.append(expires)
        return max(0.0, min(due) - now)

    def ping_due(self) -> bool:
        """Whether to ping: nothing from the client, or nothing to it, for an interval."""
        if self.ping and time.time() >= min(self.last_heard, self.last_sent) + self.ping:
            self.last_heard = self.last_sent = time.time()  # the next after another interval
            return True
        return False

    def idle(self) -> bool:
        """Nothing either way for ``idle_after`` seconds."""
        if self.conn.sent != self.sent:
            self.sent, self.last_active = self.conn.sent, time.time()
            return False
        return time.time() >= self.last_active + self.idle_after


@_route("/ws")
async def echo(websocket: WebSocket) -> None:
    """``/ws``: the echo agent, answered as plain text."""
    await SessionSocket(
        websocket, render_frame=render.echo_text, agent="echo", raw_prompts=True
    ).serve()


@_route("/ws/agent")
async def agent(websocket: WebSocket) -> None:
    """``/ws/agent``: a run's events as plain text lines."""
    await SessionSocket(websocket, render_frame=render.agent_text).serve()


@_route("/ws/chat")
async def chat(websocket: WebSocket) -> None:
    """``/ws/chat``: answers only, as plain text."""
    await SessionSocket(websocket, render_frame=render.chat_text).serve()


@_route("/ws/agent-thoughts")
async def agent_thoughts(websocket: WebSocket) -> None:
    """``/ws/agent-thoughts``: every event as JSON."""
    await SessionSocket(websocket).serve()


@_route("/ws/robust")
async def robust(websocket: WebSocket) -> None:
    """``/ws/robust``: every event as JSON, with pings."""
    await SessionSocket(websocket, ping=_frontend(websocket).settings.ping_interval).serve()


@_route("/ws/secure")
async def secure(websocket: WebSocket) -> None:
    """Like agent-thoughts, but a token is required even where authentication is optional."""
    await SessionSocket(websocket, require_auth=True).serve()


@_route("/ws/{client_id}")
async def connection_manager(websocket: WebSocket) -> None:
    """The seed's connection manager, across frontends.

    Each client id has a channel, and every manager socket is also on the broadcast
    channel, so a personal message or a broadcast reaches its targets whichever
    frontend holds them. Prompts run in a session of the socket's own. With
    authentication on, a client id is the user's own id.
    """
    client_id: str = websocket.path_params["client_id"]
    frontend = _frontend(websocket)
    bus = frontend.bus
    if not valid_id(client_id):
        await _refuse(websocket, Close.POLICY, "client ids are 1-64 characters of [A-Za-z0-9._-]")
        return

    async def on_message(message: ClientMessage, socket: SessionSocket) -> None:
        assert socket.conn is not None
        if isinstance(message, Personal):
            payload = reply("personal", content=message.content, sender=client_id, to=message.to)
            if not await bus.publish(bus.client_channel(message.to), payload):
                socket.conn.send(
                    error_reply(ErrorCode.NOT_CONNECTED, f"no client {message.to!r} is connected")
                )
        elif isinstance(message, Broadcast):
            payload = reply("broadcast", content=message.content, sender=client_id)
            await bus.publish(bus.broadcast_channel, payload)

    socket = SessionSocket(
        websocket,
        hello={"client": client_id},
        on_message=on_message,
        endpoint="/ws/{client_id}",
    )
    if frontend.auth.enabled:
        token, subprotocol = token_from(websocket.query_params, websocket.headers)
        try:
            if (await frontend.auth.principal(token)).user != client_id:
                await _refuse(
                    websocket, Close.FORBIDDEN, "a client id is your own user id", subprotocol
                )
                return
        except AuthError as exc:
            await _refuse(websocket, exc.code, exc.message, subprotocol)
            return
    await socket.serve(channels=(bus.client_channel(client_id), bus.broadcast_channel))
