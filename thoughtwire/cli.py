"""The ``thoughtwire`` command: ``up``, ``api``, ``worker`` and ``chat``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

from shared.settings import Settings, SettingsError

if TYPE_CHECKING:
    from fastapi import FastAPI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="thoughtwire", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser(
        "up", help="a frontend and in-process workers (embedded Redis unless REDIS_URL)"
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--workers", type=int, default=None, help="in-process workers")

    api = commands.add_parser("api", help="one frontend on REDIS_URL")
    api.add_argument("--host", default="0.0.0.0")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--insecure", action="store_true", help="run without authentication")
    up.add_argument(
        "--insecure", action="store_true", help="listen beyond 127.0.0.1 without authentication"
    )

    token = commands.add_parser("token", help="mint a development token from JWT_SECRET")
    token.add_argument("--sub", required=True, help="the user")
    token.add_argument("--ttl", type=int, default=3600, help="seconds")

    commands.add_parser("worker", help="one agent worker on REDIS_URL")

    chat = commands.add_parser("chat", help="send a prompt and print the thoughts as they stream")
    chat.add_argument("prompt")
    chat.add_argument("--url", default="ws://127.0.0.1:8000/ws/agent-thoughts")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    if args.command == "chat":
        from thoughtwire.client import chat as run_chat

        return asyncio.run(run_chat(args.prompt, args.url))

    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        print(f"thoughtwire: {exc}", file=sys.stderr)
        return 2

    if args.command == "token":
        from api.auth import mint

        if not settings.jwt_secret:
            print("thoughtwire token needs JWT_SECRET", file=sys.stderr)
            return 2
        print(mint(settings.jwt_secret, args.sub, args.ttl))
        return 0
    if args.command == "up":
        if (
            not settings.auth_enabled
            and args.host not in ("127.0.0.1", "localhost", "::1")
            and not args.insecure
        ):
            print(
                f"thoughtwire: no authentication is configured, so listening on 127.0.0.1, not {args.host} "
                "(set JWT_SECRET, or pass --insecure)",
                file=sys.stderr,
            )
            args.host = "127.0.0.1"
        return _up(settings, args.host, args.port, args.workers)
    if settings.redis_url is None:
        print(
            f"thoughtwire {args.command} needs REDIS_URL; `thoughtwire up` runs everything in one process",
            file=sys.stderr,
        )
        return 2
    if args.command == "api":
        from api.app import create_app

        if not settings.auth_enabled and not args.insecure:
            print(
                "thoughtwire api: no authentication is configured; set JWT_SECRET (or JWT_PUBLIC_KEY, "
                "JWKS_URL), or pass --insecure to serve without it",
                file=sys.stderr,
            )
            return 2

        _serve(create_app(settings), settings, args.host, args.port)
        return 0
    from worker.main import main as worker_main

    worker_main(settings)
    return 0


def _up(settings: Settings, host: str, port: int, workers: int | None) -> int:
    from api.app import create_app
    from shared.connections import RedisFactory
    from worker.main import in_process

    settings = settings.for_embedded()
    count = workers if workers is not None else settings.embedded_workers

    def companion(factory: RedisFactory) -> AbstractAsyncContextManager[None]:
        return in_process(settings, factory, count)

    app = create_app(settings, RedisFactory(settings), companions=(companion,))
    where = (settings.redis_url and "Redis at REDIS_URL") or "embedded in-process Redis"
    auth = "authentication on" if settings.auth_enabled else "no authentication"
    print(f"thoughtwire: {count} workers, {where}, agent {settings.agent}, {auth}")
    if settings.local_origins:  # one line, so a refused page is never a mystery
        print(
            "thoughtwire: pages from files (Origin null) and localhost may connect; "
            "THOUGHTWIRE_ALLOW_LOCAL_ORIGINS=0 turns this off"
        )
    print(f"thoughtwire: open http://{host}:{port}/", flush=True)
    _serve(app, settings, host, port)
    return 0


def _serve(app: FastAPI, settings: Settings, host: str, port: int) -> None:
    from api.server import serve

    serve(app, settings, host, port)


if __name__ == "__main__":
    sys.exit(main())
