"""Load-generating clients, run in their own processes.

Each process opens its share of sockets, waits for the go signal, starts the runs it
is told to trigger, and collects every event: latency from the producer's ``ts`` to
receipt, and lost, duplicated or out-of-order events per socket. Everything is
bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from bench.wire import WireClient
from thoughtwire.shared import loops

CONNECT_CONCURRENCY = 200


@dataclass
class Plan:
    system: str  # thoughtwire (or thoughtwire-public, without fast paths), thin, socketio
    urls: list[str]  # one base URL per frontend
    sockets: list[tuple[str, int, bool]]  # (session, frontend index, triggers the run)
    tokens: int
    rate: float
    redis_url: str
    jitter: float = 0.0  # of the comparison systems' tokens, as the simulated agent's
    deadline: float = 120.0
    hold: bool = False  # idle: connect, report, and only hold the sockets


@dataclass
class Tally:
    received: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    last: int = 0
    seen: set[int] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self, seq: int) -> None:
        if seq in self.seen:
            self.duplicated += 1
            return
        if seq < self.last:
            self.out_of_order += 1
        self.seen.add(seq)
        self.last = max(self.last, seq)
        self.received += 1


# Every system stamps ``ts`` in whole milliseconds, rounded down: on average the stamp is
# half a millisecond early. Latency is taken from the middle of the stamp's millisecond.
TS_MIDPOINT = 0.5


def now_ms() -> float:
    return time.time() * 1000


class Socket:
    """One client socket of any of the three systems."""

    rcvbuf = 0  # the kernel's receive buffer, in bytes; 0: the system's default
    mss = 0  # the largest segment the server may send; 0: the link's (64 KiB on loopback)

    def __init__(
        self, plan: Plan, session: str, frontend: int, latencies: tuple[list[float], list[float]]
    ) -> None:
        self.plan, self.session, self.frontend = plan, session, frontend
        self.tally = Tally()
        # to the kernel's receipt at the client's socket, and to this process handling it
        self.latencies, self.handled = latencies
        self.ready = asyncio.Event()
        self.ws: Any = None

    def on_event(self, client: WireClient, event: dict[str, Any]) -> None:
        if "seq" not in event:
            return
        stamped = event["ts"] + TS_MIDPOINT
        self.latencies.append(client.received_at - stamped)
        self.handled.append(now_ms() - stamped)
        self.tally.take(event["seq"])
        if event["type"] in ("done", "error", "cancelled"):
            self.tally.done.set()

    async def open(self) -> None:
        base = self.plan.urls[self.frontend]
        if self.plan.system == "socketio":
            # Engine.IO 4 over a WebSocket: "0" opens, "40" joins the namespace,
            # "2"/"3" are ping/pong, and '42["name",data]' is an event.
            url = f"{base}/socket.io/?EIO=4&transport=websocket&session={self.session}"
            handler = self._on_socketio
        elif self.plan.system.startswith("thoughtwire"):
            url = f"{base}/ws/agent-thoughts?session={self.session}&after=0"
            handler = self._on_thoughtwire
        else:
            url = f"{base}/ws?session={self.session}"
            handler = self._on_thin
        self.ws = await WireClient.connect(url, handler, self.rcvbuf, self.mss)

    def _on_thoughtwire(self, client: WireClient, payload: bytes) -> None:
        if payload.startswith(b'{"type":"session"'):
            self.ready.set()
        elif b',"seq":' in payload:
            self.on_event(client, orjson.loads(payload))

    def _on_thin(self, client: WireClient, payload: bytes) -> None:
        if payload == b"ready":
            self.ready.set()
        else:
            self.on_event(client, orjson.loads(payload))

    def _on_socketio(self, client: WireClient, payload: bytes) -> None:
        if payload.startswith(b'42["event",'):
            self.on_event(client, orjson.loads(payload[11:-1]))
        elif payload.startswith(b'42["ready"'):
            self.ready.set()
        elif payload == b"2":
            client.send_text("3")
        elif payload.startswith(b"0{"):
            client.send_text("40")

    async def trigger(self, redis: Redis) -> None:
        if self.plan.system.startswith("thoughtwire"):
            self.ws.send_text("go")
        else:
            command = {
                "session": self.session,
                "tokens": self.plan.tokens,
                "rate": self.plan.rate,
                "jitter": self.plan.jitter,
            }
            await redis.rpush(f"bench:{self.plan.system}:start", json.dumps(command))

    async def close(self) -> None:
        self.ws.close()


async def _run(plan: Plan, ready: Any, go: Any, stop: Any, results: Any) -> None:
    latencies: list[float] = []
    handled: list[float] = []
    sockets = [
        Socket(plan, session, frontend, (latencies, handled))
        for session, frontend, _ in plan.sockets
    ]
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one(socket: Socket) -> None:
        async with limit:
            await socket.open()
            async with asyncio.timeout(30):
                await socket.ready.wait()

    await asyncio.gather(*(open_one(s) for s in sockets))
    ready.put(len(sockets))
    try:
        if not plan.hold:
            await asyncio.to_thread(go.wait, plan.deadline)
            results.put(
                await _measure(plan, sockets) | {"latencies": latencies, "handled": handled}
            )
        # Sockets stay open until every load process is done measuring.
        await asyncio.to_thread(stop.wait, plan.deadline)
    finally:
        await asyncio.gather(*(s.close() for s in sockets), return_exceptions=True)


async def _measure(plan: Plan, sockets: list[Socket]) -> dict[str, Any]:
    """Start the runs this process triggers; wait for every socket's terminal event."""
    redis = Redis.from_url(plan.redis_url)
    try:
        cpu = time.process_time()
        started = now_ms()
        # Paced runs start spread over one token interval, as prompts from many
        # users do, rather than in step. Every system gets the same spread; in
        # step, a token from every run would arrive in the same millisecond.
        starters = [
            s for s, (_, _, triggers) in zip(sockets, plan.sockets, strict=True) if triggers
        ]
        spread = 1 / plan.rate if plan.rate > 0 else 0.0
        begin = time.monotonic()
        for i, socket in enumerate(starters):
            await asyncio.sleep(max(0.0, begin + spread * i / len(starters) - time.monotonic()))
            await socket.trigger(redis)
        with_deadline = [asyncio.wait_for(s.tally.done.wait(), plan.deadline) for s in sockets]
        await asyncio.gather(*with_deadline, return_exceptions=True)
        finished = now_ms()
    finally:
        await redis.aclose()
    tallies = [s.tally for s in sockets]
    return {
        "sockets": len(sockets),
        "received": sum(t.received for t in tallies),
        # A socket's events are numbered 1..n; the terminal one is n.
        "lost": sum(t.last - t.received for t in tallies),
        "incomplete": sum(not t.done.is_set() for t in tallies),
        "duplicated": sum(t.duplicated for t in tallies),
        "out_of_order": sum(t.out_of_order for t in tallies),
        "started": started,
        "finished": finished,
        "cpu_s": time.process_time() - cpu,  # this process's own, while loaded
    }


def client_process(plan: Plan, ready: Any, go: Any, stop: Any, results: Any) -> None:
    """A load process's entry point."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loops.run(_run(plan, ready, go, stop, results))
