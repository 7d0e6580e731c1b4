"""The benchmark: thoughtwire, the thinnest correct relay, and python-socketio, side by side.

One run starts its own redis-server; then for every scenario and every system it starts
two frontends and one worker on loopback, drives them with load processes, and
measures from the outside: delivered events/s, latency from the producer's ``ts`` to
receipt, lost / duplicated / out-of-order events, frontend and worker CPU per event
(from /proc/PID/stat), peak RSS. Every loop is bounded; every process is stopped by PID.

    make bench                                   # the full run, about 10 minutes
    .venv/bin/python -m bench.run --profile smoke   # seconds; the test suite runs it
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.load import Plan, client_process

TICKS = os.sysconf("SC_CLK_TCK")
# thoughtwire-public is thoughtwire with THOUGHTWIRE_FAST_PATHS=0: public APIs only;
# thoughtwire-nometrics with THOUGHTWIRE_METRICS=0: nothing served, nothing scraped.
SYSTEMS = ("thoughtwire", "thoughtwire-public", "thoughtwire-nometrics", "thin", "socketio")
# thoughtwire with metrics on is scraped this often while it is measured (its frontends'
# /metrics and its worker's port): 15 times Prometheus' default rate, so what the
# scrapes cost weighs on its figures more than it would in production.
SCRAPE_INTERVAL = 1.0
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "streams": {"sessions": 200, "watchers": 1, "tokens": 200, "rate": 50},
        "saturation": {"sessions": 50, "watchers": 1, "tokens": 2000, "rate": 0},
        "fanout": {"sessions": 1, "watchers": 500, "tokens": 500, "rate": 100},
        "idle": {"idle": 10_000},
        "coalescing": {"sessions": 200, "watchers": 1, "tokens": 200, "rate": 50, "window_ms": 15},
    },
    # A tiny run of each path through every system: saturation and coalescing are the
    # streams path again, so the smoke run leaves them to the full run.
    "smoke": {
        "streams": {"sessions": 4, "watchers": 1, "tokens": 20, "rate": 100},
        "fanout": {"sessions": 1, "watchers": 10, "tokens": 20, "rate": 100},
        "idle": {"idle": 50},
    },
}
LOAD_PROCESSES = 2
# Paced tokens land within half an interval of their slots, for every system, as a real
# model's do. On a metronome, runs that start in the same millisecond (a worker takes
# queued jobs in batches) would send every token in the same millisecond, forever.
JITTER = 0.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.pid)

    def memory_kb(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(15)


def spawn(args: list[str], env: dict[str, str], log: Path) -> Proc:
    with log.open("ab") as out:
        popen = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )
    return Proc(popen)


def wait_for_port(port: int, proc: Proc, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited while starting")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@contextlib.contextmanager
def own_redis(workdir: Path, *options: str) -> Iterator[tuple[str, Proc]]:
    """A redis-server of our own on a free loopback port, persistence off unless
    ``options`` turn it on (a later option wins); stopped by its PID however the block
    ends. Yields its URL and the process."""
    port = free_port()
    redis = spawn(
        [
            *(shutil.which("redis-server") or "redis-server", "--port", str(port)),
            *("--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)),
            *options,
        ],
        {},
        workdir / "redis.log",
    )
    try:
        wait_for_port(port, redis)
        yield f"redis://127.0.0.1:{port}/0", redis
    finally:
        redis.stop()


class System:
    """Two frontends and a worker of one system."""

    def __init__(
        self,
        name: str,
        redis: Proc,
        redis_url: str,
        logdir: Path,
        scenario: dict[str, Any],
        prefix: str,
    ) -> None:
        self.name, self.redis, self.redis_url, self.logdir = name, redis, redis_url, logdir
        self.ports = [free_port(), free_port()]
        self.frontends: list[Proc] = []
        self.worker: Proc | None = None
        self.scenario = scenario
        self.prefix = prefix
        self.scraped: list[str] = []  # the /metrics URLs scraped while it is measured

    @property
    def thoughtwire(self) -> bool:
        """Whether this is thoughtwire, with its fast paths or without."""
        return self.name.startswith("thoughtwire")

    @property
    def urls(self) -> list[str]:
        scheme = "http" if self.name == "socketio" else "ws"
        return [f"{scheme}://127.0.0.1:{port}" for port in self.ports]

    def start(self) -> System:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> System:
        py = sys.executable
        rate = self.scenario.get("rate", 0)
        if self.thoughtwire:
            env = {
                "REDIS_URL": self.redis_url,
                "THOUGHTWIRE_KEY_PREFIX": self.prefix,
                "THOUGHTWIRE_AGENT": "simulated",
                "OPENAI_API_KEY": "",
                # Every event paced alike: the agent's steps take a token interval each.
                "THOUGHTWIRE_SIM_STEP_DELAY": str(1 / rate if rate else 0),
                "THOUGHTWIRE_SIM_ANSWER_TOKENS": str(self.scenario.get("tokens", 1)),
                "THOUGHTWIRE_SIM_TOKENS_PER_SECOND": str(rate),
                "THOUGHTWIRE_SIM_JITTER": str(self.scenario.get("jitter", JITTER)),
                "THOUGHTWIRE_WORKER_CONCURRENCY": "512",
                "THOUGHTWIRE_MAX_SOCKETS_PER_USER": "100000",
                "THOUGHTWIRE_DRAIN_WINDOW": "0.2",
                "THOUGHTWIRE_DRAIN_TIMEOUT": "2",
            }
            # Coalescing is off except where it is measured, so that every system
            # relays the same number of events and costs per event compare.
            env["THOUGHTWIRE_COALESCE_MS"] = str(self.scenario.get("window_ms", 0))
            env["THOUGHTWIRE_FAST_PATHS"] = "0" if self.name == "thoughtwire-public" else "1"
            metrics = self.name != "thoughtwire-nometrics"
            metrics_port = free_port() if metrics else 0
            env["THOUGHTWIRE_METRICS"] = "1" if metrics else "0"
            env["THOUGHTWIRE_METRICS_PORT"] = str(metrics_port)
            if metrics:
                urls = [f"http://127.0.0.1:{p}/metrics" for p in [*self.ports, metrics_port]]
                self.scraped = urls
            env.update(self.scenario.get("env", {}))  # what one benchmark sets besides
            cmds = [
                [
                    py,
                    "-m",
                    "thoughtwire",
                    "api",
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(p),
                ]
                for p in self.ports
            ]
            worker = [py, "-m", "thoughtwire", "worker"]
        else:
            module = "bench.thin" if self.name.startswith("thin") else "bench.sio"
            env = {}
            cmds = [
                [py, "-m", module, "--port", str(p), "--redis", self.redis_url] for p in self.ports
            ]
            worker = [py, "-m", "bench.feeder", "--system", self.name, "--redis", self.redis_url]
        for i, cmd in enumerate(cmds):
            self.frontends.append(spawn(cmd, env, self.logdir / f"{self.name}-frontend-{i}.log"))
        self.worker = spawn(worker, env, self.logdir / f"{self.name}-worker.log")
        for port, proc in zip(self.ports, self.frontends, strict=True):
            wait_for_port(port, proc)
        if self.thoughtwire:
            for port in self.ports:
                _wait_ready(f"http://127.0.0.1:{port}/readyz")
        return self

    def stop(self) -> None:
        procs = [*self.frontends, *([self.worker] if self.worker else [])]
        for proc in procs:  # all at once: each drains on its own
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.stop()


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _get(queue: Any, procs: list[Any], timeout: float) -> Any:
    """The next item, failing fast if a load process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=0.5)
        except Exception:  # queue.Empty
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("a load process failed; see its traceback above") from None
    raise TimeoutError("the load processes did not report in time")


@contextlib.contextmanager
def load_processes(plans: list[Plan]) -> Iterator[tuple[list[Any], Any, Any, Any]]:
    """Start one load process per plan; always reap them, killing stragglers.

    Yields the processes and three channels: ``ready`` (each says how many sockets it
    opened), ``go`` (set: start the runs) and ``results``. The processes keep their
    sockets open until the block ends, so no process closes hundreds of sockets while
    another one is still measuring.
    """
    ctx = mp.get_context("spawn")
    ready, results, go, stop = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    procs = [
        ctx.Process(target=client_process, args=(plan, ready, go, stop, results)) for plan in plans
    ]
    for p in procs:
        p.start()
    try:
        yield procs, ready, go, results
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()


@contextlib.contextmanager
def scraping(urls: list[str]) -> Iterator[list[int]]:
    """GET each of ``urls`` every SCRAPE_INTERVAL, from a thread, while inside; yields
    the count of scrapes answered 200 (one item, updated)."""
    stop = threading.Event()
    answered = [0]

    def scrape() -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.wait(SCRAPE_INTERVAL):
                for url in urls:
                    with contextlib.suppress(httpx.HTTPError):
                        answered[0] += client.get(url).status_code == 200

    thread = threading.Thread(target=scrape, name="scraper", daemon=True)
    if urls:
        thread.start()
    try:
        yield answered
    finally:
        stop.set()
        if urls:
            thread.join(timeout=10)


def run_load(
    system: System, plans: list[Plan], timeout: float
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    with load_processes(plans) as (procs, ready, go, results):
        for _ in plans:
            _get(ready, procs, timeout)
        watched = [*system.frontends, system.worker, system.redis]
        before = [p.cpu_seconds() for p in watched]  # type: ignore[union-attr]
        go.set()
        with scraping(system.scraped) as scrapes:
            out = [_get(results, procs, timeout) for _ in plans]
        after = [p.cpu_seconds() for p in watched]  # type: ignore[union-attr]
    cpu = {
        "frontend_cpu_s": sum(a - b for a, b in zip(after[:-2], before[:-2], strict=True)),
        "worker_cpu_s": after[-2] - before[-2],
        "redis_cpu_s": after[-1] - before[-1],
        "client_cpu_s": sum(o.get("cpu_s", 0.0) for o in out),  # each process's own
        "scrapes": scrapes[0],
    }
    return out, cpu


def plans_for(system: System, scenario: dict[str, Any]) -> list[Plan]:
    sockets = []
    for s in range(scenario["sessions"]):
        session = f"{system.prefix}-s{s}"
        for w in range(scenario["watchers"]):
            sockets.append((session, (s + w) % 2, w == 0))
    shares: list[list[tuple[str, int, bool]]] = [
        sockets[i::LOAD_PROCESSES] for i in range(LOAD_PROCESSES)
    ]
    return [
        Plan(
            system.name,
            system.urls,
            share,
            scenario["tokens"],
            scenario["rate"],
            system.redis_url,
            jitter=scenario.get("jitter", JITTER),
        )
        for share in shares
        if share
    ]


def measure_streams(system: System, scenario: dict[str, Any]) -> dict[str, Any]:
    out, cpu = run_load(system, plans_for(system, scenario), timeout=300)
    latencies = [v for o in out for v in o["latencies"]]
    handled = [v for o in out for v in o["handled"]]
    received = sum(o["received"] for o in out)
    # thoughtwire's simulated run adds eight steps before its answer (five, and its tool
    # call's three argument pieces) and `block_end` and `done` after it; with coalescing
    # on, fewer events carry the same tokens, so only gaps count then
    per_run = scenario["tokens"] + (10 if system.thoughtwire else 1)
    expected = per_run * scenario["sessions"] * scenario["watchers"]
    elapsed = (max(o["finished"] for o in out) - min(o["started"] for o in out)) / 1000
    produced = received / scenario["watchers"]
    return {
        "delivered": received,
        "events_per_s": round(received / elapsed, 1),
        "latency_ms_p50": round(percentile(latencies, 0.50), 2),
        "latency_ms_p99": round(percentile(latencies, 0.99), 2),
        "latency_ms_max": round(max(latencies, default=float("nan")), 2),
        # to the load process handling the event: adds its own queueing on shared cores
        "handled_ms_p50": round(percentile(handled, 0.50), 2),
        "handled_ms_p99": round(percentile(handled, 0.99), 2),
        # gaps inside what arrived, plus the tail of sockets that never got `done`
        "lost": sum(o["lost"] for o in out)
        + (0 if scenario.get("window_ms") else max(0, expected - received)),
        "duplicated": sum(o["duplicated"] for o in out),
        "out_of_order": sum(o["out_of_order"] for o in out),
        "incomplete_sockets": sum(o["incomplete"] for o in out),
        "frontend_cpu_us_per_event": round(cpu["frontend_cpu_s"] * 1e6 / max(received, 1), 1),
        "worker_cpu_us_per_event": round(cpu["worker_cpu_s"] * 1e6 / max(produced, 1), 1),
        # the one shared part: what a produced event costs Redis bounds how far it scales
        "redis_cpu_us_per_event": round(cpu["redis_cpu_s"] * 1e6 / max(produced, 1), 1),
        # the load processes' own cost, on the same cores: it weighs on every latency
        "client_cpu_us_per_event": round(cpu["client_cpu_s"] * 1e6 / max(received, 1), 1),
        "frontend_peak_rss_mb": round(
            max(p.memory_kb("VmHWM") for p in system.frontends) / 1024, 1
        ),
        "metrics_scrapes": int(cpu["scrapes"]),  # answered 200 while measured
    }


def measure_idle(system: System, scenario: dict[str, Any]) -> dict[str, Any]:
    """Open ``idle`` sockets on one frontend and hold them; RSS per socket."""
    count = scenario["idle"]
    frontend = system.frontends[0]
    base = frontend.memory_kb("VmRSS")
    sockets = [(f"{system.prefix}-idle{i}", 0, False) for i in range(count)]
    plans = [
        Plan(
            system.name, system.urls, sockets[i::LOAD_PROCESSES], 0, 0, system.redis_url, hold=True
        )
        for i in range(LOAD_PROCESSES)
    ]
    with load_processes(plans) as (procs, ready, _go, _results):
        opened = sum(_get(ready, procs, 600) for _ in plans)
        time.sleep(0.5)  # let the server settle before reading its RSS
        rss = frontend.memory_kb("VmRSS")
    return {
        "sockets": opened,
        "rss_mb": round(rss / 1024, 1),
        "rss_kb_per_socket": round((rss - base) / max(opened, 1), 1),
    }


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True
    ).stdout.split()[2]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "redis": redis_version,
        "kernel": platform.release(),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--out", default="bench/results/latest.json")
    parser.add_argument("--scenarios", default=",".join(PROFILES["full"]))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument(
        "--jitter", type=float, default=JITTER, help="of paced tokens, in intervals (0-0.5)"
    )
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # SIGTERM unwinds like an exception, so every process started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    logdir = Path(tempfile.mkdtemp(prefix="thoughtwire-bench-"))
    report: dict[str, Any] = {
        "profile": args.profile,
        "machine": machine(),
        "command": " ".join(sys.argv),
        "results": {},
    }
    with own_redis(logdir) as (redis_url, redis):
        for name in args.scenarios.split(","):
            if name not in PROFILES[args.profile]:
                continue
            scenario = {"jitter": args.jitter, **PROFILES[args.profile][name]}
            for system_name in args.systems.split(","):
                if name == "coalescing" and not system_name.startswith("thoughtwire"):
                    continue  # only thoughtwire has a coalescing window
                measure = measure_idle if name == "idle" else measure_streams
                # Its own keys per system and scenario: thoughtwire and thoughtwire-public
                # must not read each other's logs.
                prefix = f"b{name[:3]}{system_name[0]}{len(system_name)}{redis.pid}"
                system = System(system_name, redis, redis_url, logdir, scenario, prefix)
                try:
                    result = measure(system.start(), scenario)
                except Exception as exc:  # one system failing a scenario is a result too
                    result = {"error": f"{type(exc).__name__}: {exc}"}
                finally:
                    system.stop()
                report["results"].setdefault(name, {})[system_name] = result
                print(f"{name:>11} {system_name:>12} {json.dumps(result)}", flush=True)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}; logs in {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
