"""``rediss://`` URLs: every connection a process opens takes the URL's TLS options.

A server with a certificate of a private CA is the usual TLS deployment of Redis; the URL
names the CA (``?ssl_ca_certs=…``), as redis-py reads it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import RedisServer, free_port, seconds, wait_until
from tests.test_topology import assert_link_subscribes
from thoughtwire.shared.redis import RedisFactory
from thoughtwire.shared.redis.pubsub import open_link
from thoughtwire.shared.settings import Settings

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def make_certificates(directory: Path) -> None:
    """A CA (ca.pem) and a server certificate it signed for 127.0.0.1 (server.pem/.key)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
        "-out", "ca.pem", "-days", "2", "-subj", "/CN=thoughtwire test CA",
    )  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=localhost",
    )  # fmt: skip
    (directory / "san").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san",
    )  # fmt: skip


class TLSServer:
    """A redis-server answering TLS on ``tls_port`` (and plain on its own port, to wait)."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        make_certificates(workdir)
        self.tls_port = free_port()
        self.ca = workdir / "ca.pem"
        self.server = RedisServer(
            workdir,
            "--tls-port", str(self.tls_port),
            "--tls-cert-file", str(workdir / "server.pem"),
            "--tls-key-file", str(workdir / "server.key"),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", "no",
            *extra,
        )  # fmt: skip


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    server = TLSServer(tmp_path_factory.mktemp("tls"))
    server.server.start()
    yield server
    server.server.stop()


async def test_the_pub_sub_link_trusts_the_ca_the_url_names(tls_server: TLSServer) -> None:
    url = f"rediss://127.0.0.1:{tls_server.tls_port}/0?ssl_ca_certs={tls_server.ca}"
    factory = RedisFactory(Settings(redis_url=url))
    commands = factory.commands()
    try:
        assert await commands.ping()
    finally:
        await commands.aclose()
    await assert_link_subscribes(factory, b"tw:tls-check")


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    """A Redis Cluster of one master serving every slot, over TLS."""
    workdir = tmp_path_factory.mktemp("tls-cluster")
    bus = ("--cluster-port", str(free_port()))  # not the client port + 10,000: taken, or past 65535
    server = TLSServer(workdir, "--cluster-enabled", "yes", "--tls-cluster", "yes", *bus)
    server.server.start()
    try:
        with server.server.client() as admin:
            admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            wait_until(
                lambda: b"cluster_state:ok" in admin.execute_command("CLUSTER", "INFO"),
                10,
                "the one-node cluster to serve its slots",
            )
        yield server
    finally:
        server.server.stop()


async def test_a_clusters_every_connection_trusts_the_ca_the_url_names(
    tls_cluster: TLSServer, prefix: str
) -> None:
    url = f"rediss+cluster://127.0.0.1:{tls_cluster.tls_port}?ssl_ca_certs={tls_cluster.ca}"
    factory = RedisFactory(Settings(redis_url=url))
    commands = factory.commands()
    control = factory.pubsub()
    try:
        assert await commands.set(f"{prefix}:k", "v") and await control.ping()
    finally:
        await commands.aclose()
        await control.aclose()
    heard: list[bytes | None] = []
    link = await open_link(factory, lambda kind, channel, data: heard.append(data))
    try:
        await link.subscribe(f"{prefix}:{{s}}:events".encode(), f"{prefix}:all".encode())
        async with asyncio.timeout(seconds(5)):
            while len(heard) < 2:  # bounded by the timeout: both confirmations
                await asyncio.sleep(0.01)
    finally:
        await link.close()
