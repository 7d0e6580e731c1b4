"""Sentinel failovers mid-stream, against real processes.

Two frontends and two workers find the master through three sentinels
(tests/redis_sentinel.py). Several sessions stream, each watched by a client on either
frontend, when the master is switched by ``SENTINEL FAILOVER`` or killed with -9. Every
client must end with its session's whole stream: each seq once, in order, within an
epoch, a new epoch only after an explicit ``gap``; and no two clients may hold
different events under one ``(epoch, seq)``. Every wait is bounded; every process is
stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any
from unittest.mock import ANY

import httpx
import pytest
import redis

from tests.conftest import Cluster, sim_run, start_cluster
from tests.procs import make_logdir, seconds
from tests.redis_sentinel import SentinelDeployment, sentinel_deployment  # noqa: F401
from tests.wsclient import connect, greeting, run_events
from thoughtwire.api.frontend import Frontend
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.redis import Batcher, RedisConnectionError, RedisFactory
from thoughtwire.shared.redis.pubsub import RawLink, open_link
from thoughtwire.shared.settings import Settings

TOKENS = 250  # at 50 a second: runs of about 5 s, past a failover's few seconds
SESSIONS = 3
TERMINAL = ("done", "error", "cancelled")

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def deployed(
    request: pytest.FixtureRequest,
    sentinel_deployment: SentinelDeployment,  # noqa: F811
    logdir,
) -> Iterator[Cluster]:
    """Two frontends and two workers on the Sentinel deployment's master; the fast paths
    off when the test asks for ``"public"``, else as ``THOUGHTWIRE_FAST_PATHS`` says."""
    public = getattr(request, "param", "fast") == "public"
    cluster = start_cluster(
        sentinel_deployment,  # type: ignore[arg-type]  # it has the ``url`` they need
        logdir,
        frontends=2,
        workers=2,
        **({"THOUGHTWIRE_FAST_PATHS": "0"} if public else {}),  # else as the run says
        THOUGHTWIRE_LEASE_SECONDS="3",
        THOUGHTWIRE_SIM_STEP_DELAY="0.02",
        THOUGHTWIRE_SIM_ANSWER_TOKENS=str(TOKENS),
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="50",
    )
    yield cluster
    cluster.stop()


class Watcher:
    """A client on one session through one frontend, keeping every message it gets."""

    def __init__(self, ws: Any, session: str) -> None:
        self.ws = ws
        self.session = session
        self.messages: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for frame in self.ws:  # until the test closes the socket
            self.messages.append(json.loads(frame))

    def events(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if "seq" in m]

    def position(self) -> tuple[str, int] | None:
        events = self.events()
        return (events[-1]["epoch"], events[-1]["seq"]) if events else None


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` (every 50 ms) until it is truthy, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + seconds(timeout)
    while not (result := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return result


def log_end(deployment: SentinelDeployment, prefix: str, session: str) -> tuple[str, int] | None:
    """The ``(epoch, seq)`` of the session log's last event on the master, once terminal."""
    try:
        with deployment.master_server().client() as client:
            entries = client.xrevrange(Keys(prefix).session_log(session), count=1)
    except (redis.RedisError, RuntimeError, KeyError):
        return None  # no master named yet, or it does not answer
    if not entries:
        return None
    event = json.loads(entries[0][1][b"e"])
    return (event["epoch"], event["seq"]) if event["type"] in TERMINAL else None


def assert_whole_stream(watcher: Watcher) -> int:
    """Seqs 1, 2, ... once each in their epoch; a new epoch only after a ``gap``. Returns
    the number of gaps."""
    epoch, last, gaps = None, 0, 0
    for m in watcher.messages:
        if m["type"] == "gap":
            epoch, last, gaps = m["epoch"], m["next"] - 1, gaps + 1
            continue
        if "seq" not in m:
            continue
        epoch = epoch or m["epoch"]
        assert m["epoch"] == epoch, f"the epoch changed without a gap: {m}"
        assert m.get("from_seq", m["seq"]) == last + 1, f"expected seq {last + 1}, got {m}"
        last = m["seq"]
    return gaps


def assert_one_event_per_position(watchers: list[Watcher]) -> None:
    """No two clients of a session got different events under one ``(epoch, seq)``."""
    seen: dict[tuple[str, str, int], str] = {}
    for watcher in watchers:
        for event in watcher.events():
            if "from_seq" in event:
                continue  # merged deltas: their seqs are checked one by one above
            key = (watcher.session, event["epoch"], event["seq"])
            body = json.dumps(event, sort_keys=True)
            assert seen.setdefault(key, body) == body, f"two events at {key}"


@contextlib.asynccontextmanager
async def streaming(cluster: Cluster):  # type: ignore[no-untyped-def]
    """SESSIONS sessions, each prompted through one frontend and watched through the other;
    yields the prompters' and viewers' watchers once every run has streamed a while."""
    stack = contextlib.AsyncExitStack()
    watchers: list[Watcher] = []
    prompters: list[Any] = []
    try:
        for i in range(SESSIONS):
            a, b = cluster.frontends[i % 2], cluster.frontends[(i + 1) % 2]
            prompter = await stack.enter_async_context(connect(a.ws + "/ws/agent-thoughts"))
            session = await greeting(prompter)
            viewer = await stack.enter_async_context(
                connect(f"{b.ws}/ws/agent-thoughts?session={session}")
            )
            await greeting(viewer)
            prompters.append(prompter)
            watchers += [Watcher(prompter, session), Watcher(viewer, session)]
        for i, prompter in enumerate(prompters):
            await prompter.send(f"a long answer, session {i}")
        await until(lambda: all(len(w.events()) >= 30 for w in watchers), 30, "every run to stream")
        yield watchers
    finally:
        for watcher in watchers:
            watcher.task.cancel()
        await asyncio.gather(*(w.task for w in watchers), return_exceptions=True)
        await stack.aclose()


async def assert_every_client_whole(
    deployment: SentinelDeployment, cluster: Cluster, watchers: list[Watcher]
) -> int:
    """Wait for each session's run to end in the log, and for every client to reach that
    end; then check every stream. Returns the number of gaps the clients got."""
    ends = {}
    for session in {w.session for w in watchers}:
        ends[session] = await until(
            lambda s=session: log_end(deployment, cluster.prefix, s), 60, "the run to end"
        )
    await until(
        lambda: all(w.position() == ends[w.session] for w in watchers),
        30,
        "every client to reach its session's end",
    )
    gaps = sum(assert_whole_stream(w) for w in watchers)
    assert_one_event_per_position(watchers)
    reasons = sorted({m["reason"] for w in watchers for m in w.messages if m["type"] == "gap"})
    print(f"{len(watchers)} clients, {gaps} gaps {reasons}")
    return gaps


async def ready_status(http: httpx.AsyncClient, url: str) -> int:
    try:
        return (await http.get(url + "/readyz", timeout=2)).status_code
    except httpx.HTTPError:
        return 0


async def ready_within(http: httpx.AsyncClient, url: str, timeout: float) -> int:
    """/readyz's status once it is 200, or its last within ``timeout`` seconds."""
    deadline = time.monotonic() + seconds(timeout)
    status = await ready_status(http, url)
    while status != 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        status = await ready_status(http, url)
    return status


async def assert_a_new_prompt_completes(cluster: Cluster) -> None:
    async with connect(cluster.frontends[1].ws + "/ws/agent-thoughts") as ws:
        await greeting(ws)
        await ws.send("after the failover")
        events = await run_events(ws, timeout=60)
    assert [e["type"] for e in events] == sim_run(TOKENS)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


@pytest.mark.parametrize("deployed", ["fast", "public"], indirect=True)
async def test_a_sentinel_failover_mid_stream_leaves_every_client_whole(
    deployed: Cluster,
    sentinel_deployment: SentinelDeployment,  # noqa: F811
) -> None:
    old = sentinel_deployment.master()
    async with streaming(deployed) as watchers:
        new = await asyncio.to_thread(sentinel_deployment.failover)
        assert new != old
        await assert_every_client_whole(sentinel_deployment, deployed, watchers)
    async with httpx.AsyncClient() as http:
        for frontend in deployed.frontends:
            assert await ready_within(http, frontend.http, 20) == 200
    await assert_a_new_prompt_completes(deployed)
    assert_followed(deployed)


def assert_followed(cluster: Cluster) -> None:
    """Every process heard of the switch; every frontend's hub reconnected."""
    for proc in [*(f.proc for f in cluster.frontends), *cluster.workers]:
        assert "master of mymaster switched" in proc.output(), proc.name
    for frontend in cluster.frontends:
        assert "pub/sub reconnected" in frontend.proc.output()


async def test_a_master_killed_mid_stream_leaves_every_client_whole(
    deployed: Cluster,
    sentinel_deployment: SentinelDeployment,  # noqa: F811
) -> None:
    statuses: list[int] = []
    unready: list[float] = []  # when /readyz first said 503, and when 200 again

    async def poll_readiness(http: httpx.AsyncClient) -> None:
        """/readyz of one frontend every 50 ms, until it went 503 and then 200 again."""
        deadline = time.monotonic() + seconds(60)
        while time.monotonic() < deadline:
            statuses.append(await ready_status(http, deployed.frontends[0].http))
            if (statuses[-1] == 503 and not unready) or (statuses[-1] == 200 and unready):
                unready.append(time.monotonic())
            if len(unready) == 2:
                return
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient() as http, streaming(deployed) as watchers:
        killed = time.monotonic()
        old = sentinel_deployment.kill_master()
        poller = asyncio.create_task(poll_readiness(http))
        await asyncio.to_thread(sentinel_deployment.wait_for_new_master, old)
        promoted = time.monotonic()
        await assert_every_client_whole(sentinel_deployment, deployed, watchers)
        await poller
    assert 503 in statuses, statuses
    assert len(unready) == 2, statuses
    print(
        f"replica promoted {promoted - killed:.2f} s after the kill; /readyz 503 from "
        f"{unready[0] - killed:.2f} s to {unready[1] - killed:.2f} s"
    )
    await assert_a_new_prompt_completes(deployed)
    assert_followed(deployed)


# --- the parts, one at a time ----------------------------------------------------


class FakeSentinel:
    """A sentinel that answers ``SENTINEL MASTERS`` with a given state, or fails."""

    def __init__(self, answer: dict[str, Any] | Exception) -> None:
        self.answer = answer

    async def sentinel_masters(self) -> dict[str, Any]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def named(port: int, epoch: int, **flags: bool) -> FakeSentinel:
    state = {"ip": "127.0.0.1", "port": port, "config-epoch": epoch, "num-other-sentinels": 2}
    return FakeSentinel(
        {"mymaster": {"is_master": True, "is_sdown": False, "is_odown": False, **state, **flags}}
    )


async def test_the_master_is_the_one_a_sentinel_names_with_the_newest_config_epoch() -> None:
    url = "redis+sentinel://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3/mymaster"
    master = RedisFactory(Settings(redis_url=url)).sentinel
    assert master is not None
    sentinels: Any = master.sentinels
    # One has not heard of the failover yet, one has, one does not answer: the newer wins,
    # in whichever order they are asked.
    sentinels.sentinels = [named(6379, 0), named(6380, 1), FakeSentinel(RedisConnectionError())]
    assert await sentinels.discover_master("mymaster") == ("127.0.0.1", 6380)
    sentinels.sentinels.reverse()
    assert await sentinels.discover_master("mymaster") == ("127.0.0.1", 6380)
    # A master a sentinel sees down is no answer; no answer at all is a lost connection.
    sentinels.sentinels = [named(6380, 1, is_sdown=True), FakeSentinel(RedisConnectionError())]
    with pytest.raises(RedisConnectionError):
        await sentinels.discover_master("mymaster")


async def test_a_demoted_master_refusing_a_write_is_a_lost_connection_not_an_answer(
    sentinel_deployment: SentinelDeployment,  # noqa: F811
) -> None:
    replica = sentinel_deployment.replica_server()
    redis_client = RedisFactory(Settings(redis_url=replica.url, redis_pool_size=2)).commands()
    batcher = Batcher(redis_client, own_reader=True)
    try:
        with pytest.raises(RedisConnectionError, match="replica"):
            await batcher.commands(["SET", "k", "v"])
        # The line was dropped, so the next call connects again (and is refused again).
        with pytest.raises(RedisConnectionError, match="replica"):
            await batcher.commands(["GET", "k"], ["SET", "k", "v"])
        assert await batcher.commands(["GET", "k"]) == [None]  # reads are served
    finally:
        await redis_client.aclose()


async def test_a_process_follows_the_master_and_drops_what_it_held_on_a_switch(
    sentinel_deployment: SentinelDeployment,  # noqa: F811
) -> None:
    factory = RedisFactory(Settings(redis_url=sentinel_deployment.url, redis_pool_size=4))
    assert factory.sentinel is not None
    received: list[bytes] = []
    async with factory.following():
        redis_client = factory.commands()
        batcher = Batcher(redis_client)
        link = await open_link(factory, lambda kind, channel, data: received.append(kind))
        try:
            await link.subscribe(b"ch")
            assert await batcher.commands(["SET", "k", "1"]) == [b"OK"]
            # The fast paths hold: the line took over a SentinelManagedConnection, and the
            # link is the raw one, on the master's address.
            assert batcher._line is not None and isinstance(link, RawLink)
            # Heard from now on: a switch before the follower listens is taken, not counted.
            await until(lambda: factory.sentinel.listening_to, 10, "the follower to listen")
            old = sentinel_deployment.master()
            new = await asyncio.to_thread(sentinel_deployment.failover)
            async with asyncio.timeout(seconds(10)):
                with pytest.raises(RedisConnectionError):
                    await link.wait_closed()  # dropped: the hub would reconnect and resync
            assert factory.sentinel.switches == 1
            # The batcher's next call goes to the new master, through a new connection.
            assert await batcher.commands(["SET", "k", "2"], ["ROLE"]) == [b"OK", ANY]
            assert batcher._line is not None and not batcher._line.closed
            with sentinel_deployment.servers[new].client() as client:
                assert client.get("k") == b"2"
            assert (await factory.link_url()).endswith(f":{new}/0")
            assert old != new
        finally:
            await link.close()
            await redis_client.aclose()


async def test_readiness_asks_redis_at_most_once_a_second_and_says_503_without_it() -> None:
    class Redis:
        pings, up = 0, True

        async def ping(self) -> bool:
            self.pings += 1
            if not self.up:
                raise RedisConnectionError("no master")
            return True

    redis_client = Redis()
    frontend: Any = Frontend(
        settings=Settings(),
        redis=redis_client,  # type: ignore[arg-type]
        bus=None,  # type: ignore[arg-type]
        hub=SimpleNamespace(healthy=True),  # type: ignore[arg-type]
        node="n",
        auth=None,  # type: ignore[arg-type]
        guard=None,  # type: ignore[arg-type]
        runs=None,  # type: ignore[arg-type]
    )
    assert all([await frontend.ready() for _ in range(50)])
    assert redis_client.pings == 1  # probes in a burst cost Redis one PING
    redis_client.up = False
    frontend.pinged = (frontend.pinged[0] - 1.0, True)  # a second later
    assert not await frontend.ready()
    assert not await frontend.ready() and redis_client.pings == 2


@pytest.mark.parametrize("sentinels_ask", ["the servers' password", "none"])
async def test_sentinels_get_the_servers_password_unless_they_have_none(sentinels_ask: str) -> None:
    """A chart's sentinels often share the servers' password (the URL then names only
    that one); sentinels with none configured take any (Redis 6 and later)."""
    password = "s3cret"
    deployment = SentinelDeployment(
        make_logdir("sentinel-auth"),
        password=password,
        sentinel_password=password if sentinels_ask != "none" else None,
    ).start()
    try:
        factory = RedisFactory(Settings(redis_url=deployment.url, redis_pool_size=2))
        assert factory.sentinel is not None
        async with factory.following():
            redis_client = factory.commands()
            try:
                assert await redis_client.ping()
                assert (await factory.link_url()).startswith(f"redis://:{password}@127.0.0.1:")
                await until(lambda: factory.sentinel.listening_to, 10, "the follower to listen")
                await asyncio.to_thread(deployment.failover)
                await until(lambda: factory.sentinel.switches == 1, 10, "the switch")
                assert await redis_client.set("k", "v")
                for sentinel in factory.sentinel.sentinels.sentinels:
                    assert sentinel.connection_pool.connection_kwargs["password"] == password
            finally:
                await redis_client.aclose()
    finally:
        deployment.stop()


async def test_the_follower_moves_to_another_sentinel_when_its_own_dies(
    sentinel_deployment: SentinelDeployment,  # noqa: F811
) -> None:
    factory = RedisFactory(Settings(redis_url=sentinel_deployment.url, redis_pool_size=2))
    master = factory.sentinel
    assert master is not None
    async with factory.following():
        first = await until(lambda: master.listening_to, 10, "the follower to listen")
        sentinel_deployment.sentinel_at(first).proc.kill()
        await until(lambda: master.listening_to not in (None, first), 10, "it to listen to another")
        await asyncio.to_thread(sentinel_deployment.failover)
        await until(lambda: master.switches == 1, 10, "the switch")
        redis_client = factory.commands()
        try:
            assert await redis_client.set("k", "v")
        finally:
            await redis_client.aclose()


async def test_no_sentinel_answering_says_which_and_why(caplog: pytest.LogCaptureFixture) -> None:
    from tests.procs import free_port
    from thoughtwire.shared.redis.sentinel import MasterNotFoundError

    ports = [free_port(), free_port()]  # nobody listens
    url = "redis+sentinel://u:topsecret@" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/svc"
    master = RedisFactory(Settings(redis_url=url)).sentinel
    assert master is not None
    with pytest.raises(MasterNotFoundError) as info:
        await master.sentinels.discover_master("svc")
    assert all(f"127.0.0.1:{port}" in str(info.value) for port in ports)
    assert "topsecret" not in str(info.value)
    async with master.following():
        async with asyncio.timeout(seconds(5)):
            while "listening to another" not in caplog.text:  # bounded by the timeout
                await asyncio.sleep(0.02)
    assert f"127.0.0.1:{ports[0]}. Connect" in caplog.text, caplog.text


async def test_a_user_that_may_not_run_role_reaches_the_master(
    sentinel_deployment: SentinelDeployment,  # noqa: F811
) -> None:
    # An ACL of +@all -@dangerous, a common one, refuses ROLE (and INFO).
    for server in sentinel_deployment.servers.values():
        with server.client() as admin:
            admin.acl_setuser("app", enabled=True, passwords=["+apppw"], keys="*", channels="*",
                              commands=["+@all", "-@dangerous"])  # fmt: skip
    assert sentinel_deployment.password is None  # the sentinels take any password
    url = sentinel_deployment.url.replace("://", "://app:apppw@", 1)
    factory = RedisFactory(Settings(redis_url=url))
    async with factory.following():  # which closes the sentinels' connections at the end
        redis_client = factory.commands()
        try:
            assert await redis_client.set("k", "v") and await redis_client.acl_whoami() == "app"
        finally:
            await redis_client.aclose()
