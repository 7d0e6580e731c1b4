"""REDIS_URL's three forms: one server, Redis Cluster and Sentinel, with and without TLS."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.procs import RedisServer, seconds
from thoughtwire.shared.redis import RedisFactory
from thoughtwire.shared.redis.pubsub import open_link
from thoughtwire.shared.redis.topology import Kind, parse, redact
from thoughtwire.shared.settings import Settings


def test_one_server_urls_are_passed_through_as_given() -> None:
    for url in ("redis://localhost:6379/0", "rediss://u:p@h:6380", "unix:///tmp/r.sock"):
        topology = parse(url)
        assert topology.kind is Kind.SINGLE and topology.url == url
    assert parse("rediss://h:1").tls


def test_a_cluster_url_lists_its_seed_nodes_and_credentials() -> None:
    topology = parse("rediss+cluster://app:s%40cret@10.0.0.1:7000,[::1]:7001,node-c:7002")
    assert topology.kind is Kind.CLUSTER and topology.tls
    assert topology.nodes == (("10.0.0.1", 7000), ("::1", 7001), ("node-c", 7002))
    assert (topology.username, topology.password) == ("app", "s@cret")


def test_a_sentinel_url_names_its_service_database_and_sentinel_credentials() -> None:
    topology = parse(
        "redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/2"
        "?sentinel_password=spw&sentinel_username=watcher"
    )
    assert topology.kind is Kind.SENTINEL and not topology.tls
    assert topology.nodes == (("127.0.0.1", 26379), ("127.0.0.1", 26380))
    assert (topology.service, topology.db) == ("mymaster", 2)
    assert (topology.username, topology.password) == (None, "pw")
    assert (topology.sentinel_username, topology.sentinel_password) == ("watcher", "spw")
    assert parse("redis+sentinel://h:26379/svc").db == 0


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://h:1", "must start with one of"),
        ("redis+cluster://", "names no host:port"),
        ("redis+cluster://h", "is not host:port"),
        ("redis+cluster://h:99999", "is not host:port"),
        ("redis+cluster://h:1/3", "no database number"),
        ("redis+sentinel://h:1", "names no Sentinel service"),
        ("redis+sentinel://h:1/svc/x", "must end in"),
        ("redis://[::1:6379/0", "IPv6"),
        ("rediss+cluster://h:1?ssl_min_version=abc", "ssl_min_version"),
        ("redis://h:1/0?socket_timeout=abc", "socket_timeout"),
    ],
)
def test_a_bad_url_is_one_clear_error_without_its_password(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as info:
        parse(url.replace("://", "://u:topsecret@", 1) if "@" not in url else url)
    assert "topsecret" not in str(info.value)


def test_redaction_hides_every_password_and_keeps_the_rest() -> None:
    url = "redis+sentinel://u:pw@h:1,h:2/svc/1?sentinel_password=spw&x=1"
    assert redact(url) == "redis+sentinel://u:***@h:1,h:2/svc/1?sentinel_password=***&x=1"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"
    assert parse(url).redacted == redact(url)


def up_with(url: str) -> subprocess.CompletedProcess[str]:
    """``thoughtwire up`` with ``REDIS_URL`` set to ``url``, run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "thoughtwire", "up"],
        env={"REDIS_URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_bad_redis_url_stops_the_process_with_one_line_and_no_password() -> None:
    out = up_with("redis+cluster://app:topsecret@nohost")
    assert out.returncode == 7  # the exit code of a REDIS_URL that cannot be used
    assert out.stderr.strip().splitlines() == [
        "thoughtwire up: REDIS_URL cannot be used: "
        "REDIS_URL='redis+cluster://app:***@nohost': 'nohost' is not host:port"
    ]
    assert "topsecret" not in out.stdout + out.stderr


def test_a_one_server_url_that_is_no_url_stops_the_process_with_one_line() -> None:
    out = up_with("redis://:topsecret@[::1:6379/0")
    assert out.returncode == 7, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "IPv6" in out.stderr and "topsecret" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://u:pa#ss@h1:7000",
        "redis+cluster://u:pa/ss@h1:7000",
        "redis+cluster://u:pa?ss@h1:7000,h2:7001",
        "redis+sentinel://u:p@ss@h:1/svc",
        "redis:/:pass@h:6379",
        "redis://h:6379/0?password=pass",
        "redis+sentinel://h:1/svc?sentinel%5Fpassword=pass",
    ],
)
def test_a_password_with_url_characters_never_shows_in_a_redacted_url(url: str) -> None:
    assert "pa" not in redact(url).replace("password", "").replace("***", "")


def test_a_password_with_url_characters_stays_out_of_the_host_list() -> None:
    topology = parse("redis+cluster://u:pa#s/s?s@h1:7000,h2:7001")
    assert topology.nodes == (("h1", 7000), ("h2", 7001)) and topology.password == "pa#s/s?s"
    with pytest.raises(ValueError) as info:
        parse("redis+cluster://u:pa#ss@h1")
    assert "pa" not in str(info.value).replace("port", "")


# --- node URLs: what the pub/sub connections of a cluster and a Sentinel master use ---


def test_a_node_url_brackets_an_ipv6_host_and_keeps_a_user_without_a_password() -> None:
    cluster = parse("redis+cluster://[::1]:7000")
    assert cluster.node_url("::1", 7000) == "redis://[::1]:7000"
    assert parse("redis+cluster://alice@h:7000").node_url("h", 7000) == "redis://alice:@h:7000"
    assert parse("redis+cluster://alice:@h:7000").node_url("h", 7000) == "redis://alice:@h:7000"


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server on 127.0.0.1 and ::1 whose default user is off: only ``alice``,
    a user with no password (``nopass``), gets in."""
    server = RedisServer(tmp_path_factory.mktemp("acl"), "--bind", "127.0.0.1", "::1").start()
    with server.client() as admin:
        admin.acl_setuser(
            "alice", enabled=True, nopass=True, keys="*", channels="*", commands=["+@all"]
        )
        admin.acl_setuser("default", enabled=False)
    yield server
    server.stop()


async def test_a_clusters_pub_sub_client_reaches_an_ipv6_seed(acl_server: RedisServer) -> None:
    url = f"redis+cluster://alice:@[::1]:{acl_server.port}"
    client = RedisFactory(Settings(redis_url=url)).pubsub()
    try:
        assert await client.acl_whoami() == "alice"
    finally:
        await client.aclose()


@pytest.mark.parametrize("userinfo", ["alice@", "alice:@"])
async def test_a_user_without_a_password_is_the_one_every_connection_signs_in_as(
    acl_server: RedisServer, userinfo: str
) -> None:
    cluster = RedisFactory(
        Settings(redis_url=f"redis+cluster://{userinfo}127.0.0.1:{acl_server.port}")
    )
    client = cluster.pubsub()
    try:
        assert await client.acl_whoami() == "alice"
    finally:
        await client.aclose()
    single = RedisFactory(Settings(redis_url=f"redis://{userinfo}127.0.0.1:{acl_server.port}/0"))
    await assert_link_subscribes(single, b"tw:acl-check")


async def assert_link_subscribes(factory: RedisFactory, channel: bytes) -> None:
    """The hub's pub/sub link of ``factory`` connects and has ``channel`` confirmed."""
    confirmed: list[bytes] = []
    link = await open_link(factory, lambda kind, channel, data: confirmed.append(kind))
    try:
        await link.subscribe(channel)
        async with asyncio.timeout(seconds(5)):
            while not confirmed:  # bounded by the timeout
                await asyncio.sleep(0.01)
        assert confirmed == [b"subscribe"]
    finally:
        await link.close()


async def test_the_sentinel_masters_url_keeps_a_user_without_a_password() -> None:
    from thoughtwire.shared.redis.sentinel import SentinelMaster

    master = SentinelMaster(parse("redis+sentinel://alice@h:26379/svc/2"), Settings())

    async def discover_master(service: str) -> tuple[str, int]:
        return "::1", 6380

    master.sentinels.discover_master = discover_master  # type: ignore[method-assign]
    assert await master.master_url() == "redis://alice:@[::1]:6380/2"


def test_tls_options_reach_every_node_and_sentinel_connection() -> None:
    from thoughtwire.shared.redis.sentinel import SentinelMaster

    query = "ssl_ca_certs=/ca.pem&ssl_check_hostname=false&x=1"
    cluster = parse(f"rediss+cluster://h:7000?{query}")
    assert cluster.tls_options == {"ssl_ca_certs": "/ca.pem", "ssl_check_hostname": False}
    assert cluster.node_url("h", 7001).endswith(
        "h:7001?ssl_ca_certs=/ca.pem&ssl_check_hostname=false"
    )
    master = SentinelMaster(parse(f"rediss+sentinel://h:26379/svc?{query}"), Settings())
    assert master.sentinels.sentinel_kwargs["ssl_ca_certs"] == "/ca.pem"
    assert master.sentinels.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
    assert parse(f"redis+cluster://h:7000?{query}").tls_options == {}  # no TLS: none apply
    with pytest.raises(ValueError, match="takes no option 'ssl_ca_path'"):
        parse("rediss+cluster://h:7000?ssl_ca_path=/etc/ssl")


@pytest.mark.parametrize(
    "url", ["redis://u:topsecret@h:6379/0", "redis+cluster://u:topsecret@h:7000"]
)
def test_no_repr_shows_the_password(url: str) -> None:
    assert "topsecret" not in repr(parse(url)) + repr(Settings(redis_url=url))
