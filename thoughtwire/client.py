"""A Python client for thoughtwire frontends that reconnects and resumes by itself.

>>> async for event in ask("What is machine learning?", ["ws://a:8000", "ws://b:8000"],
...                        token=get_token):
...     print(event["type"], event["content"])

Its only dependency is ``websockets`` (13 or later): importing this module loads
neither the server's packages (FastAPI, uvicorn, Redis, the agents) nor PyJWT, so a
program that only follows sessions stays small.

:class:`Follower` keeps the client's position ``(session, epoch, seq)``. When a
connection drops it reconnects, to the same or the next frontend of its list, with
capped exponential backoff and jitter, and asks for everything after that position
(``?session=S&after=N&epoch=E``). The server answers with the missed events, each
exactly once, or a ``gap`` saying where the stream goes on. Events reach the caller
once each and in seq order: a duplicate (a seq not past the position, in the same
epoch) is dropped here too.

The follower also folds what it yields into the session's state,
:attr:`Follower.folded` (runs, their blocks, tool calls and approvals), with
:func:`thoughtwire.shared.reducer.reduce`: the rules the JavaScript client's ``reduce``
follows too.

Credentials are a token string, or a callable (plain or ``async``) that returns a
fresh token and is called before every connection. The token travels in the
``Authorization: Bearer`` header of the handshake, never in the URL. A close with
4001 (token missing, invalid or expired) is final for a string; with a callable the
client asks it once for a new token and tries again.

The reconnecting ``async for ... in websockets.connect(uri)`` iterator retries one
URI with one set of headers; this client moves on to the next frontend, sends a
fresh token and a new resume position on every attempt, and knows which close codes
are final, so it drives single ``connect`` calls itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import State as ConnectionState
from websockets.uri import parse_uri

from thoughtwire.shared.reducer import initial_state, reduce

DEFAULT_URL = "ws://127.0.0.1:8000/ws/agent-thoughts"
SOCKET_PATH = "/ws/agent-thoughts"
TERMINAL = ("done", "error", "cancelled")
# Error codes for a request someone else answered first (an approval decided on another
# frontend): the run goes on and its log shows the decision, so following goes on too.
NOT_WAITING = "not_waiting"
ANSWERED_ELSEWHERE = frozenset({NOT_WAITING})
# Error codes only a prompt gets: from a frontend that does not name the refused prompt's
# key, the oldest prompt waiting was refused. A refused prompt is not sent again (on a
# later connection it could run after all).
PROMPT_REFUSED = frozenset({"busy", "budget", "empty_prompt", "too_long"})
# Close codes after which reconnecting cannot help (shared/closecodes.py says why);
# 4001 is retried once when a token callback can give a fresh token.
FINAL_CLOSE_CODES = frozenset({1000, 1008, 1009, 4001, 4003})
UNAUTHORIZED = 4001
FORBIDDEN = 4003
RATE_LIMITED = 4029
# A rate-limited client waits this long at least (times 1 to 2) before it comes back.
RATE_LIMIT_PAUSE = 1.0
# After a reconnect, how long to wait for a ``gap`` before saying "resumed" without one:
# a frontend sends a gap, if any, right after its greeting.
RESUME_SETTLE = 0.3
# A connection up this long (seconds) was healthy: after it drops, backoff starts afresh.
# One closed sooner (a frontend that greets, then finds its event log unreachable and
# closes with 1013) goes on backing off, or every client would reconnect 20 times a second.
STEADY = 10.0
PONG = '{"type":"pong"}'
# Prompts waiting for their runs to start, and cancels waiting for a connection, at most.
MAX_PENDING = 64
# Prompts remembered: the runs the frontend named for them, and those cancelled before.
RUNS_KEPT = 1024
# Events of new runs held while a prompt waits to hear which run is its own (OwnRun).
HELD_EVENTS = 10_000
# What a prompt does while the session has an unfinished run, and the answers to an
# approval (docs/protocol.md, "Protocol v2").
MULTITASK = ("reject", "enqueue", "interrupt")
DECISIONS = ("allow", "deny")

Token = str | Callable[[], str | Awaitable[str]]


class State(StrEnum):
    """A follower's connection state, as reported to ``on_state``."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    RESUMED = "resumed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class StateChange:
    """One state change: where, and (for ``resumed``) the gap or (for the others) why."""

    state: State
    url: str | None = None
    gap: dict[str, Any] | None = None
    code: int | None = None
    reason: str = ""


class Refused(Exception):
    """The server refused for good: a final close code, or an ``error`` reply.

    ``code`` is the close code (None for an error reply, whose code is ``error``).
    """

    def __init__(
        self,
        reason: str,
        code: int | None = None,
        error: str | None = None,
        action: str | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.error = error
        self.action = action  # the write that was refused (prompt, cancel, auth), if known
        self.key = key  # a refused prompt's key, when the frontend named it


class Unreachable(Refused):
    """No frontend of the list could be reached in time (or in ``max_reconnects`` tries)."""

    def __init__(self, reason: str, last: str = "") -> None:
        super().__init__(reason)
        self.last = " ".join(last.split())  # why the last try failed, on one line


def socket_url(base: str, query: dict[str, Any]) -> str:
    """A frontend's socket URL from a base (``ws``/``http`` URL, with or without a path).

    ``http(s)`` becomes ``ws(s)``; a URL with no ``/ws`` path gets ``/ws/agent-thoughts``.
    ``query`` replaces those names in the base's own query; everything is encoded.
    """
    parts = urlsplit(base)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path.startswith("/ws") else parts.path.rstrip("/") + SOCKET_PATH
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in query]
    pairs = kept + [(k, str(v)) for k, v in query.items()]
    return urlunsplit((scheme, parts.netloc, path, urlencode(pairs), ""))


def check_url(url: str) -> None:
    """Raise ValueError if no socket can be opened to ``url``, whatever the network does.

    The message does not repeat the URL, whose query may hold a credential.
    """
    try:
        parse_uri(socket_url(url, {}))
    except (InvalidURI, ValueError):
        raise ValueError(
            "a frontend URL is ws://, wss://, http:// or https://, a host, and a port up to 65535"
        ) from None


def backoff(first: float = 0.05, cap: float = 2.0) -> Iterator[float]:
    """first, 2*first, 4*first, ... capped at ``cap``, each scaled by a random factor in [0.5, 1]."""
    delay = first
    while True:
        yield delay * random.uniform(0.5, 1.0)
        delay = min(delay * 2, cap)


async def fetch_token(token: Token | None) -> str | None:
    """The token to send: the string, or what the callable returns (awaited if need be)."""
    if token is None or isinstance(token, str):
        return token
    value = token()
    if inspect.isawaitable(value):
        value = await value
    return value


class Follower:
    """Follows one session across reconnects and frontends; yields events and ``gap`` notices.

    ``urls`` are frontends tried in turn, starting at ``first``; a list is kept as it
    is, so its owner can swap frontends in and out. ``session``/``after``/``epoch``
    resume a session; no ``after``: from the moment of joining, starting with one
    ``snapshot`` frame of the session's state when it has events (``folded`` becomes
    it, and reconnects resume from its ``seq``); ``after=0``: every event from the
    start. ``replay="raw"`` asks for no snapshot ever (a trimmed log is a ``gap``). No
    ``session`` starts a new one. ``timeout`` gives up (:class:`Unreachable`) after that many
    seconds without a connection; ``max_reconnects`` after that many tries in a row. A
    socket that does not say which session it serves (its ``session`` greeting) within
    ``greeting_timeout`` is a failed try: no session socket (a wrong URL), or a frontend
    that cannot reach Redis (it closes with 1013 itself well before 30 s).
    ``on_state`` is called with a :class:`StateChange` on every state change.
    ``on_error``, if given, hears of a write the token may not make (a viewer's prompt
    or cancel: 4003) and of each ``error`` reply (a prompt refused as ``busy`` or over
    ``budget``) as a :class:`Refused`, and following goes on; without it, those are
    raised like any final close, except ``not_waiting`` (an approval someone decided
    first), which is dropped: the run's ``decision`` event says what was decided. The
    ``not_waiting`` of an approval sent again on a new connection (see :meth:`approve`)
    is heard by neither: the first was applied. ``heartbeat``: after that many seconds without
    a frame from the server, a ``pong`` tells the frontend the client is still there
    (a frontend closes a socket quiet both ways for ``THOUGHTWIRE_IDLE_TIMEOUT``, 15 min).
    ``folded`` is the session's state: what was yielded, folded by
    :func:`thoughtwire.shared.reducer.reduce` (read-only; a new object per change).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        session: str | None = None,
        *,
        token: Token | None = None,
        after: int | None = None,
        epoch: str | None = None,
        on_state: Callable[[StateChange], None] | None = None,
        on_error: Callable[[Refused], None] | None = None,
        max_reconnects: int = 50,
        open_timeout: float = 5.0,
        greeting_timeout: float = 30.0,
        timeout: float | None = None,
        first: int = 0,
        heartbeat: float | None = 240.0,
        replay: str | None = None,
    ) -> None:
        self.urls = (
            [urls] if isinstance(urls, str) else urls if isinstance(urls, list) else list(urls)
        )
        if not self.urls:
            raise ValueError("a follower needs at least one frontend URL")
        for url in self.urls:
            check_url(url)
        if replay not in (None, "snapshot", "raw"):
            raise ValueError("replay must be snapshot or raw")
        self.replay = replay
        self.first = first
        self.session = session
        self.seq = after
        self.epoch = epoch
        self.token = token
        self.on_state = on_state
        self.on_error = on_error
        self.max_reconnects = max_reconnects
        self.open_timeout = open_timeout
        self.greeting_timeout = greeting_timeout
        self.timeout = timeout
        self.heartbeat = heartbeat or None
        self.reconnects = 0
        self.url_in_use: str | None = None
        self.state: State | None = None
        self.folded: dict[str, Any] = initial_state()
        self._ws: ClientConnection | None = None
        self._outbox: list[tuple[str, str]] = []  # (action, frame) for the next connection
        self._wrote: str | None = None  # the last write on this connection, to name a refusal
        self._auth_retried = False  # a 4001 got its one fresh token since the last admission
        # Prompts by key, resent on each connection until the frontend says it queued them.
        self._prompts: dict[str, str] = {}
        # A run's cancel, sent again on each connection until the run ends: a frontend
        # stops reading before it closes (a drain, a slow reader), so one written in that
        # moment is never read. The cancel of every run is not: it would stop later ones.
        self._cancels: dict[str, str] = {}
        # Approvals by (run, call_id), sent again on each connection until settled: the
        # run's ``decision`` for the call, the run's end, or a refusal. Lost for the same
        # reason, they would leave the run waiting until it is denied by timeout.
        self._approvals: dict[tuple[str, str], str] = {}
        # Those sent again on this connection: their ``not_waiting`` (the first had been
        # applied after all) settles them, and is no refusal to report.
        self._resent: set[tuple[str, str]] = set()
        self._queued: dict[str, str] = {}  # prompt key -> its run, the latest RUNS_KEPT
        self._withdrawn: dict[str, None] = {}  # keys of prompts cancelled before they queued
        self._opened = False  # whether the current attempt got as far as a greeting
        self._opened_before = False  # whether any attempt did: the next is a resume
        self._settling = False  # greeted again; a gap, if any, comes next
        self._url_tried = ""
        self._greeted_at = 0.0  # when the current connection was greeted (loop time)
        self._greeting_wait = greeting_timeout  # how long this socket may take to greet
        self.own_runs = False  # an OwnRun waits for its prompt's run (OwnRun sets it)

    def url(self, attempt: int) -> str:
        """The socket URL for ``attempt``: its frontend, and the position to resume from."""
        base = self.urls[(self.first + attempt) % len(self.urls)]
        query: dict[str, Any] = {}
        if self.session is not None:
            query["session"] = self.session
            if self.seq is not None:
                query["after"] = self.seq
            elif self.own_runs and self._opened_before:
                # No position yet (a session joined before it had events, or left before
                # its snapshot came): a snapshot now would fold away the events of a run
                # that ended meanwhile, and OwnRun would wait for its end for ever. The
                # log from its start has them, and OwnRun passes on its own run's only.
                query["after"] = 0
            if self.epoch is not None:
                query["epoch"] = self.epoch
            if self.replay == "raw":
                query["replay"] = "raw"
        return socket_url(base, query)

    # --- actions ------------------------------------------------------------

    async def prompt(self, text: str, key: str | None = None, multitask: str | None = None) -> str:
        """Prompt the followed session; returns the idempotency key.

        The prompt is sent now if connected, and again on each reconnect until the
        frontend replies that it queued it (a ``queued`` reply naming its run, which
        :meth:`run_of` gives): the key makes the server run it once. ``multitask`` is
        what to do if the session has an unfinished run: ``reject`` (an ``error``
        reply, code ``busy``), ``enqueue`` (run after it) or ``interrupt`` (cancel it
        first); by default the server's ``THOUGHTWIRE_MULTITASK``.
        """
        key = key or uuid.uuid4().hex
        message = {"type": "prompt", "content": text, "key": key}
        if multitask is not None:
            if multitask not in MULTITASK:
                raise ValueError(f"multitask must be one of {', '.join(MULTITASK)}")
            message["multitask"] = multitask
        frame = json.dumps(message)
        if len(self._prompts) >= MAX_PENDING:
            raise Refused(f"{MAX_PENDING} prompts already wait for their runs", action="prompt")
        self._prompts[key] = frame
        # Kept in order with the other writes, so a cancel asked before it cannot stop its run.
        await self._send("prompt", frame, keep=True)
        return key

    async def cancel(self, run: str | None = None, *, key: str | None = None) -> None:
        """Cancel ``run``, the run of the prompt sent with ``key``, or (neither given) every
        unfinished run of the followed session.

        A run's cancel is sent again on each new connection until the run's terminal
        event comes; the cancel of every run is sent once. A prompt's run is cancelled as
        soon as the frontend says it queued the prompt (at once if it has); a prompt not
        sent yet is not sent at all. One written on a socket that closed before the reply
        is sent again, as only its reply can name its run: a run it starts then is cancelled.
        """
        if key is not None:
            if run is not None:
                raise ValueError("cancel a run or a prompt's run, not both")
            run = self._queued.get(key)
            if run is None:
                kept = ("prompt", self._prompts.get(key, ""))
                if kept in self._outbox:  # never written: nothing of it runs
                    del self._prompts[key]
                    self._outbox.remove(kept)
                # It may be on its way: its run is cancelled once queued.
                _keep(self._withdrawn, key, None, RUNS_KEPT)
                return
        frame = json.dumps({"type": "cancel"} if run is None else {"type": "cancel", "run": run})
        if run is not None:  # past the bound, the oldest goes: its end may have gone by in a gap
            _keep(self._cancels, run, frame, MAX_PENDING)
        await self._send("cancel", frame, keep=run is None)

    async def approve(
        self, run: str, call_id: str, decision: str, reason: str | None = None
    ) -> None:
        """Answer a tool call's ``approval`` in ``run``: ``allow`` or ``deny``, and why.

        Sent now if connected, otherwise on the next connection; then again on each new
        connection until the run's ``decision`` for the call comes, the run ends, or the
        frontend refuses it (at most ``MAX_PENDING`` are kept: past that, the oldest is
        not sent again). A call that no longer waits is refused with an ``error`` reply
        (code ``not_waiting``, naming ``run`` and ``call_id``); for an approval sent
        again, that reply means the first was applied, and is not reported.
        """
        if decision not in DECISIONS:
            raise ValueError("decision must be allow or deny")
        message = {"type": "approve", "run": run, "call_id": call_id, "decision": decision}
        if reason is not None:
            message["reason"] = reason
        frame, call = json.dumps(message), (run, call_id)
        # Not taken out of ``_resent``: replies come in the order of the frames, so the
        # first ``not_waiting`` for the call is the resend's.
        _keep(self._approvals, call, frame, MAX_PENDING)
        try:
            await self._send("approve", frame, keep=True)
        except Refused:
            if self._approvals.get(call) == frame:
                del self._approvals[call]  # refused here: never sent, nor sent again
            raise

    async def refresh(self, token: str | None = None) -> None:
        """Hand the open socket a fresh token (``token``, or the callback's) before the old expires.

        A ``token`` given here replaces a string token: the next connection signs in with it.
        """
        if token and not callable(self.token):
            self.token = token  # the first may have expired by the next reconnect
        fresh = token or await fetch_token(self.token)
        if fresh:
            await self._send("auth", json.dumps({"type": "auth", "token": fresh}), keep=False)

    async def _send(self, action: str, frame: str, *, keep: bool) -> None:
        """Send on the open socket; otherwise (or if it fails) on the next, when ``keep``."""
        ws = self._ws
        # Only on an open socket: a send on a closing one waits for the close to finish.
        if ws is not None and ws.state is ConnectionState.OPEN:
            try:
                self._wrote = action
                await ws.send(frame)
                return
            except ConnectionClosed:
                pass
        if keep:
            # Prompts are bounded apart, by the prompts waiting for their runs.
            if sum(kept != "prompt" for kept, _ in self._outbox) >= MAX_PENDING:
                raise Refused(
                    f"{MAX_PENDING} messages already wait for a connection", action=action
                )
            self._outbox.append((action, frame))

    # --- following ----------------------------------------------------------

    async def events(
        self, prompt: str | None = None, multitask: str | None = None, *, queued: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield the session's events (and gaps) until a final close, or forever.

        ``prompt``, if given, is sent once the session is known (see :meth:`prompt`,
        which takes ``multitask`` too). With ``queued``, the frontend's ``queued``
        replies (:meth:`run_of` knows their run from then on) are yielded too: a prompt's
        run may have ended before its reply came (:class:`OwnRun`).
        Raises :class:`Refused` for a final close or an ``error`` reply, and
        :class:`Unreachable` when no frontend answers in time.
        """
        if prompt is not None:
            await self.prompt(prompt, multitask=multitask)
        retries = _Retries(self.max_reconnects, self.timeout)
        attempt, code, reason = 0, None, ""
        self._report(State.CONNECTING)
        try:
            while True:
                self._opened = False
                try:
                    # No inner generator: one left suspended when the caller stops early
                    # would be finalised apart from this one, and race it.
                    async with await self._open(attempt, retries.deadline) as ws:
                        self._settling = False
                        while True:
                            message = await self._receive(ws)
                            if message is not None and (queued or message.get("type") != "queued"):
                                yield message
                except ConnectionClosed as exc:
                    code, reason = _close_of(exc)
                    self._after_close(code, reason)
                except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
                    code, reason = None, _describe(exc)
                finally:
                    self._ws = None
                if self._opened:  # it was up: start counting afresh
                    retries = retries.reached(_now() - self._greeted_at >= STEADY)
                attempt += 1
                self.reconnects += 1
                delay = retries.next_delay(code, reason)
                self._report(State.RECONNECTING, code=code, reason=reason)
                await asyncio.sleep(delay)
        except Refused as exc:
            code, reason = exc.code, exc.reason
            raise
        finally:
            self._report(State.CLOSED, code=code, reason=reason)

    def _after_close(self, code: int | None, reason: str) -> None:
        """Raise :class:`Refused` if a close is final; return if the follower should reconnect."""
        if self._opened:
            self._auth_retried = False  # that token was taken: a later 4001 may have another
        if code == FORBIDDEN and self._opened and self._wrote and self.on_error is not None:
            # The token may read this session but not write to it (a viewer): the socket
            # was closed for the write alone, so the caller hears of it and following goes
            # on. The refused writes are not sent again.
            self._prompts.clear()
            self._outbox.clear()
            self._cancels.clear()
            self._approvals.clear()
            self._resent.clear()
            self.on_error(Refused(reason or "forbidden", code, action=self._wrote))
            return
        if code == UNAUTHORIZED and callable(self.token) and not self._auth_retried:
            self._auth_retried = True  # once: a fresh token, then a 4001 is final
            return
        if code in FINAL_CLOSE_CODES:
            raise Refused(reason or f"closed with {code}", code, action=self._wrote)

    async def _open(self, attempt: int, deadline: float | None) -> connect:
        """The connection for ``attempt``: its URL, a fresh token, a timeout within ``deadline``."""
        url = self.url(attempt)
        token = await fetch_token(self.token)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        open_timeout, greeting = self.open_timeout, self.greeting_timeout
        if deadline is not None:
            open_timeout = max(0.01, min(open_timeout, deadline - _now()))
            greeting = max(0.01, min(greeting, deadline - _now()))
        self._url_tried, self._wrote = url, None
        self._greeting_wait = greeting
        return connect(url, additional_headers=headers, open_timeout=open_timeout, max_size=2**22)

    async def _receive(self, ws: ClientConnection) -> dict[str, Any] | None:
        """The next frame's message for the caller, or None for one the caller does not see.

        Greets (a ``session`` reply), reports ``connected``/``resumed``, and keeps the
        position; on a reconnect, ``resumed`` waits a moment for a ``gap`` to report with it.
        """
        url = self._url_tried
        wait = self.heartbeat if self._opened else self._greeting_wait
        try:
            async with asyncio.timeout(RESUME_SETTLE if self._settling else wait):
                frame = await ws.recv()
        except TimeoutError:
            if not self._opened:
                # A socket that never says which session it serves is no session socket
                # (a seed endpoint, a wrong URL): a failed try, as one that did not open.
                raise ConnectionError(f"no session greeting within {wait:g} s") from None
            if self._settling:
                self._settling = False
                self._report(State.RESUMED, url=url)
            else:
                await _pong(ws)
            return None
        message = _message(frame)
        if message.get("type") == "ping":
            await _pong(ws)
            return None
        if message.get("type") == "session":
            resumed = self._opened_before
            await self._greeted(ws, message)
            self.url_in_use = url
            if resumed:
                self._settling = True
            else:
                self._report(State.CONNECTED, url=url)
            return None
        if self._settling:
            self._settling = False
            gap = message if message.get("type") == "gap" else None
            self._report(State.RESUMED, url=url, gap=gap)
        if message.get("session", self.session) != self.session:
            return None  # a frame of the session this socket just left
        if message.get("type") == "queued":
            await self._was_queued(message)
            return message
        return message if self._advance(message) else None

    async def _greeted(self, ws: ClientConnection, message: dict[str, Any]) -> None:
        if self.session is None and self.seq is None:
            self.seq = 0  # a session of our own: all of it is ours to see
        self.session = message["session"]
        self._ws, self._opened, self._opened_before = ws, True, True
        self._greeted_at = _now()
        outbox, self._outbox = self._outbox, []
        queued = {frame for _, frame in outbox}
        # Prompts an earlier socket took may not have been read; the others wait in order.
        earlier = [("prompt", p) for p in self._prompts.values() if p not in queued]
        cancels = [("cancel", c) for c in self._cancels.values()]
        # Approvals an earlier socket took may not have been read either: sent again last.
        again = {call: a for call, a in self._approvals.items() if a not in queued}
        self._resent = set(again)
        approvals = [("approve", a) for a in again.values()]
        for action, frame in [*earlier, *outbox, *cancels, *approvals]:
            self._wrote = action
            await ws.send(frame)

    def _advance(self, message: dict[str, Any]) -> bool:
        """Track the position; True for what the caller should see (once each)."""
        kind = message.get("type")
        if kind == "gap":
            self.epoch, self.seq = message.get("epoch"), message["next"] - 1
            self.folded = reduce(self.folded, message)
            return True
        if "seq" in message:
            seq, epoch = message["seq"], message.get("epoch")
            if epoch == self.epoch and self.seq is not None and seq <= self.seq:
                return False  # seen already
            folded = reduce(self.folded, message)
            if kind == "snapshot" and folded is self.folded:
                return False  # not a whole state: no position to take from it
            self.epoch, self.seq, self.folded = epoch, seq, folded
            if kind in TERMINAL:
                self._cancels.pop(str(message.get("run")), None)
            self._settle(message)
            return True
        if kind == "error":
            self._refused(message)
        return False  # pings, reconnect notices, connection-manager messages

    def _settle(self, message: dict[str, Any]) -> None:
        """An event that settles approvals: their call's ``decision``, or their run's end."""
        kind, run = message.get("type"), message.get("run")
        if kind == "decision":
            self._approvals.pop((str(run), str(message.get("call_id"))), None)
        elif kind in TERMINAL and self._approvals:
            for call in [call for call in self._approvals if call[0] == run]:
                del self._approvals[call]

    def _refused(self, message: dict[str, Any]) -> None:
        """An ``error`` reply: heard by ``on_error`` (or raised); a refused prompt is given up."""
        code, key = message.get("code"), message.get("key")
        action = None
        if not isinstance(key, str):
            key = None
        run, call_id = message.get("run"), message.get("call_id")
        if isinstance(run, str) and isinstance(call_id, str):
            # The reply to an approve, naming it: settled either way, not sent again.
            call = (run, call_id)
            self._approvals.pop(call, None)
            if call in self._resent and code == NOT_WAITING:
                # Sent again on this socket: the first was applied after all (or decided
                # elsewhere meanwhile, as the run's ``decision`` event says). No error.
                self._resent.discard(call)
                return
            action = "approve"
        elif key is not None and key in self._prompts:
            # A refused prompt (over the rate too, or it would run on a later connection,
            # long after its sender gave up on it): it is not sent again.
            del self._prompts[key]
            action = "prompt"
        elif key is None and code in PROMPT_REFUSED and self._prompts:
            # Replies come in the order the prompts were read: this one is the oldest's.
            del self._prompts[next(iter(self._prompts))]
            action = "prompt"
        reason = message.get("message", "the server refused the request")
        refused = Refused(reason, error=code, action=action, key=key)
        if self.on_error is not None:
            self.on_error(refused)  # one request was refused; the session goes on
        elif code not in ANSWERED_ELSEWHERE:
            raise refused

    async def _was_queued(self, message: dict[str, Any]) -> None:
        """A ``queued`` reply: the prompt with that key has its run, and is not sent again;
        if it was cancelled before, its run is cancelled now."""
        key, run = message.get("key"), message.get("run")
        if not isinstance(key, str) or not isinstance(run, str):
            return
        self._prompts.pop(key, None)
        _keep(self._queued, key, run, RUNS_KEPT)
        if key in self._withdrawn:
            del self._withdrawn[key]
            await self.cancel(run)

    def run_of(self, key: str) -> str | None:
        """The run of the prompt sent with ``key``, once the frontend has said it queued it.

        Other writers of the session (another tab, the HTTP API) start runs too: this
        tells which is the prompt's, whatever order their events come in.
        """
        return self._queued.get(key)

    def _report(self, state: State, **fields: Any) -> None:
        self.state = state
        if self.on_state is not None:
            self.on_state(StateChange(state, **fields))


class _Retries:
    """When to try again after a failed or lost connection, and when to stop trying."""

    def __init__(self, max_failures: int, timeout: float | None) -> None:
        self.delays = backoff()
        self.failures = 0
        self.max_failures = max_failures
        self.timeout = timeout
        self.deadline = None if timeout is None else _now() + timeout

    def reached(self, steady: bool) -> _Retries:
        """After a connection was greeted: the failures and the deadline start afresh, and
        the delays too if it stayed up ``steady``-ly long."""
        if steady:
            return _Retries(self.max_failures, self.timeout)
        self.failures = 0
        self.deadline = None if self.timeout is None else _now() + self.timeout
        return self

    def next_delay(self, code: int | None, reason: str) -> float:
        """Seconds to wait before the next try; raises :class:`Unreachable` to stop."""
        self.failures += 1
        if self.failures > self.max_failures:
            raise Unreachable(f"gave up after {self.max_failures} tries: {reason}", reason)
        delay = next(self.delays)
        if self.deadline is not None:
            left = self.deadline - _now()
            if left <= 0:
                said = f"no frontend answered within {self.timeout:g} s ({reason})"
                raise Unreachable(said, reason)
            delay = min(delay, left)  # one last try just before the deadline
        if code == RATE_LIMITED:
            delay = max(delay, RATE_LIMIT_PAUSE * random.uniform(1, 2))
        return delay


async def _pong(ws: ClientConnection) -> None:
    """Tell the frontend the client is there (an answer to ``ping``, or a keep-alive)."""
    if ws.state is ConnectionState.OPEN:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(PONG)


def _now() -> float:
    return asyncio.get_running_loop().time()


def _close_of(exc: ConnectionClosed) -> tuple[int | None, str]:
    """The close code and reason the server sent (None: the connection just dropped)."""
    if exc.rcvd is None:
        return None, "connection lost"
    return exc.rcvd.code, exc.rcvd.reason


def _describe(exc: BaseException) -> str:
    """A short, safe account of a failed connection attempt."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, InvalidURI):
        return "not a socket URL"  # its text holds the URL, and a URL may hold a token
    return str(exc) or type(exc).__name__


async def ask(
    prompt: str,
    urls: str | Sequence[str] = DEFAULT_URL,
    *,
    multitask: str | None = None,
    **options: Any,
) -> AsyncIterator[dict[str, Any]]:
    """Send one prompt; yield every event of its run (and gaps), ending with its terminal event.

    ``multitask`` is as for :meth:`Follower.prompt`; ``options`` go to :class:`Follower`.
    Its run is the one the frontend names in its ``queued`` reply to the prompt.
    """
    heard = options.pop("on_error", None)
    key = uuid.uuid4().hex

    def on_error(refused: Refused) -> None:
        if refused.key == key or (refused.key is None and refused.action == "prompt"):
            raise refused  # its prompt was refused: no run will come
        if heard is not None:
            heard(refused)
        elif refused.error not in ANSWERED_ELSEWHERE:
            raise refused

    follower = Follower(urls, on_error=on_error, **options)
    own = OwnRun(follower, await follower.prompt(prompt, key=key, multitask=multitask))
    async for message in follower.events(queued=True):
        for event in own.events(message):
            yield event
            if event["type"] in TERMINAL:
                return


class OwnRun:
    """Which of a followed session's messages are of one prompt's run (and gaps).

    The frontend names the run in its ``queued`` reply to the prompt; other writers of
    the session (another tab, the HTTP API) start runs too, maybe first. Events of new
    runs that come before that reply are held (up to ``HELD_EVENTS``) until it comes: pass
    the replies in too (``Follower.events(queued=True)``), as the whole run may come first.
    """

    def __init__(self, follower: Follower, key: str) -> None:
        follower.own_runs = True
        self.follower = follower
        self.key = key
        self.run: str | None = None
        self.earlier: set[str] = set()  # the runs a joined session's snapshot holds
        self.held: list[dict[str, Any]] = []

    def events(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """What to pass on of ``message``: none, it, or it with the run's held events."""
        kind = message["type"]
        if kind == "gap" and not self.held:
            return [message]
        if kind == "snapshot":
            self.earlier.update(self.follower.folded["order"])
            return []  # a continued session's earlier runs: not this prompt's
        if self.run is None:
            return self._named(message)
        return [message] if kind == "gap" or self._own(message) else []

    def _named(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """Before the run was known: hold ``message`` if it may be of the run, or (named
        now) pass on the run's held events and ``message``."""
        self.run = self.follower.run_of(self.key)
        kind = message["type"]
        if self.run is None:
            new = kind != "queued" and message.get("run") not in self.earlier
            if (new or kind == "gap") and len(self.held) < HELD_EVENTS:
                self.held.append(message)  # a gap too, behind what came before it
            return []
        held, self.held = self.held, []
        return [e for e in (*held, message) if e["type"] == "gap" or self._own(e)]

    def _own(self, message: dict[str, Any]) -> bool:
        return message["type"] != "queued" and message.get("run") == self.run


def _keep(kept: dict[Any, Any], key: Any, value: Any, most: int) -> None:
    """Set ``kept[key]``; past ``most`` entries, the oldest goes."""
    kept[key] = value
    if len(kept) > most:
        del kept[next(iter(kept))]


def _message(frame: str | bytes) -> dict[str, Any]:
    """A frame as the message it carries.

    A frame that is no JSON object (a proxy's error page, a broken frame) raises
    :class:`ConnectionError`: what it meant is unknown, so the connection is dropped and
    the stream resumed from the last event kept, as after any other lost connection.
    """
    try:
        message = json.loads(frame)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        raise ConnectionError("the frontend sent a frame that is no JSON object")
    return message
