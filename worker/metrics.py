"""A worker's metrics, and the port that serves them with its health: ``/metrics``,
``/healthz`` and ``/readyz`` on ``THOUGHTWIRE_METRICS_PORT``.

The instruments are Prometheus' own, updated where things happen (a run's end, an
append's reply, a tool call): a few per run or per batch of events, never per token.
They join the process's registry (:data:`thoughtwire.shared.metrics.REGISTRY`) when a
worker starts with metrics on; in ``thoughtwire up`` the frontend's ``/metrics``
serves them too. The jobs gauges are read from the consumer group (``XLEN`` and
``XINFO GROUPS``, one round trip) when the port is scraped, at most once a second.

The port is served from a thread of its own (the standard library's WSGI server), so a
probe measures the worker's event loop instead of waiting behind it: ``/healthz`` is
200 while the loop runs a callback within :data:`LOOP_TIMEOUT`, and ``/readyz`` 200
while the worker consumes jobs (its last claim reached Redis) and is not draining.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from thoughtwire.shared import metrics
from thoughtwire.shared.bus import Bus, JobsQueue

logger = logging.getLogger("thoughtwire.worker")

LOOP_TIMEOUT = 2.0  # seconds the event loop may take to run a callback and still be live
JOBS_TIMEOUT = 1.0  # seconds a scrape waits for the jobs gauges
JOBS_CACHE = 1.0  # seconds the jobs gauges are reused, however often the port is scraped

RUNS = Counter("thoughtwire_runs", "Runs ended, by outcome.", ["outcome"], registry=None)
RUN_SECONDS = Histogram(
    "thoughtwire_run_duration_seconds",
    "A run from its start to its end.",
    buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
    registry=None,
)
FIRST_TOKEN_SECONDS = Histogram(
    "thoughtwire_time_to_first_token_seconds",
    "A run's start to its first answer token.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
    registry=None,
)
TOKENS = Counter("thoughtwire_tokens", "Model tokens, in and out.", ["direction"], registry=None)
TOOL_CALLS = Counter("thoughtwire_tool_calls", "Tool calls.", ["tool"], registry=None)
TOOL_SECONDS = Histogram(
    "thoughtwire_tool_call_seconds",
    "One tool call.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=None,
)
APPEND_SECONDS = Histogram(
    "thoughtwire_append_seconds",
    "One APPEND call to Redis.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=None,
)
APPEND_BATCH_SIZE = Histogram(
    "thoughtwire_append_batch_size",
    "Events per APPEND call.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=None,
)
LEASE_LOSSES = Counter(
    "thoughtwire_lease_losses", "Attempts that lost their lease to another worker.", registry=None
)


def tool_called(tool: str | None, seconds: float) -> None:
    """A tool call took ``seconds``; ``tool`` is None for a name no tool is registered under."""
    TOOL_CALLS.labels(tool or "other").inc()
    TOOL_SECONDS.observe(seconds)


def run_ended_unrun(outcome: str) -> None:
    """A run this worker ended at its start, without running it: cancelled while queued,
    dead after its last attempt, or for an agent it does not have."""
    RUNS.labels(outcome).inc()


def run_ended(outcome: str, seconds: float, tokens: tuple[int, int]) -> None:
    """A run this worker ran ended with ``outcome`` after ``seconds``."""
    RUNS.labels(outcome.replace(" ", "_")).inc()
    RUN_SECONDS.observe(seconds)
    TOKENS.labels("in").inc(tokens[0])
    TOKENS.labels("out").inc(tokens[1])
    if outcome == "lease lost":
        LEASE_LOSSES.inc()


class JobsGauges(Collector):
    """The jobs stream's depth, pending and lag, as last read (:meth:`refresh`)."""

    def __init__(self) -> None:
        self.queue: JobsQueue | None = None
        self.read_at = 0.0

    def describe(self) -> Iterable[Metric]:
        """Nothing to declare ahead: the gauges appear once read."""
        return []

    def collect(self) -> Iterable[Metric]:
        """The gauges, if the stream has been read."""
        queue = self.queue
        if queue is None:
            return
        for name, documentation, value in (
            ("queue_depth", "Entries in the jobs stream (queued and running).", queue.depth),
            ("pending", "Jobs handed to a worker and not yet acknowledged.", queue.pending),
            ("lag", "Jobs not yet handed to any worker.", queue.lag),
        ):
            if value is not None:
                yield GaugeMetricFamily(f"thoughtwire_jobs_{name}", documentation, value=value)

    async def refresh(self, bus: Bus) -> None:
        """Read the stream and its group again, unless that was done within JOBS_CACHE."""
        if time.monotonic() - self.read_at < JOBS_CACHE:
            return
        self.read_at = time.monotonic()
        self.queue = await bus.jobs_queue()


JOBS = JobsGauges()


def install() -> None:
    """Register the worker's metrics in the process's registry (once, however often)."""
    metrics.install(
        RUNS,
        RUN_SECONDS,
        FIRST_TOKEN_SECONDS,
        TOKENS,
        TOOL_CALLS,
        TOOL_SECONDS,
        APPEND_SECONDS,
        APPEND_BATCH_SIZE,
        LEASE_LOSSES,
        JOBS,
    )


# --- the port ---------------------------------------------------------------------

Respond = Callable[[str, list[tuple[str, str]]], Any]


class Probes:
    """What the port answers, read from its own thread: the loop's health and the worker's."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        bus: Bus,
        ready: Callable[[], bool],
        metrics_on: bool = True,
    ) -> None:
        self.loop = loop
        self.bus = bus
        self.ready = ready  # consuming and not draining; read in the loop
        # With metrics off the port still answers the probes, so that turning metrics
        # off never fails a liveness probe.
        self.metrics_on = metrics_on

    def _in_loop(self, call: Callable[[], Any], timeout: float) -> Any:
        """Run ``call`` in the worker's loop and wait for its result (raises on timeout)."""

        async def run() -> Any:
            result = call()
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def live(self) -> bool:
        """Whether the worker's loop runs a callback within LOOP_TIMEOUT."""
        try:
            return bool(self._in_loop(lambda: True, LOOP_TIMEOUT))
        except (concurrent.futures.TimeoutError, RuntimeError):
            return False

    def is_ready(self) -> bool:
        """Whether the worker consumes jobs and is not draining."""
        try:
            return bool(self._in_loop(self.ready, LOOP_TIMEOUT))
        except (concurrent.futures.TimeoutError, RuntimeError):
            return False

    def exposition(self) -> bytes:
        """The registry, the jobs gauges read first (skipped if Redis does not answer)."""
        with contextlib.suppress(Exception):  # the gauges keep their last values
            self._in_loop(lambda: JOBS.refresh(self.bus), JOBS_TIMEOUT)
        return metrics.exposition()

    def __call__(self, environ: dict[str, Any], respond: Respond) -> list[bytes]:
        """The WSGI application: /metrics, /healthz and /readyz."""
        path = environ.get("PATH_INFO", "")
        if path == "/metrics" and self.metrics_on:
            return _answer(respond, "200 OK", self.exposition(), metrics.CONTENT_TYPE)
        if path == "/healthz":
            ok = self.live()
        elif path == "/readyz":
            ok = self.is_ready()
        else:
            return _answer(respond, "404 Not Found", b"not found\n")
        if ok:
            return _answer(respond, "200 OK", b'{"status":"ok"}', "application/json")
        return _answer(respond, "503 Service Unavailable", b'{"status":"unavailable"}')


def _answer(
    respond: Respond, status: str, body: bytes, content_type: str = "text/plain"
) -> list[bytes]:
    respond(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


MAX_REQUESTS = 16  # probes and scrapes served at once
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request
SLOT_WAIT = 1.0  # seconds a new client waits for the slot a silent one gives up


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per request, at most MAX_REQUESTS at once: a slow scrape does not hold
    a probe up, and idle or slow clients cannot pile threads up.

    With every slot taken, the client that has waited longest without sending a whole
    request head is cut off for the newcomer: else a few silent connections would close
    every kubelet probe at once, and the worker would be restarted in a loop.
    """

    daemon_threads = True
    block_on_close = False  # a request waiting for a loop that stopped is not waited for
    slots = threading.BoundedSemaphore(MAX_REQUESTS)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.silent: dict[Any, float] = {}  # connections without a whole head, and since when
        self.silent_lock = threading.Lock()  # the serving thread and the request threads

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve it in a thread if a slot is free or a silent client gives one up; else
        close it."""
        if not self.slots.acquire(blocking=False):
            self._cut_longest_silent()
            if not self.slots.acquire(timeout=SLOT_WAIT):
                self.shutdown_request(request)
                return
        with self.silent_lock:
            self.silent[request] = time.monotonic()
        super().process_request(request, client_address)

    def _cut_longest_silent(self) -> None:
        """Shut the longest silent connection down, so that its thread ends."""
        with self.silent_lock:
            longest = min(self.silent, key=self.silent.__getitem__, default=None)
        if longest is not None:
            with contextlib.suppress(OSError):
                longest.shutdown(socket.SHUT_RDWR)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one request, then give its slot back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.heard(request)
            self.slots.release()

    def heard(self, request: Any) -> None:
        """``request`` sent its whole head (or is done): it is no longer silent."""
        with self.silent_lock:
            self.silent.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-request: a debug line, not a traceback on stderr."""
        logger.debug("metrics port: a request from %s failed", client_address[0])


class _Quiet(WSGIRequestHandler):
    """No access line per probe on standard error; a client silent for REQUEST_TIMEOUT
    seconds is dropped."""

    timeout = REQUEST_TIMEOUT
    server: _Server

    def parse_request(self) -> bool:
        """Read the request head; once it is whole, the client is no longer silent."""
        parsed = super().parse_request()
        self.server.heard(self.connection)
        return parsed

    def log_message(self, format: str, *args: Any) -> None:
        """Say nothing."""


@contextlib.asynccontextmanager
async def serving(port: int, probes: Probes) -> AsyncIterator[int | None]:
    """Serve ``probes`` on ``port`` (all interfaces) while inside; yields the port, or
    None when it is 0 or taken (logged: the worker runs on without it)."""
    if port == 0:
        yield None
        return
    try:
        server = make_server("", port, probes, server_class=_Server, handler_class=_Quiet)
    except OSError as exc:
        logger.error("metrics port %d not served: %s", port, exc.strerror or exc)
        yield None
        return
    thread = threading.Thread(target=server.serve_forever, name="metrics-port", daemon=True)
    thread.start()
    logger.info("metrics, /healthz and /readyz on port %d", server.server_port)
    try:
        yield server.server_port
    finally:
        await asyncio.to_thread(server.shutdown)  # within its poll interval, 0.5 s
        server.server_close()
