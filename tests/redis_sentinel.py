"""A Redis Sentinel deployment of real processes: one master, one replica, three sentinels.

Everything listens on free loopback ports and lives in its own directory; every wait is
bounded, and only the processes started here are stopped, each by its own PID.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.procs import Proc, RedisServer, free_port, make_logdir, wait_until

SERVICE = "mymaster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


class Server(RedisServer):
    """A redis-server that may require a password (of its clients and of its master)."""

    def __init__(self, workdir: Path, password: str | None, *extra: str) -> None:
        auth = ("--requirepass", password, "--masterauth", password) if password else ()
        super().__init__(workdir, *auth, *extra)
        self.password = password
        if password:
            self.url = f"redis://:{password}@127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=5)


class SentinelServer:
    """One ``redis-server --sentinel`` watching ``SERVICE`` with a quorum of 2."""

    def __init__(
        self,
        workdir: Path,
        master_port: int,
        password: str | None = None,
        server_password: str | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; `make test` installs it")
        self.port = free_port()
        self.myid = os.urandom(20).hex()
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "sentinel.conf"  # a sentinel rewrites its own configuration
        self.conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "protected-mode no\n"
            f"dir {workdir}\n"
            f"sentinel myid {self.myid}\n"
            "sentinel resolve-hostnames no\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
            + (f"sentinel auth-pass {SERVICE} {server_password}\n" if server_password else "")
            + (f"requirepass {password}\n" if password else "")
        )
        self.password = password
        self.proc = Proc(
            "sentinel",
            [binary, str(self.conf), "--sentinel"],
            {},
            self.conf.parent / "sentinel.log",
        )

    def introduce(self, replicas: list[int], others: list[SentinelServer]) -> None:
        """Write the replicas and the other sentinels into the configuration, as a
        sentinel writes what it learnt: it starts knowing them, instead of learning them
        from INFO and hello messages over several seconds."""
        with self.conf.open("a") as conf:
            for port in replicas:
                conf.write(f"sentinel known-replica {SERVICE} 127.0.0.1 {port}\n")
            for other in others:
                conf.write(
                    f"sentinel known-sentinel {SERVICE} 127.0.0.1 {other.port} {other.myid}\n"
                )

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=2)

    def state(self) -> dict | None:  # type: ignore[type-arg]
        """What this sentinel knows of the master, or None while it does not answer."""
        try:
            with self.client() as client:
                return client.sentinel_master(SERVICE)  # type: ignore[no-any-return]
        except redis.RedisError:
            return None

    def sees_a_good_replica(self) -> bool:
        """It has read a replica's INFO and found its link up: one it would promote."""
        try:
            with self.client() as client:
                replicas = client.sentinel_slaves(SERVICE)
        except redis.RedisError:
            return False
        return any(
            not r["is_disconnected"] and not r["is_sdown"] and r.get("master-link-status") == "ok"
            for r in replicas
        )


class SentinelDeployment:
    """A master, its replica and three sentinels; the master found by asking a sentinel.

    ``password``: the servers require one; ``sentinel_password``: the sentinels do.
    """

    def __init__(
        self, workdir: Path, password: str | None = None, sentinel_password: str | None = None
    ) -> None:
        self.workdir = workdir
        self.password = password
        self.sentinel_password = sentinel_password
        first = Server(self._dir("redis-a"), password)
        self.servers: dict[int, Server] = {first.port: first}
        self.sentinels: list[SentinelServer] = []

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def url(self) -> str:
        """``REDIS_URL`` for the processes: the servers' password, every sentinel, and the
        service (no sentinel password: the sentinels get the servers')."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        auth = f":{self.password}@" if self.password else ""
        return f"redis+sentinel://{auth}{hosts}/{SERVICE}"

    def start(self) -> SentinelDeployment:
        try:
            master = next(iter(self.servers.values())).start()
            replica = Server(
                self._dir("redis-b"), self.password, "--replicaof", "127.0.0.1", str(master.port)
            )
            self.servers[replica.port] = replica.start()
            wait_until(lambda: self._in_sync(replica), 20, "the replica to sync")
            self.sentinels = [
                SentinelServer(
                    self._dir(f"sentinel-{i}"), master.port, self.sentinel_password, self.password
                )
                for i in range(3)
            ]
            for sentinel in self.sentinels:
                sentinel.introduce([replica.port], [s for s in self.sentinels if s is not sentinel])
                sentinel.proc.start()
            wait_until(self._settled, 30, "the sentinels to see the replica and each other")
        except BaseException:
            self.stop()
            raise
        return self

    def _settled(self) -> bool:
        # The replica and the other sentinels come from the configuration, so a sentinel
        # counts them at once; until it has read the replica's INFO, a failover it is
        # asked for fails with NOGOODSLAVE.
        states = [s.state() for s in self.sentinels]
        return all(
            state is not None
            and state["num-slaves"] >= 1
            and state["num-other-sentinels"] == len(self.sentinels) - 1
            for state in states
        ) and all(s.sees_a_good_replica() for s in self.sentinels)

    @staticmethod
    def _in_sync(replica: Server) -> bool:
        try:
            with replica.client() as client:
                return client.info("replication").get("master_link_status") == "up"  # type: ignore[no-any-return]
        except redis.RedisError:
            return False

    # --- what a test asks and does ---------------------------------------------

    def master(self) -> int:
        """The master's port, as the first sentinel that answers says."""
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    _host, port = client.sentinel_get_master_addr_by_name(SERVICE)
                    return int(port)
            except redis.RedisError:
                continue
        raise RuntimeError("no sentinel answers")

    def master_server(self) -> Server:
        return self.servers[self.master()]

    def replica_server(self) -> Server:
        master = self.master()
        return next(s for port, s in self.servers.items() if port != master and s.proc.alive())

    def sentinel_at(self, address: str) -> SentinelServer:
        """The sentinel listening on ``address`` (``host:port``)."""
        return next(s for s in self.sentinels if address.endswith(f":{s.port}"))

    def failover(self) -> int:
        """``SENTINEL FAILOVER``; returns once every sentinel names the new master, its port."""
        old = self.master()
        sentinel = next(s for s in self.sentinels if s.proc.alive())
        wait_until(lambda: self._failover_asked(sentinel), 20, "a failover to be taken")
        return self.wait_for_new_master(old)

    @staticmethod
    def _failover_asked(sentinel: SentinelServer) -> bool:
        """Ask ``sentinel`` for a failover; False while it has no replica good to promote
        (a replica just rejoined, not yet read again)."""
        try:
            with sentinel.client() as client:
                client.sentinel_failover(SERVICE)
        except redis.ResponseError as error:
            if "NOGOODSLAVE" in str(error):
                return False
            raise
        return True

    def kill_master(self) -> int:
        """kill -9 the master by its PID; returns the port it listened on."""
        server = self.master_server()
        server.proc.kill()
        return server.port

    def wait_for_new_master(self, old: int, timeout: float = 30) -> int:
        """Wait until every sentinel names a master other than ``old``, and it is one."""

        def switched() -> int | None:
            ports = set()
            for sentinel in [s for s in self.sentinels if s.proc.alive()]:
                try:
                    with sentinel.client() as client:
                        ports.add(int(client.sentinel_get_master_addr_by_name(SERVICE)[1]))
                except redis.RedisError:
                    return None
            if len(ports) != 1 or old in ports:
                return None
            port = ports.pop()
            try:
                with self.servers[port].client() as client:
                    role = client.execute_command("ROLE")[0]
            except redis.RedisError:
                return None
            return port if role == b"master" else None

        port: int = wait_until(switched, timeout, "the sentinels to name a new master")
        return port

    @property
    def pids(self) -> list[int]:
        procs = [*(s.proc for s in self.servers.values()), *(s.proc for s in self.sentinels)]
        return [p.pid for p in procs if p.popen is not None]

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.proc.stop()
        for server in self.servers.values():
            server.stop()


@pytest.fixture
def sentinel_deployment() -> Iterator[SentinelDeployment]:
    """A fresh master, replica and three sentinels per test (a failover changes them)."""
    deployment = SentinelDeployment(make_logdir("sentinel")).start()
    yield deployment
    deployment.stop()
