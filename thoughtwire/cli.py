"""The ``thoughtwire`` command: run the gateway's processes, mint tokens, chat from a terminal.

Every expected failure ends with one line on stderr, saying what is wrong and what
to do, and an exit code of its own (:class:`Exit`); a traceback means a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from enum import IntEnum
from importlib import metadata
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from thoughtwire.api import fastapi_lean
from thoughtwire.shared import logs, redis_import, tracing
from thoughtwire.shared.settings import (
    MAX_NUMBER,
    Settings,
    SettingsError,
    env_name,
    unknown_variables,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from thoughtwire.client import Follower, OwnRun, Refused, StateChange
    from thoughtwire.terminal import Approval

# How long `api`, `worker` and `up` try to reach Redis before they give up.
REDIS_CHECK_SECONDS = 5.0
# After Ctrl-C, how long `chat` waits for its run's `cancelled` event.
CANCEL_WAIT_SECONDS = 3.0
DEFAULT_URL = "ws://127.0.0.1:8000/ws/agent-thoughts"
MAX_PORT = 65535
# How often `chat` asks about one approval before it leaves it to the page or the API.
APPROVAL_QUESTIONS = 3
ANSWERS = {"y": "allow", "yes": "allow", "n": "deny", "no": "deny"}


class Exit(IntEnum):
    """Exit codes, one per kind of failure (listed in ``--help`` and docs/cli.md)."""

    OK = 0
    RUN_FAILED = 1  # the run ended with an error, or was cancelled elsewhere
    USAGE = 2  # bad arguments or settings
    UNAUTHORIZED = 3  # no token, or a bad or expired one (close code 4001)
    FORBIDDEN = 4  # the token does not allow this (close code 4003)
    UNREACHABLE = 5  # no frontend answered within --timeout
    REDIS_UNREACHABLE = 6  # Redis did not answer at start
    BAD_REDIS_URL = 7  # REDIS_URL cannot be read
    PORT_BUSY = 8  # the address to listen on is taken (or not ours to take)
    REFUSED = 9  # the server refused otherwise (a policy close, an error reply)
    INTERRUPTED = 130  # Ctrl-C


EXIT_HELP = {
    Exit.OK: "success",
    Exit.RUN_FAILED: "the run ended with an error, or was cancelled elsewhere",
    Exit.USAGE: "bad arguments or settings",
    Exit.UNAUTHORIZED: "no token, or a bad or expired one (close code 4001)",
    Exit.FORBIDDEN: "the token does not allow this (close code 4003)",
    Exit.UNREACHABLE: "no frontend answered within --timeout",
    Exit.REDIS_UNREACHABLE: "Redis did not answer at start",
    Exit.BAD_REDIS_URL: "REDIS_URL cannot be read",
    Exit.PORT_BUSY: "the address to listen on is taken",
    Exit.REFUSED: "the server refused the request",
    Exit.INTERRUPTED: "interrupted (Ctrl-C); chat cancels its run first",
}


class Failure(Exception):
    """An expected failure: one line for stderr, and the exit code."""

    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults beside every option; the epilog's lists kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # An option without a default (None) says what happens without it in its help.
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def environment_variables() -> list[tuple[str, Any]]:
    """``(variable, default)`` for every setting, in the order ``Settings`` declares them."""
    return [(env_name(name), info.default) for name, info in Settings.model_fields.items()]


def _epilog() -> str:
    codes = "\n".join(f"  {int(code):>3}  {text}" for code, text in EXIT_HELP.items())
    variables = "\n".join(
        f"  {name}" + ("" if default in (None, "") else f" (default: {default})")
        for name, default in environment_variables()
    )
    return (
        f"exit codes:\n{codes}\n\n"
        "environment (read by up, api, worker and token; chat reads none):\n"
        f"{variables}\n\n"
        "docs/cli.md describes each command."
    )


def _version() -> str:
    try:
        return metadata.version("thoughtwire")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    """The command line, with every subcommand and option."""
    top = argparse.ArgumentParser(
        prog="thoughtwire", description=__doc__, epilog=_epilog(), formatter_class=_Help
    )
    top.add_argument("--version", action="version", version=f"thoughtwire {_version()}")
    commands = top.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        epilog = "`thoughtwire --help` lists the exit codes and the environment variables."
        return commands.add_parser(
            name, help=text, description=text, epilog=epilog, formatter_class=_Help
        )

    up = command("up", "a frontend with in-process workers (embedded Redis unless REDIS_URL)")
    up.add_argument("--host", default="127.0.0.1", help="address to listen on")
    up.add_argument("--port", type=int, default=8000, help="port to listen on")
    up.add_argument(
        "--workers",
        type=int,
        default=None,
        help="in-process workers (THOUGHTWIRE_EMBEDDED_WORKERS)",
    )
    up.add_argument(
        "--insecure", action="store_true", help="listen beyond 127.0.0.1 without authentication"
    )

    api = command("api", "one frontend on REDIS_URL")
    api.add_argument("--host", default="0.0.0.0", help="address to listen on")
    api.add_argument("--port", type=int, default=8000, help="port to listen on")
    api.add_argument("--insecure", action="store_true", help="run without authentication")

    command("worker", "one agent worker on REDIS_URL")

    token = command("token", "mint a token signed with JWT_SECRET")
    token.add_argument("--sub", required=True, help="the user (for a viewer token: the owner)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.add_argument("--aud", default=None, help="audience claim (default: JWT_AUDIENCE)")
    token.add_argument("--iss", default=None, help="issuer claim (default: JWT_ISSUER)")
    token.add_argument("--viewer", action="store_true", help="a read-only token for one --session")
    token.add_argument("--session", default=None, help="the session a viewer token may watch")
    token.add_argument(
        "--scope",
        choices=("full", "answer"),
        default=None,
        help="what a viewer token shows: every event (full, the default), or the answer "
        "without reasoning or tool details",
    )

    chat = command("chat", "send a prompt, or follow a session, and print events as they stream")
    chat.add_argument("prompt", nargs="?", help="the prompt (none with --follow)")
    chat.add_argument(
        "--url",
        action="append",
        default=None,
        help=f"a frontend (ws:// or http:// URL); repeat to try several in turn; without it, {DEFAULT_URL}",
    )
    chat.add_argument(
        "--token",
        default=None,
        help="a token, sent as Authorization: Bearer; without it, none is sent",
    )
    chat.add_argument(
        "--session", default=None, help="continue (or with --follow, watch) a session"
    )
    chat.add_argument(
        "--follow",
        action="store_true",
        help="print --session's runs so far (from its snapshot), then live events, until Ctrl-C; no prompt",
    )
    chat.add_argument(
        "--from-start",
        action="store_true",
        help="with --follow, replay every event of the session from its first instead of its snapshot",
    )
    chat.add_argument("--json", action="store_true", help="print one JSON event per line")
    chat.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for a frontend to answer"
    )
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code."""
    args = parser().parse_args(argv)
    logs.configure("text")  # until the settings say which format
    try:
        return int(_dispatch(args))
    except Failure as failure:
        logs.announce(f"thoughtwire {args.command}: {failure.message}", logging.ERROR)
        return int(failure.code)
    except KeyboardInterrupt:
        return int(Exit.INTERRUPTED)
    except BrokenPipeError:
        if args.command not in ("chat", "token"):
            raise  # a server's own broken pipe is its failure, not a reader leaving
        # Whoever read the output has gone (`chat ... | head -1`): there is nobody left to
        # tell, and what is still buffered would fail again as Python exits.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(Exit.OK)


def _dispatch(args: argparse.Namespace) -> Exit:
    if args.command == "chat":
        return _chat(args)
    check_numbers(args)
    redis_import.install_from(os.environ)  # before anything imports redis
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        if exc.variable == "REDIS_URL":
            raise Failure(Exit.BAD_REDIS_URL, f"REDIS_URL cannot be used: {exc}") from None
        raise Failure(Exit.USAGE, str(exc)) from None
    logs.configure_from(settings)
    for line in unknown_variables(os.environ):  # docs/settings.md lists every setting
        logs.announce(f"thoughtwire {args.command}: {line}", logging.WARNING)
    if args.command == "token":
        return _token(settings, args)
    if args.command == "up":
        return _up(settings, args)
    if settings.redis_url is None:
        raise Failure(
            Exit.USAGE, "needs REDIS_URL; `thoughtwire up` runs everything in one process"
        )
    if args.command == "api":
        return _api(settings, args)
    return _worker(settings)


# --- token ------------------------------------------------------------------


def _token(settings: Settings, args: argparse.Namespace) -> Exit:
    if not settings.jwt_secret:
        raise Failure(Exit.USAGE, "needs JWT_SECRET, the secret the frontends check tokens with")
    if not args.sub.strip():
        raise Failure(Exit.USAGE, "--sub must name a user; the frontends refuse a token without")
    if not args.viewer and (args.session is not None or args.scope is not None):
        # Without --viewer the token is the user's own, for every session and for writing:
        # minted quietly, an "answer-only" token would be shared as a full owner's one.
        raise Failure(Exit.USAGE, "--session and --scope make a viewer token: add --viewer")
    if args.viewer:
        if not args.session:
            raise Failure(Exit.USAGE, "a viewer token needs --session S, the session to watch")
        from thoughtwire.api.auth import Authenticator
        from thoughtwire.shared.vocab import ViewScope

        viewer, _expires = Authenticator(settings).viewer_token(
            args.sub, args.session, args.ttl, ViewScope(args.scope or "full")
        )
        print(viewer)
        return Exit.OK
    audience = args.aud or settings.jwt_audience
    issuer = args.iss or settings.jwt_issuer
    if audience is None and issuer is None:
        from thoughtwire.api.auth import mint

        print(mint(settings.jwt_secret, args.sub, args.ttl))
        return Exit.OK
    import jwt  # only here: PyJWT with cryptography weighs on every other command

    now = int(time.time())
    claims: dict[str, Any] = {"sub": args.sub, "iat": now, "exp": now + args.ttl}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    print(jwt.encode(claims, settings.jwt_secret, algorithm="HS256"))
    return Exit.OK


# --- processes ----------------------------------------------------------------


def _up(settings: Settings, args: argparse.Namespace) -> Exit:
    host = args.host
    loopback = host in ("127.0.0.1", "localhost", "::1")
    if not settings.auth_enabled and not loopback and not args.insecure:
        logs.announce(
            f"thoughtwire: no authentication is configured, so listening on 127.0.0.1, not {host} "
            "(set JWT_SECRET, or pass --insecure)",
            logging.WARNING,
        )
        host = "127.0.0.1"
    check_tools(settings)
    check_port(host, args.port)  # before any worker starts
    if settings.redis_url is not None:
        check_redis(settings)
    fastapi_lean.install(settings.fast_paths)  # before any route is built
    from thoughtwire.api.app import create_app
    from thoughtwire.shared.redis import RedisFactory
    from thoughtwire.worker.main import in_process

    settings = settings.for_embedded()
    start_tracing(settings, "thoughtwire")
    count = args.workers if args.workers is not None else settings.embedded_workers

    def companion(factory: RedisFactory) -> AbstractAsyncContextManager[None]:
        return in_process(settings, factory, count)

    app = create_app(settings, RedisFactory(settings), companions=(companion,))
    where = redis_address(settings.redis_url) if settings.redis_url else "embedded in-process Redis"
    logs.announce(
        f"thoughtwire: {count} workers, {where}, agent {settings.agent}, "
        f"concurrency {settings.worker_concurrency}, {auth_mode(settings)}, "
        f"{fast_mode(settings, frontend=True)}"
    )
    if settings.local_origins:  # one line, so a refused page is never a mystery
        logs.announce(
            "thoughtwire: pages from files (Origin null) and localhost may connect; "
            "THOUGHTWIRE_ALLOW_LOCAL_ORIGINS=0 turns this off"
        )
    logs.announce(f"thoughtwire: open http://{host}:{args.port}/")
    _serve(app, settings, host, args.port)
    return Exit.OK


def _api(settings: Settings, args: argparse.Namespace) -> Exit:
    if not settings.auth_enabled and not args.insecure:
        raise Failure(
            Exit.USAGE,
            "no authentication is configured; set JWT_SECRET (or JWT_PUBLIC_KEY, JWKS_URL), "
            "or pass --insecure to serve without it",
        )
    check_port(args.host, args.port)
    check_redis(settings)
    fastapi_lean.install(settings.fast_paths)  # before any route is built
    from thoughtwire.api.app import create_app

    start_tracing(settings, "thoughtwire-api")
    logs.announce(
        f"thoughtwire api: {auth_mode(settings)}, {redis_address(settings.redis_url)}, "
        f"listening on {args.host}:{args.port}, {fast_mode(settings, frontend=True)}"
    )
    _serve(create_app(settings), settings, args.host, args.port)
    return Exit.OK


def _worker(settings: Settings) -> Exit:
    check_tools(settings)
    if settings.metrics_port:  # its probes: a worker without them would be restarted in a loop
        check_port("0.0.0.0", settings.metrics_port, instead=f"set {env_name('metrics_port')}")
    check_redis(settings)
    from thoughtwire.worker.main import main as worker_main

    start_tracing(settings, "thoughtwire-worker")

    logs.announce(
        f"thoughtwire worker: agent {settings.agent}, concurrency {settings.worker_concurrency}, "
        f"{redis_address(settings.redis_url)}, {fast_mode(settings, frontend=False)}"
    )
    try:
        worker_main(settings)
    finally:
        tracing.shutdown()  # what is still to export
    return Exit.OK


def _serve(app: FastAPI, settings: Settings, host: str, port: int) -> None:
    from thoughtwire.api.server import serve

    try:
        serve(app, settings, host, port)
    finally:
        tracing.shutdown()  # what is still to export


def fast_mode(settings: Settings, *, frontend: bool) -> str:
    """Whether the fast paths are on (THOUGHTWIRE_FAST_PATHS, tested versions), for a banner."""
    from thoughtwire.shared.fastpaths import mode
    from thoughtwire.shared.redis.fast import REDIS

    if not frontend:  # a worker reaches Redis only
        return mode(settings.fast_paths, REDIS, redis_import.REDIS_IMPORT)
    from thoughtwire.api.wsserver import UVICORN

    return mode(
        settings.fast_paths, UVICORN, fastapi_lean.FASTAPI, REDIS, redis_import.REDIS_IMPORT
    )


def auth_mode(settings: Settings) -> str:
    """How requests are authenticated, for a banner (never a secret)."""
    modes = [
        name
        for name, on in (
            ("JWT_SECRET (HS256)", settings.jwt_secret),
            ("JWT_PUBLIC_KEY (RS256/ES256)", settings.jwt_public_key),
            ("JWKS_URL (RS256/ES256)", settings.jwks_url),
        )
        if on
    ]
    return "authentication by " + " and ".join(modes) if modes else "no authentication"


def redis_address(url: str | None) -> str:
    """``Redis at scheme://host:port/db``: the URL without user or password."""
    if url is None:
        return "embedded in-process Redis"
    parts = urlsplit(url)
    if parts.scheme.endswith(("+cluster", "+sentinel")):
        from thoughtwire.shared.redis.topology import redact  # imports redis: only here

        return "Redis at " + redact(url)  # every node named, the passwords hidden
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    with contextlib.suppress(ValueError):
        host += f":{parts.port}" if parts.port else ""
    return "Redis at " + urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_redis_url(url: str) -> None:
    """Raise :class:`Failure` (BAD_REDIS_URL) unless ``url`` is a Redis URL that can be used."""
    parts = urlsplit(url)
    if parts.scheme.endswith(("+cluster", "+sentinel")):
        return  # its own form, which Settings checked (shared/redis/topology.py)
    problem = None
    if parts.scheme not in ("redis", "rediss", "unix"):
        problem = "it must start with redis://, rediss:// or unix://"
    elif parts.scheme == "unix":
        problem = None if parts.path else "a unix:// URL needs a socket path"
    elif not parts.hostname:
        problem = "it names no host"
    else:
        try:
            parts.port  # noqa: B018 - reading it checks it
        except ValueError:
            problem = "its port is not a number from 0 to 65535"
        if not problem and parts.path.strip("/") and not parts.path.strip("/").isdigit():
            problem = "its path must be a database number, like /0"
    if problem:
        raise Failure(
            Exit.BAD_REDIS_URL,
            f"REDIS_URL cannot be used: {problem} (for example redis://127.0.0.1:6379/0)",
        )


def check_redis(settings: Settings) -> None:
    """Raise :class:`Failure` unless REDIS_URL is readable and Redis answers a PING in time."""
    assert settings.redis_url is not None
    check_redis_url(settings.redis_url)
    problem = asyncio.run(_ping(settings))
    if problem:
        raise Failure(
            Exit.REDIS_UNREACHABLE,
            f"cannot reach {redis_address(settings.redis_url)} ({problem}); "
            "start Redis or fix REDIS_URL",
        )


async def _ping(settings: Settings) -> str | None:
    """None once Redis answers; otherwise what went wrong, within REDIS_CHECK_SECONDS."""
    from thoughtwire.shared.backoff import UNAVAILABLE, retry
    from thoughtwire.shared.redis import RedisError, RedisFactory

    redis = RedisFactory(settings).commands()
    try:
        async with asyncio.timeout(REDIS_CHECK_SECONDS):
            await retry(redis.ping, seconds=REDIS_CHECK_SECONDS)
    except TimeoutError:
        return f"no answer within {REDIS_CHECK_SECONDS:g} s"
    except (*UNAVAILABLE, RedisError, ValueError) as exc:
        return _short(exc)
    finally:
        await redis.aclose()
    return None


def _short(exc: BaseException) -> str:
    """An error's first line, without a trailing period; its class when it says nothing."""
    text = str(exc).splitlines()[0].rstrip(".") if str(exc) else ""
    return text or type(exc).__name__


def check_tools(settings: Settings) -> None:
    """Raise :class:`Failure` (USAGE) if a tool of ``THOUGHTWIRE_TOOLS`` cannot be loaded,
    or ``THOUGHTWIRE_APPROVAL_TOOLS`` names a tool no agent has: a misspelt name there
    would let the tool it meant run without asking."""
    from thoughtwire.worker.agents.simulated import TOOL
    from thoughtwire.worker.tools import ToolError, approval_names, toolbox

    known = {TOOL}  # the simulated agent's
    if settings.openai_api_key:  # the only agent that loads tools (worker/agents)
        try:
            known.update(toolbox(settings.tools, settings.approval_tools))
        except ToolError as exc:
            raise Failure(Exit.USAGE, f"{env_name('tools')}: {exc}") from None
    unknown = sorted(approval_names(settings.approval_tools) - known)
    if unknown:
        raise Failure(
            Exit.USAGE,
            f"{env_name('approval_tools')}: no tool is named {', '.join(unknown)} "
            f"(the tools: {', '.join(sorted(known))})",
        )


def start_tracing(settings: Settings, service: str) -> None:
    """Start tracing as the settings say; a trace file that cannot be opened is USAGE."""
    try:
        tracing.configure(settings, service)
    except OSError as exc:
        raise Failure(
            Exit.USAGE,
            f"{env_name('trace_file')}={settings.trace_file!r} cannot be opened "
            f"({exc.strerror or _short(exc)})",
        ) from None


def check_numbers(args: argparse.Namespace) -> None:
    """Raise :class:`Failure` (USAGE) for a ``--port``, ``--workers`` or ``--ttl`` out of range.

    getaddrinfo takes a port past 65535 modulo 65536: 99999 would listen on 34463.
    """
    port = getattr(args, "port", None)
    if port is not None and not 0 <= port <= MAX_PORT:
        raise Failure(Exit.USAGE, f"--port {port}: must be 0 to {MAX_PORT}")
    workers = getattr(args, "workers", None)
    if workers is not None and workers < 0:
        raise Failure(Exit.USAGE, f"--workers {workers}: must be 0 or more")
    ttl = getattr(args, "ttl", None)  # a token dead already, or one that never expires
    if ttl is not None and not 1 <= ttl <= MAX_NUMBER:
        raise Failure(Exit.USAGE, f"--ttl {ttl}: must be 1 to {MAX_NUMBER} seconds")


def check_port(host: str, port: int, instead: str = "pass another --port") -> None:
    """Raise :class:`Failure` (PORT_BUSY) if ``host:port`` cannot be listened on now.

    SO_REUSEADDR as uvicorn sets it, so a port a previous run left in TIME_WAIT is free.
    """
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (OSError, UnicodeError) as exc:
        raise Failure(Exit.USAGE, f"cannot listen on {host!r}: {_short(exc)}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise Failure(
                Exit.PORT_BUSY,
                f"cannot listen on {host}:{port} ({exc.strerror or _short(exc)}); "
                f"stop what holds it or {instead}",
            ) from None


# --- chat -------------------------------------------------------------------


def _chat(args: argparse.Namespace) -> Exit:
    if args.follow and not args.session:
        raise Failure(Exit.USAGE, "--follow needs --session S, the session to watch")
    if not args.follow and not args.prompt:
        raise Failure(Exit.USAGE, "give a prompt, or --follow a --session")
    if args.from_start and not args.follow:
        raise Failure(Exit.USAGE, "--from-start goes with --follow")
    if not 0 < args.timeout < math.inf:  # NaN too: it never timed out
        raise Failure(Exit.USAGE, "--timeout must be more than 0 seconds")
    try:
        chat = Chat(args)
    except ValueError as exc:  # a --url no socket can be opened to
        raise Failure(Exit.USAGE, f"--url: {exc}") from None
    return asyncio.run(chat.run())


class Chat:
    """``thoughtwire chat``: one prompt's run (or, with --follow, a whole session) printed live."""

    def __init__(self, args: argparse.Namespace, out: TextIO = sys.stdout) -> None:
        from thoughtwire.client import Follower

        self.args = args
        self.urls: list[str] = args.url or [DEFAULT_URL]
        self.out = out
        from thoughtwire.terminal import Transcript

        self.own: OwnRun | None = None  # which events are this command's prompt's run
        self.was_connected = False
        color = out.isatty() and "NO_COLOR" not in os.environ
        self.transcript = Transcript(out, color=color, headers=args.follow)
        self.asking: dict[str, asyncio.Task[None]] = {}  # call_id -> its question on stdin
        self.stdin = StdinLines()
        self.follower: Follower = Follower(
            self.urls,
            args.session,
            # A watcher sees the session so far as one snapshot (or, --from-start, every
            # event of its log), then live; a reconnect resumes from what it has.
            after=0 if args.follow and args.from_start else None,
            token=args.token,
            timeout=args.timeout,
            open_timeout=min(args.timeout, 5.0),
            greeting_timeout=args.timeout,
            max_reconnects=1_000_000,  # --timeout decides when to give up
            on_state=self._state,
        )

    async def run(self) -> Exit:
        """Stream until the run ends (or Ctrl-C); Ctrl-C cancels the run, then exits 130."""
        interrupted = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
        stream = asyncio.create_task(self._stream(), name="chat-stream")
        waiter = asyncio.create_task(interrupted.wait(), name="chat-interrupt")
        try:
            await asyncio.wait({stream, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if stream.done():
                return stream.result()
            await self._interrupt(stream, interrupted)
            return Exit.INTERRUPTED
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            tasks = (stream, waiter, *self.asking.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _interrupt(self, stream: asyncio.Task[Exit], interrupted: asyncio.Event) -> None:
        """Cancel the run and wait a little for its `cancelled` event; a second Ctrl-C skips it."""
        self._line()
        if self.args.follow:
            print("thoughtwire chat: stopped following", file=sys.stderr, flush=True)
            return
        interrupted.clear()
        if self.own is None:  # before the prompt was handed to the client: nothing to cancel
            print("thoughtwire chat: interrupted before the prompt was sent", file=sys.stderr)
            return
        await self.follower.cancel(key=self.own.key)  # its own run, nobody else's
        again = asyncio.create_task(interrupted.wait())
        try:
            await asyncio.wait({stream, again}, timeout=CANCEL_WAIT_SECONDS)
        finally:
            again.cancel()
        ended = stream.done() and not stream.cancelled() and stream.exception() is None
        what = "the run was cancelled" if ended else "asked the server to cancel the run"
        print(f"thoughtwire chat: interrupted; {what}", file=sys.stderr, flush=True)

    async def _stream(self) -> Exit:
        from thoughtwire.client import OwnRun, Refused

        try:
            if not self.args.follow:
                self.own = OwnRun(self.follower, await self.follower.prompt(self.args.prompt))
            async for event in self.follower.events(queued=self.own is not None):
                for shown in [event] if self.own is None else self.own.events(event):
                    ended = self._show(shown)
                    if ended is not None:
                        return ended
        except Refused as exc:
            raise self._failure(exc) from None
        return Exit.OK

    def _show(self, event: dict[str, Any]) -> Exit | None:
        """Print one event; the exit code once this command's run has ended."""
        kind = event["type"]
        if self.args.json:
            print(json.dumps(event, ensure_ascii=False), file=self.out, flush=True)
            waiting = [_approval_of(event)] if kind == "approval" else []
        else:
            waiting = self._print(event)
        self._settle(event, waiting)
        if self.args.follow or kind not in ("done", "error", "cancelled"):
            return None
        return Exit.OK if kind == "done" else Exit.RUN_FAILED

    def _print(self, event: dict[str, Any]) -> list[Approval]:
        """Draw what the event changed in its run, from the follower's folded state; the
        approvals newly waiting."""
        if event["type"] == "gap":
            self._line()
            self.out.write(f"⚠️  some events could not be recovered ({event['reason']})\n")
            self.out.flush()
            return []
        folded = self.follower.folded
        if event["type"] == "snapshot":  # the session so far: each of its runs
            return [a for run in folded["order"] for a in self.transcript.show(folded["runs"][run])]
        run = folded["runs"].get(event.get("run"))
        return [] if run is None else self.transcript.show(run)

    def _line(self) -> None:
        """End the open line (reasoning or answer), if there is one."""
        self.transcript.close()
        self.out.flush()

    # --- approvals ------------------------------------------------------------

    def _settle(self, event: dict[str, Any], waiting: list[Approval]) -> None:
        """Ask about new approvals (not when following); stop asking once one is decided."""
        if not self.args.follow:
            for call in waiting:
                if call.call_id not in self.asking:
                    self.asking[call.call_id] = asyncio.create_task(
                        self._ask(call), name=f"chat-approval-{call.call_id}"
                    )
        kind = event["type"]
        if kind in ("decision", "done", "error", "cancelled"):
            decided = [event.get("call_id")] if kind == "decision" else list(self.asking)
            for call_id in decided:
                task = self.asking.get(str(call_id))
                if task is not None and not task.done():
                    task.cancel()
                    print(file=sys.stderr, flush=True)  # end the unanswered question's line

    async def _ask(self, call: Approval) -> None:
        """Ask on stdin whether the call may run (y/n, then an optional reason) and send it."""
        for _ in range(APPROVAL_QUESTIONS):
            print(
                f"thoughtwire chat: allow {call.tool} {call.arguments}? [y/n, then a reason if you like] ",
                end="",
                file=sys.stderr,
                flush=True,
            )
            line = await self.stdin.readline()
            if line is None:
                print(
                    f"\nthoughtwire chat: nothing to read an answer from; allow or deny it on the page "
                    f"or with POST /v1/runs/{call.run}/approvals/{call.call_id}",
                    file=sys.stderr,
                    flush=True,
                )
                return
            word, _, reason = line.strip().partition(" ")
            decision = ANSWERS.get(word.lower().rstrip(",:"))
            if decision is not None:
                await self._approve(call, decision, reason.strip() or None)
                return

    async def _approve(self, call: Approval, decision: str, reason: str | None) -> None:
        from thoughtwire.client import Refused

        try:
            await self.follower.approve(call.run, call.call_id, decision, reason)
        except Refused as exc:
            print(f"thoughtwire chat: the decision was not sent ({exc.reason})", file=sys.stderr)

    def _state(self, change: StateChange) -> None:
        """Say on stderr when an established connection is lost and when it is back."""
        from thoughtwire.client import State

        if change.state == State.CONNECTED:
            self.was_connected = True
        elif change.state == State.RECONNECTING and self.was_connected:
            self.was_connected = False
            why = f"closed with {change.code}" if change.code else change.reason
            print(f"thoughtwire chat: connection lost ({why}); reconnecting", file=sys.stderr)
        elif change.state == State.RESUMED:
            self.was_connected = True
            gap = " after a gap" if change.gap else ""
            print(f"thoughtwire chat: resumed on {_public(change.url)}{gap}", file=sys.stderr)

    def _failure(self, exc: Refused) -> Failure:
        from thoughtwire.client import Unreachable

        self._line()
        if isinstance(exc, Unreachable):
            where = ", ".join(_public(url) for url in self.urls)
            last = f" (last try: {exc.last})" if exc.last else ""
            return Failure(
                Exit.UNREACHABLE,
                f"no frontend answered at {where} within {self.args.timeout:g} s{last}; "
                "check --url and that a frontend runs there (or raise --timeout)",
            )
        if exc.code == 4001:
            return Failure(
                Exit.UNAUTHORIZED,
                f"not authenticated ({exc.reason}); pass a valid --token "
                "(`thoughtwire token --sub NAME` mints one from JWT_SECRET)",
            )
        if exc.code == 4003:
            return Failure(
                Exit.FORBIDDEN,
                f"forbidden ({exc.reason}); this token cannot do that "
                "(a viewer token can only watch: use --follow)",
            )
        what = f"closed with {exc.code}" if exc.code else exc.error or "error"
        return Failure(Exit.REFUSED, f"the server refused ({what}: {exc.reason})")


def _approval_of(event: dict[str, Any]) -> Approval:
    from thoughtwire.terminal import Approval, arguments_text

    return Approval(
        str(event.get("run")),
        str(event.get("call_id")),
        str(event.get("tool")),
        arguments_text(event),
    )


class StdinLines:
    """Lines typed on stdin, read without blocking the event loop; None once it ends.

    A pipe or a terminal is watched with ``add_reader``; a file or /dev/null (which
    epoll cannot watch) is read directly, as reading it never blocks.
    """

    MAX_LINE = 64 * 1024

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd
        self.buffer = b""
        self.ended = False

    async def readline(self) -> str | None:
        """The next line, without its newline; None at the end of stdin."""
        while b"\n" not in self.buffer and not self.ended:
            chunk = await self._read()
            self.ended = not chunk or len(self.buffer) > self.MAX_LINE
            self.buffer += chunk
        if b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
        else:
            line, self.buffer = self.buffer, b""
            if not line:
                return None
        return line.decode(errors="replace")

    async def _read(self) -> bytes:
        try:
            fd = sys.stdin.fileno() if self.fd is None else self.fd
        except (AttributeError, ValueError, OSError):
            return b""  # no stdin at all
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        try:
            loop.add_reader(fd, readable)
        except (OSError, ValueError):
            return os.read(fd, 4096)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        return os.read(fd, 4096)


def _public(url: str | None) -> str:
    """A URL without its query (where a token may be) or credentials."""
    if not url:
        return "?"
    parts = urlsplit(url)
    host = parts.hostname or ""
    with contextlib.suppress(ValueError):
        host += f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


if __name__ == "__main__":
    sys.exit(main())
