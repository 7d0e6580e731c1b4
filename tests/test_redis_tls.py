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

from tests.procs import RedisServer, free_port, seconds
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

    def __init__(self, workdir: Path) -> None:
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
    confirmed: list[bytes] = []
    link = await open_link(factory, lambda kind, channel, data: confirmed.append(kind))
    try:
        await link.subscribe(b"tw:tls-check")
        async with asyncio.timeout(seconds(5)):
            while not confirmed:  # bounded by the timeout
                await asyncio.sleep(0.01)
        assert confirmed == [b"subscribe"]
    finally:
        await link.close()
