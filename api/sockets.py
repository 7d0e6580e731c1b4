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
from collections.abc import Awaitable, Callable, Sequence

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from api import render
from api.auth import AuthError, verify
from api.connection import Connection, Render, as_is
from api.frontend import Frontend, new_id
from shared.backoff import UNAVAILABLE
from shared.closecodes import Close
from shared.protocol import (
    Broadcast,
    Cancel,
    ClientMessage,
    Personal,
    Pong,
    Prompt,
    ProtocolError,
    Resume,
    error_reply,
    parse_after,
    parse_client_message,
    reply,
    valid_id,
)

router = APIRouter()

MessageHandler = Callable[[ClientMessage, Connection], Awaitable[None]]
UNAVAILABLE_REPLY = error_reply("unavailable", "the service is briefly unavailable; try again")


def _frontend(websocket: WebSocket) -> Frontend:
    frontend: Frontend = websocket.app.state.frontend
    return frontend


async def _refuse(websocket: WebSocket, code: int, reason: str) -> None:
    """Accept, then close with a code the client can read (browsers cannot see a 403)."""
    await websocket.accept()
    await websocket.close(code, reason)


async def _receive_text(websocket: WebSocket, conn: Connection, idle: float | None) -> str | None:
    """The next text frame; None after answering a binary frame or an idle period."""
    try:
        async with asyncio.timeout(idle):
            message = await websocket.receive()
    except TimeoutError:
        conn.send(reply("ping"))
        return None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", Close.NORMAL))
    text = message.get("text")
    if text is None:
        conn.send(error_reply("bad_frame", "binary frames are not supported; send text"))
    return text


def _start_position(websocket: WebSocket) -> tuple[str, int | None, str | None]:
    """``?session=S&after=N&epoch=E``: which session to follow, and from where."""
    query = websocket.query_params
    session = query.get("session") or new_id()
    if not valid_id(session):
        raise ProtocolError("bad_message", "session ids are 1-64 characters of [A-Za-z0-9._-]")
    after = query.get("after")
    return session, None if after is None else parse_after(after), query.get("epoch") or None


async def _session_socket(
    websocket: WebSocket,
    *,
    render_frame: Render = as_is,
    agent: str | None = None,
    idle: float | None = None,
    raw_prompts: bool = False,
    channels: Sequence[str] = (),
    hello: dict[str, str] | None = None,
    on_message: MessageHandler | None = None,
) -> None:
    """A socket on one session: prompts go to the workers, the session's events come back.

    ``channels`` are joined besides the session's; messages other than prompts,
    resumes and cancels go to ``on_message``, or are refused.
    """
    frontend = _frontend(websocket)
    if frontend.draining:
        await _refuse(websocket, Close.RESTART, "frontend restarting; reconnect")
        return
    try:
        session, after, epoch = _start_position(websocket)
    except ProtocolError as exc:
        await _refuse(websocket, Close.POLICY, exc.message)
        return
    await websocket.accept()
    conn = Connection(
        websocket,
        frontend.bus,
        frontend.hub,
        queue_size=frontend.settings.send_queue_size,
        render=render_frame,
    )
    viewer = conn.viewer
    try:
        for channel in channels:
            await viewer.join(channel)
        await viewer.follow(
            session, after, epoch, greeting=reply("session", session=session, **(hello or {}))
        )
    except BaseException as exc:
        await viewer.detach()
        if isinstance(exc, TimeoutError | UNAVAILABLE):
            await websocket.close(Close.TRY_LATER, "the event bus is unavailable; try again")
            return
        raise
    limit = frontend.settings.max_prompt_chars

    async def handle(message: ClientMessage) -> None:
        current = viewer.session
        assert current is not None
        if isinstance(message, Prompt):
            await frontend.start_run(
                current, message.content, agent, on_disconnect="cancel", idempotency_key=message.key
            )
        elif isinstance(message, Resume):
            greeting = reply("session", session=message.session, **(hello or {}))
            await viewer.follow(message.session, message.after, message.epoch, greeting=greeting)
        elif isinstance(message, Cancel):
            await frontend.bus.cancel(current, message.run)
        elif on_message is not None:
            await on_message(message, conn)
        elif not isinstance(message, Pong):
            conn.send(error_reply("unsupported", "this endpoint does not take that message"))

    async def receive_loop() -> None:
        while True:
            frame = await _receive_text(websocket, conn, idle)
            if frame is None:
                continue
            try:
                message = (
                    Prompt(frame)
                    if raw_prompts
                    else parse_client_message(frame, max_prompt_chars=limit)
                )
                await handle(message)
            except ProtocolError as exc:
                conn.send(error_reply(exc.code, exc.message))
            except UNAVAILABLE:
                conn.send(UNAVAILABLE_REPLY)

    await conn.serve(receive_loop)


@router.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await _session_socket(websocket, render_frame=render.echo_text, agent="echo", raw_prompts=True)


@router.websocket("/ws/agent")
async def agent(websocket: WebSocket) -> None:
    await _session_socket(websocket, render_frame=render.agent_text)


@router.websocket("/ws/chat")
async def chat(websocket: WebSocket) -> None:
    await _session_socket(websocket, render_frame=render.chat_text)


@router.websocket("/ws/agent-thoughts")
async def agent_thoughts(websocket: WebSocket) -> None:
    await _session_socket(websocket)


@router.websocket("/ws/robust")
async def robust(websocket: WebSocket) -> None:
    await _session_socket(websocket, idle=_frontend(websocket).settings.ping_interval)


@router.websocket("/ws/secure")
async def secure(websocket: WebSocket) -> None:
    try:
        verify(websocket.query_params.get("token"), _frontend(websocket).settings.jwt_secret)
    except AuthError as exc:
        await _refuse(websocket, Close.UNAUTHORIZED, str(exc))
        return
    await _session_socket(websocket)


@router.websocket("/ws/{client_id}")
async def connection_manager(websocket: WebSocket, client_id: str) -> None:
    """The seed's connection manager, across frontends.

    Each client id has a channel, and every manager socket is also on the broadcast
    channel, so a personal message or a broadcast reaches its targets whichever
    frontend holds them. Prompts run in a session of the socket's own.
    """
    frontend = _frontend(websocket)
    keys = frontend.keys
    if not valid_id(client_id):
        await _refuse(websocket, Close.POLICY, "client ids are 1-64 characters of [A-Za-z0-9._-]")
        return

    async def on_message(message: ClientMessage, conn: Connection) -> None:
        if isinstance(message, Personal):
            payload = reply("personal", content=message.content, sender=client_id, to=message.to)
            if not await frontend.bus.publish(keys.client_channel(message.to), payload):
                conn.send(error_reply("not_connected", f"no client {message.to!r} is connected"))
        elif isinstance(message, Broadcast):
            payload = reply("broadcast", content=message.content, sender=client_id)
            await frontend.bus.publish(keys.broadcast_channel, payload)

    await _session_socket(
        websocket,
        channels=(keys.client_channel(client_id), keys.broadcast_channel),
        hello={"client": client_id},
        on_message=on_message,
    )
