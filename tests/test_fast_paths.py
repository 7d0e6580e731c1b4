"""The fast paths: one adapter per dependency, a switch, a version check, and canaries.

Each adapter (api/wsserver.py for uvicorn, shared/redis/fast.py for redis-py,
api/fastapi_lean.py for FastAPI) is the only code that touches its dependency's private API; ``THOUGHTWIRE_FAST_PATHS=0`` or an
untested release turns its fast paths off, and the public APIs carry everything.
"""

import asyncio
import contextlib
import inspect
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import uvicorn
import websockets
from redis.asyncio import Redis
from redis.exceptions import NoScriptError
from starlette.websockets import WebSocket
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from tests.conftest import start_cluster
from tests.procs import seconds, wait_until
from tests.wsclient import connect, greeting, run_events
from thoughtwire.api import fastapi_lean, wsserver
from thoughtwire.api.lane import Gateway, SocketRoutes
from thoughtwire.api.wire import SCOPE_KEY, RawSocket
from thoughtwire.shared import fastpaths, redis_import
from thoughtwire.shared.fastpaths import Adapter
from thoughtwire.shared.redis import Batcher, RedisFactory, fast
from thoughtwire.shared.redis.pubsub import ClientLink, RawLink, open_link
from thoughtwire.shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = {"api/wsserver.py", "shared/redis/fast.py", "api/fastapi_lean.py"}
# A dependency's private API, as the code would reach it.
PRIVATE = re.compile(
    r"redis\._parsers|uvicorn\.protocols|fastapi\._compat|__self__|(?<!self)\._(writer|reader)\b"
)


@pytest.fixture
def switch(monkeypatch):
    """The Redis switch as it was before the test, whatever factories the test builds."""
    monkeypatch.setattr(fast, "_switch", fast._switch)


def _untested(monkeypatch, adapter_module, name):
    """Pretend every installed release is one the adapter was not tested on."""
    monkeypatch.setattr(fastpaths, "installed", lambda distribution: "99.0.0")
    adapter = getattr(adapter_module, name)
    fresh = Adapter(adapter.name, dict(adapter.tested))
    monkeypatch.setattr(adapter_module, name, fresh)
    return fresh


# --- one adapter per dependency ----------------------------------------------------


def test_only_the_adapters_reach_into_a_dependencys_private_api():
    """Every reach into uvicorn's, redis-py's or FastAPI's internals is in its adapter."""
    found = []
    for folder in ("api", "worker", "shared"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative in ADAPTERS:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if PRIVATE.search(line) and not line.lstrip().startswith("#"):
                    found.append(f"{relative}:{number}: {line.strip()}")
    assert not found, "private API outside its adapter:\n" + "\n".join(found)


def test_each_adapter_names_the_versions_it_was_tested_on():
    """The installed uvicorn and redis-py are the tested ones (else the canaries below say what
    changed), and pyproject's upper bounds stop a release nobody tested."""
    for adapter in (wsserver.UVICORN, fast.REDIS, fastapi_lean.FASTAPI, redis_import.REDIS_IMPORT):
        assert adapter.untested() == [], f"{adapter.name}: {adapter.untested()}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"uvicorn\[standard\]>=[\d.]+,<[\d.]+"|"uvicorn>=[\d.]+,<[\d.]+"', pyproject)
    assert re.search(r'"redis\[hiredis\]>=[\d.]+,<[\d.]+"', pyproject)


# --- the switch ----------------------------------------------------------------------


def test_the_switch_off_hands_uvicorn_its_own_protocol():
    """THOUGHTWIRE_FAST_PATHS=0: uvicorn's websockets-sansio protocol, never the lighter one
    (with only the close to a stalled client added, a guarantee rather than a speed-up)."""
    assert wsserver.ws_protocol(Settings(fast_paths=True)) is wsserver.PROTOCOL
    public = wsserver.ws_protocol(Settings(fast_paths=False))
    # uvicorn's own protocol; only the close to a stalled client (4008) and the handshake's
    # deadline (let go once answered) are added, in both modes.
    assert public is wsserver.PUBLIC_PROTOCOL and public.__bases__ == (WebSocketsSansIOProtocol,)
    assert set(vars(public)) - {"__module__", "__doc__", "__qualname__", "__annotations__"} <= {
        "send",
        "_close_now",
        "_abandon",
        "handshake_timer",
        "connection_lost",
        "_stop_handshake_timer",
    }, vars(public)
    # The HTTP bounds are security, not speed: the same protocol either way.
    on = wsserver.http_protocol(Settings(fast_paths=True))
    off = wsserver.http_protocol(Settings(fast_paths=False))
    assert issubclass(on, wsserver.HTTP_PROTOCOL) and issubclass(off, wsserver.HTTP_PROTOCOL)


async def test_the_switch_off_sends_every_call_through_redis_pys_pipeline(redis_server, switch):
    """With the switch off, the batcher never takes a connection over: its calls go through
    redis-py's public ``Pipeline``, and still run in order."""
    RedisFactory(Settings(redis_url=redis_server.url, fast_paths=False))
    client = Redis.from_url(redis_server.url)
    try:
        batcher = Batcher(client)
        replies = await asyncio.gather(
            *(batcher.commands((b"INCR", b"fastpaths:off")) for _ in range(20))
        )
        assert [r[0] for r in replies] == list(range(1, 21))
        assert batcher._own_reader is False and batcher._line is None
        await client.delete(b"fastpaths:off")
    finally:
        await client.aclose()


async def test_the_switch_off_reads_pub_sub_through_redis_pys_pubsub(redis_server):
    """With the switch off, the hub's link is redis-py's ``PubSub``; on, the raw link."""
    messages: list[tuple[bytes, bytes, bytes | None]] = []
    got = asyncio.Event()

    def on_message(kind, channel, data):
        messages.append((kind, channel, data))
        if kind == b"message":
            got.set()

    for on, kind in ((False, ClientLink), (True, RawLink)):
        factory = RedisFactory(Settings(redis_url=redis_server.url, fast_paths=on))
        link = await open_link(factory, on_message)
        try:
            assert isinstance(link, kind)
            await link.subscribe(b"fastpaths:channel")
            publisher = Redis.from_url(redis_server.url)
            try:
                async with asyncio.timeout(seconds(5)):
                    while not got.is_set():  # until the subscription is in place
                        await publisher.publish(b"fastpaths:channel", b"hello")
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.05):
                                await got.wait()
            finally:
                await publisher.aclose()
            assert (b"message", b"fastpaths:channel", b"hello") in messages
            got.clear()
        finally:
            await link.close()


# --- the version check ---------------------------------------------------------------


def test_an_untested_uvicorn_warns_once_and_takes_the_public_path(monkeypatch, caplog):
    """A uvicorn release not in the adapter's tested versions: one warning, uvicorn's protocol."""
    _untested(monkeypatch, wsserver, "UVICORN")
    with caplog.at_level(logging.WARNING, logger="thoughtwire.fastpaths"):
        for _ in range(3):
            assert wsserver.ws_protocol(Settings(fast_paths=True)) is wsserver.PUBLIC_PROTOCOL
    warnings = [r.getMessage() for r in caplog.records if r.name == "thoughtwire.fastpaths"]
    assert len(warnings) == 1, warnings
    assert "uvicorn 99.0.0 (tested: 0.54" in warnings[0], warnings


async def test_an_untested_redis_py_warns_once_and_takes_the_public_path(
    monkeypatch, caplog, redis_server, switch
):
    """A redis-py release not tested: one warning, redis-py's Pipeline and PubSub."""
    _untested(monkeypatch, fast, "REDIS")
    factory = RedisFactory(Settings(redis_url=redis_server.url, fast_paths=True))
    client = Redis.from_url(redis_server.url)
    with caplog.at_level(logging.WARNING, logger="thoughtwire.fastpaths"):
        try:
            assert Batcher(client)._own_reader is False
            assert Batcher(client)._own_reader is False
            link = await open_link(factory, lambda *message: None)
            assert isinstance(link, ClientLink)
            await link.close()
        finally:
            await client.aclose()
    warnings = [r.getMessage() for r in caplog.records if r.name == "thoughtwire.fastpaths"]
    assert len(warnings) == 1, warnings
    assert "redis 99.0.0 (tested: 8.1.0)" in warnings[0], warnings


def test_the_banner_word_says_which_adapters_are_on(monkeypatch):
    """What each process's banner line says about its fast paths."""
    assert fastpaths.mode(False, wsserver.UVICORN, fast.REDIS) == "fast paths off"
    assert fastpaths.mode(True, wsserver.UVICORN, fast.REDIS) == "fast paths on"
    untested = _untested(monkeypatch, fast, "REDIS")
    assert fastpaths.mode(True, wsserver.UVICORN, untested) == (
        "fast paths on, except redis-py (untested versions)"
    )


# --- the canaries: fail loudly when the internals move --------------------------------


def test_uvicorn_canary_the_websocket_protocol_still_has_what_the_fast_paths_use():
    """SocketProtocol swaps uvicorn's queue and flag, drops the handshake, and RawSocket
    writes under ASGI: each name they lean on is still set by uvicorn's protocol."""
    source = inspect.getsource(WebSocketsSansIOProtocol)
    for name in (
        "self.queue",
        "self.writable",
        "self.request",
        "self.response",
        "self.handshake_complete",
        "self.close_sent",
        "self.conn",
        "self.transport",
        "self.loop",
        "self.disconnected",
    ):
        assert name in source, f"uvicorn's WebSocketsSansIOProtocol no longer has {name}"
    assert "self.writable.wait()" in source and "self.queue.put_nowait" in source
    assert "self.queue.get()" in source
    assert inspect.iscoroutinefunction(WebSocketsSansIOProtocol.send)
    assert wsserver.PROTOCOL is not wsserver.PUBLIC_PROTOCOL


def test_fastapi_canary_its_pydantic_v1_checks_are_still_where_the_fast_path_swaps_them():
    """FastAPI asks ``fastapi._compat.shared`` whether a parameter's class is a pydantic.v1
    model, and ``fastapi.encoders`` binds the instance check by name."""
    from fastapi import encoders, utils
    from fastapi._compat import shared

    assert "is_pydantic_v1_model_class(" in inspect.getsource(shared.annotation_is_pydantic_v1)
    assert "annotation_is_pydantic_v1(" in inspect.getsource(utils.create_model_field)
    assert "is_pydantic_v1_model_instance(obj)" in inspect.getsource(encoders.jsonable_encoder)
    for name in ("is_pydantic_v1_model_class", "is_pydantic_v1_model_instance"):
        assert callable(getattr(shared, name))
    assert callable(encoders.is_pydantic_v1_model_instance)


def test_the_fastapi_fast_path_answers_as_fastapi_does():
    """A pydantic.v1 model is still one; nothing else is, generics included."""
    import warnings

    import pydantic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pydantic import v1

    class Old(v1.BaseModel):
        x: int = 0

    class New(pydantic.BaseModel):
        x: int = 0

    assert fastapi_lean._v1_model_class(Old) and fastapi_lean._v1_model_instance(Old())
    for other in (New, str, list[int], dict[str, Old], None, 3):
        assert not fastapi_lean._v1_model_class(other), other
    assert not fastapi_lean._v1_model_instance(New()) and not fastapi_lean._v1_model_instance(Old)


BUILD_APP = """
import sys
from thoughtwire.api import fastapi_lean
took = fastapi_lean.install(sys.argv[1] == "on")
from thoughtwire.api.app import create_app
from thoughtwire.shared.settings import Settings
create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
print(took, "pydantic.v1" in sys.modules)
"""


def python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``code`` run by a fresh interpreter with ``args``: imports start from nothing."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=seconds(60),
        check=True,
    )


@pytest.mark.parametrize("switch", ["on", "off"])
def test_with_the_fast_path_a_frontend_never_imports_pydantic_v1(switch):
    """Building every route imports pydantic.v1 only when FastAPI's own check runs."""
    out = python(BUILD_APP, switch).stdout.split()
    assert out == (["True", "False"] if switch == "on" else ["False", "True"]), out


IMPORT_REDIS = """
import sys
from thoughtwire.shared import redis_import
from thoughtwire.shared.fastpaths import Adapter
if sys.argv[1] == "untested":
    redis_import.REDIS_IMPORT = Adapter("redis-py import", {"redis": "99.0.0"})
took = redis_import.install(sys.argv[1] != "off")
import thoughtwire.shared.redis
import redis.observability.providers as providers
held = "opentelemetry.sdk.metrics" in sys.modules
from opentelemetry.sdk.metrics import MeterProvider  # still there for whoever wants it
print(took, held, providers.OTEL_AVAILABLE)
"""


@pytest.mark.parametrize("switch", ["on", "off", "untested"])
def test_with_the_fast_path_redis_py_comes_without_the_opentelemetry_metrics_sdk(switch):
    """redis-py, first imported by the fast path, holds no metrics SDK and takes its own
    OpenTelemetry metrics as unavailable; the SDK can still be imported afterwards. Off,
    or with an untested redis-py, redis-py is imported as it is, and nothing is said yet
    (the process's banner check warns, once logging is set up)."""
    done = python(IMPORT_REDIS, switch)
    out = done.stdout.split()
    assert out == (["True", "False", "False"] if switch == "on" else ["False", "True", "True"])
    assert done.stderr == ""


def test_redis_import_canary_redis_py_still_takes_a_failed_sdk_import_as_no_sdk():
    """redis-py's provider module imports the metrics SDK inside ``try``/``except
    ImportError``: were it to need it, the fast path would break ``import redis``."""
    import redis.observability.providers as providers

    source = inspect.getsource(providers)
    guarded = re.search(
        r"try:\n\s+from opentelemetry\.sdk\.metrics import MeterProvider\n"
        r"(?:.*\n)*?except ImportError:",
        source,
    )
    assert guarded, "redis-py now imports the metrics SDK differently: check shared/redis_import.py"
    assert redis_import.DECLINED == "opentelemetry.sdk.metrics"


def test_a_process_started_by_the_cli_holds_no_opentelemetry_metrics_sdk(tmp_path):
    """``thoughtwire up``, a frontend and its workers' code, never imports the metrics SDK."""
    script = tmp_path / "up.py"
    script.write_text(
        "import sys, runpy\n"
        "import thoughtwire.cli as cli\n"
        "def serve(app, settings, host, port):\n"
        "    print('metrics sdk', 'opentelemetry.sdk.metrics' in sys.modules, flush=True)\n"
        "cli._serve = serve\n"
        "sys.exit(cli.main(['up', '--port', sys.argv[1], '--workers', '1']))\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = subprocess.run(
        [sys.executable, str(script), str(port)],
        capture_output=True,
        text=True,
        timeout=seconds(60),
        env={
            **{k: v for k, v in os.environ.items() if k != "REDIS_URL"},
            "THOUGHTWIRE_FAST_PATHS": "1",
        },
    )
    assert "metrics sdk False" in out.stdout, out.stdout + out.stderr


def test_redis_canary_the_connection_internals_are_still_there():
    """The batcher's line finds the transport under redis-py's connection by its ``_writer``
    and ``_reader``; error replies map through redis-py's ``BaseParser``."""
    from redis.asyncio.connection import Connection

    source = inspect.getsource(Connection.__mro__[1])
    assert "self._writer" in source and "self._reader" in source
    assert isinstance(fast.parse_error("NOSCRIPT No matching script."), NoScriptError)


async def test_redis_canary_a_live_connection_can_be_taken_over(redis_server):
    """A connection redis-py opened has a transport hiredis can read (or the line falls back)."""
    client = Redis.from_url(redis_server.url)
    try:
        connection = await client.connection_pool.get_connection()
        try:
            await connection.connect()
            transport = fast.transport_of(connection)
            assert transport is not None, "redis-py's connection layout changed"
            assert hasattr(transport, "set_protocol") and hasattr(transport, "get_protocol")
        finally:
            await client.connection_pool.release(connection)
    finally:
        await client.aclose()


# --- end to end, with the switch off -------------------------------------------------


def _app(seen: list[bool]) -> Gateway:
    routes = SocketRoutes()
    app = Gateway(socket_routes=routes)

    @routes.route("/frames")
    async def frames(websocket: WebSocket) -> None:
        await websocket.accept()
        seen.append(SCOPE_KEY in websocket.scope or RawSocket.of(websocket) is not None)
        await websocket.send_text("hello")
        await websocket.receive()

    return app


@pytest.mark.parametrize("on", [True, False])
async def test_raw_frames_only_with_the_fast_paths_on(on):
    """Under uvicorn's own protocol no socket is exposed for raw writes: ASGI carries all."""
    seen: list[bool] = []
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        _app(seen),
        host="127.0.0.1",
        port=port,
        ws=wsserver.ws_protocol(Settings(fast_paths=on)),
        log_level="warning",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(seconds(10)):
            while not server.started:
                await asyncio.sleep(0.01)
            async with websockets.connect(f"ws://127.0.0.1:{port}/frames") as ws:
                assert await ws.recv() == "hello"
    finally:
        server.should_exit = True
        await task
    assert seen == [on]


def test_a_cluster_with_the_fast_paths_off_streams_and_says_so(redis_server, logdir):
    """A frontend and a worker started with THOUGHTWIRE_FAST_PATHS=0 stream a run end to end,
    and each says in its banner that its fast paths are off."""
    cluster = start_cluster(
        redis_server, logdir, frontends=1, workers=1, THOUGHTWIRE_FAST_PATHS="0"
    )
    try:

        async def one_run() -> list[dict]:
            async with connect(cluster.frontends[0].ws + "/ws/agent-thoughts") as ws:
                await greeting(ws)
                await ws.send("What is machine learning?")
                return await run_events(ws)

        events = asyncio.run(one_run())
        assert events[-1]["type"] == "done", events[-1]
        for proc in (cluster.frontends[0].proc, cluster.workers[0]):
            wait_until(lambda p=proc: "fast paths off" in p.output(), seconds(5), "a banner")
    finally:
        cluster.stop()
