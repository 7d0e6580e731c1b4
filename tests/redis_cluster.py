"""A real Redis Cluster for tests: six redis-server nodes, three masters and their replicas.

Every node runs on free loopback ports (its client port and, through Redis 7's
``cluster-port``, its bus port), in its own directory, and is stopped by its own PID.
The object the fixture yields knows which master serves a key's slot, can kill a master
and wait for its replica's promotion, bring a killed node back as a replica, and move a
slot from one master to another the way ``redis-cli --cluster reshard`` does.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.procs import Proc, free_port, seconds, wait_until

# Small, so that a killed master's replica takes over within a few seconds in tests.
NODE_TIMEOUT_MS = 1000
SLOTS = 16384


@dataclass
class ClusterNode:
    """One redis-server of the cluster: its ports, directory and process."""

    port: int
    bus_port: int
    workdir: Path
    proc: Proc

    @property
    def pid(self) -> int:
        """The node's process id."""
        return self.proc.pid

    def client(self) -> redis.Redis:
        """A plain client on this node alone (no cluster redirections)."""
        return redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)

    def call(self, *args: object) -> object:
        """Run one command on this node."""
        with self.client() as client:
            return client.execute_command(*args)

    def alive(self) -> bool:
        """Its process runs and answers PING."""
        if not self.proc.alive():
            return False
        try:
            return bool(self.call("PING"))
        except redis.RedisError:
            return False


@dataclass
class Shard:
    """A master, as one node sees it: its port, node id, slots and replicas' ports."""

    port: int
    node_id: str
    slots: set[int] = field(default_factory=set)
    replicas: list[int] = field(default_factory=list)


def parse_nodes(text: str) -> dict[int, Shard]:
    """CLUSTER NODES' reply as the masters it names (failed ones included), by port."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    ports = {f[0]: int(f[1].split("@")[0].rsplit(":", 1)[1]) for f in lines}
    shards: dict[int, Shard] = {}
    for f in lines:
        if "master" in f[2].split(","):
            shards[ports[f[0]]] = Shard(ports[f[0]], f[0], _slots(f[8:]))
    for f in lines:
        if "slave" in f[2].split(",") and f[3] in ports and ports[f[3]] in shards:
            shards[ports[f[3]]].replicas.append(ports[f[0]])
    return shards


def _slots(fields: list[str]) -> set[int]:
    slots: set[int] = set()
    for item in fields:
        if item.startswith("["):  # a slot being migrated or imported: not owned yet
            continue
        start, _, end = item.partition("-")
        slots.update(range(int(start), int(end or start) + 1))
    return slots


class RedisCluster:
    """Six cluster-enabled redis-servers joined by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, masters: int = 3, *extra: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server and redis-cli are needed; `make test` installs them")
        self.masters_count = masters
        self.nodes: list[ClusterNode] = []
        for index in range(masters * 2):
            port, bus_port = free_port(), free_port()
            directory = workdir / f"node-{index}"
            directory.mkdir(parents=True)
            args = [
                binary, "--port", str(port), "--cluster-port", str(bus_port),
                "--bind", "127.0.0.1", "--dir", str(directory),
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--save", "", "--appendonly", "no", "--protected-mode", "no",
                "--repl-diskless-sync-delay", "0", *extra,
            ]  # fmt: skip
            proc = Proc(f"redis-{port}", args, {}, directory / "redis.log")
            self.nodes.append(ClusterNode(port, bus_port, directory, proc))

    @property
    def ports(self) -> list[int]:
        """Every node's client port."""
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        """The ``REDIS_URL`` of the cluster: every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def node(self, port: int) -> ClusterNode:
        """The node on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def pid_of(self, port: int) -> int:
        """The process id of the node on ``port``."""
        return self.node(port).pid

    def start(self) -> RedisCluster:
        """Start the nodes, join them into a cluster, and wait until it serves every slot."""
        try:
            for node in self.nodes:
                node.proc.start()
            for node in self.nodes:
                wait_until(node.alive, 10, f"redis-server on {node.port} to answer")
            self._create()
            self.wait_healthy()
        except BaseException:
            self.stop()  # what did start must not outlive the test run
            raise
        return self

    def _create(self) -> None:
        addresses = [f"127.0.0.1:{p}" for p in self.ports]
        args = ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1"]
        result = subprocess.run(
            [*args, "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=seconds(60),
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed:\n{result.stdout}{result.stderr}"
            )

    def live(self) -> list[ClusterNode]:
        """The nodes whose process runs."""
        return [n for n in self.nodes if n.proc.alive()]

    def shards(self, port: int | None = None) -> dict[int, Shard]:
        """The masters that hold slots, as the node on ``port`` (or the first live one) sees them."""
        node = self.node(port) if port is not None else self.live()[0]
        shards = parse_nodes(str(node.call("CLUSTER", "NODES")))
        return {p: s for p, s in shards.items() if s.slots}

    def masters(self) -> list[int]:
        """The ports of the masters that serve slots."""
        return sorted(self.shards())

    def slot_of(self, key: str) -> int:
        """The hash slot of ``key`` (its ``{tag}`` if it has one)."""
        return int(str(self.live()[0].call("CLUSTER", "KEYSLOT", key)))

    def master_of(self, key: str) -> int:
        """The port of the master that serves ``key``'s slot."""
        slot = self.slot_of(key)
        return next(p for p, s in self.shards().items() if slot in s.slots)

    def healthy(self) -> bool:
        """Every live node: cluster ok, all slots on live masters, one shared view, synced.

        The shared view matters as much as the state: ``cluster_state:ok`` comes before
        gossip has told every node which nodes replicate which master, and a test that
        reads the topology from a node that has not heard yet sees a shard with no replica.
        """
        live = {n.port for n in self.live()}
        try:
            views = []
            for node in self.live():
                info = str(node.call("CLUSTER", "INFO"))
                if "cluster_state:ok" not in info or f"cluster_slots_ok:{SLOTS}" not in info:
                    return False
                shards = self.shards(node.port)
                if not set(shards) <= live or sum(len(s.slots) for s in shards.values()) != SLOTS:
                    return False
                views.append(self._view(shards, live))
            placed = {p for master, replicas in views[0] for p in (master, *replicas)}
            if any(view != views[0] for view in views) or placed != live:
                return False
            return all(self._synced(n) for n in self.live())
        except redis.RedisError:
            return False

    @staticmethod
    def _view(shards: dict[int, Shard], live: set[int]) -> set[tuple[int, tuple[int, ...]]]:
        """Each master with its live replicas: what every node must agree on."""
        return {(p, tuple(sorted(r for r in s.replicas if r in live))) for p, s in shards.items()}

    @staticmethod
    def _synced(node: ClusterNode) -> bool:
        info = node.client().info("replication")
        if info.get("role") != "slave":
            return True
        return info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")

    def wait_healthy(self, timeout: float = 30) -> None:
        """Wait (bounded) until :meth:`healthy`."""
        wait_until(self.healthy, timeout, "the Redis Cluster to be ok on every node", 0.1)

    def kill_master(self, port: int) -> int:
        """SIGKILL the master on ``port``; wait for its replica's promotion; return its port."""
        slots = self.shards()[port].slots
        self.node(port).proc.kill()
        self.wait_healthy()
        return next(p for p, s in self.shards().items() if slots & s.slots)

    def restart(self, port: int) -> None:
        """Start a killed node again: it rejoins as a replica of the master that replaced it."""
        node = self.node(port)
        node.proc.start()
        wait_until(node.alive, 10, f"redis-server on {port} to answer")
        wait_until(lambda: self._rejoined(node), 30, f"node {port} to rejoin", 0.1)
        self.wait_healthy()

    def _rejoined(self, node: ClusterNode) -> bool:
        try:
            role = node.call("ROLE")
            return isinstance(role, list) and role[0] == "slave"
        except redis.RedisError:
            return False

    def move_slot(self, slot: int, to_port: int, between_keys: object = None) -> None:
        """Move ``slot`` to the master on ``to_port``: IMPORTING, MIGRATING, MIGRATE, NODE.

        The steps ``redis-cli --cluster reshard`` takes for each slot. ``between_keys``,
        if given, is called after the slot is marked migrating and before its keys move.
        """
        source = next(p for p, s in self.shards().items() if slot in s.slots)
        if source == to_port:
            return
        src, dst = self.node(source), self.node(to_port)
        src_id, dst_id = self._node_id(src), self._node_id(dst)
        dst.call("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.call("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        if callable(between_keys):
            between_keys()
        for _ in range(10_000):  # bounded: each round moves up to 100 keys
            keys = src.call("CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            src.call("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "REPLACE", "KEYS", *keys)  # type: ignore[misc]
        others = (self.node(p) for p in self.masters() if p not in (source, to_port))
        for node in (dst, src, *others):  # SETSLOT is for masters; replicas learn it by gossip
            node.call("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        wait_until(
            lambda: all(self._owner(n, slot) == to_port for n in self.live()),
            10,
            f"every node to see slot {slot} on {to_port}",
        )

    def _owner(self, node: ClusterNode, slot: int) -> int | None:
        shards = parse_nodes(str(node.call("CLUSTER", "NODES")))
        return next((p for p, s in shards.items() if slot in s.slots), None)

    @staticmethod
    def _node_id(node: ClusterNode) -> str:
        return str(node.call("CLUSTER", "MYID"))

    def stop(self) -> None:
        """Stop every node this object started, by its PID."""
        for node in self.nodes:
            node.proc.stop()


@pytest.fixture(scope="module")
def redis_cluster(logdir: Path) -> Iterator[RedisCluster]:
    """A Redis Cluster of three masters and three replicas, for one test module."""
    workdir = logdir / f"redis-cluster-{time.monotonic_ns()}"
    cluster = RedisCluster(workdir).start()
    yield cluster
    cluster.stop()
