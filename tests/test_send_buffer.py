"""The kernel send buffer of accepted sockets is capped (THOUGHTWIRE_SEND_BUFFER_BYTES).

Linux doubles what SO_SNDBUF is set to, and ``ss -tm`` shows the result as ``tb`` of
the frontend's side of each connection. A viewer that stops reading then has its
backlog held by the frontend, where it is merged, instead of by the kernel.
"""

import asyncio
import json
import re
import socket
import subprocess
import time

import pytest

from tests.conftest import start_cluster
from tests.procs import Frontend, seconds, wait_until
from tests.test_embedded import EMBEDDED_ENV
from tests.wsclient import connect, greeting
from thoughtwire.shared.reducer import fold

SEND_BUFFER = 24_576  # not a size the kernel would pick: it must come from the setting
FLOOD_TOKENS = 4000  # about 600 KB of frames, far past a capped kernel's share


def kernel_buffers(server_port: int, client_port: int | None = None) -> list[tuple[int, int]]:
    """``(send buffer, Send-Q)`` of the frontend's side of each established connection."""
    peer = f" and dport = :{client_port}" if client_port else ""
    out = subprocess.run(
        ["ss", "-tmnH", "state", "established", f"( sport = :{server_port}{peer} )"],
        capture_output=True,
        text=True,
        timeout=seconds(10),
        check=True,
    ).stdout
    queues = [int(m) for m in re.findall(r"^\s*\d+\s+(\d+)\s", out, re.MULTILINE)]
    sizes = [int(m) for m in re.findall(r"\btb(\d+)", out)]
    assert len(queues) == len(sizes), out
    return list(zip(sizes, queues, strict=True))


def embedded_frontend(logdir, **env):
    node = Frontend("embedded-sndbuf", {**EMBEDDED_ENV, **env}, logdir)
    node.proc.args[3:4] = ["up"]  # `thoughtwire up` instead of `thoughtwire api`
    node.proc.args.remove("--insecure")
    return node


@pytest.mark.parametrize("mode", ["fast paths", "public APIs", "embedded"])
async def test_every_accepted_socket_gets_the_send_buffer(mode, redis_server, logdir):
    env = {"THOUGHTWIRE_SEND_BUFFER_BYTES": str(SEND_BUFFER)}
    if mode == "embedded":
        frontend, cluster = embedded_frontend(logdir, **env).start(), None
    else:
        env["THOUGHTWIRE_FAST_PATHS"] = "1" if mode == "fast paths" else "0"
        cluster = start_cluster(redis_server, logdir, frontends=1, workers=0, **env)
        (frontend,) = cluster.frontends
    try:
        async with connect(frontend.ws + "/ws/agent-thoughts") as ws:
            await greeting(ws)
            client_port = ws.local_address[1]
            assert kernel_buffers(frontend.port, client_port) == [(2 * SEND_BUFFER, 0)]
    finally:
        if cluster is not None:
            cluster.stop()
        else:
            frontend.proc.stop()


def stalled(frontend, path):
    """A client with a small receive buffer that reads only when told to."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", frontend.port))
    return connect(frontend.ws + path, sock=sock, max_queue=1, ping_interval=None)


async def read_run(ws):
    """Every frame, decoded, until the run's ``done``."""
    frames = []
    async with asyncio.timeout(seconds(60)):
        while not frames or frames[-1].get("type") != "done":
            frames.append(json.loads(await ws.recv()))
    return frames


def settled_send_queue(frontend, client_port):
    """The Send-Q of the frontend's side of a stalled socket, once three looks in a row agree."""
    looks: list[int] = []

    def steady():
        # A netlink dump is not atomic: with sockets coming and going around it,
        # one look can miss the connection. That look does not count.
        found = kernel_buffers(frontend.port, client_port)
        if not found:
            return False
        ((_size, queue),) = found
        looks.append(queue)
        return len(looks) > 2 and looks[-1] == looks[-2] == looks[-3] and queue

    wait_until(steady, 10, "the stalled socket's Send-Q to settle", interval=0.2)
    return looks[-1]


@pytest.fixture
def flooded(redis_server, logdir):
    """Two frontends, the first with a capped send buffer, the second with the kernel's."""
    c = start_cluster(
        redis_server,
        logdir,
        frontends=0,
        THOUGHTWIRE_SIM_ANSWER_TOKENS=str(FLOOD_TOKENS),
        THOUGHTWIRE_SEND_QUEUE_SIZE="32",
    )
    try:
        c.add_frontend(THOUGHTWIRE_SEND_BUFFER_BYTES=str(SEND_BUFFER))
        c.add_frontend(THOUGHTWIRE_SEND_BUFFER_BYTES="0")
        yield c
    finally:
        c.stop()


async def test_a_stalled_viewer_backs_up_into_the_frontend_which_merges_not_the_kernel(flooded):
    capped, autotuned = flooded.frontends
    async with connect(capped.ws + "/ws/agent-thoughts") as fast:
        session = await greeting(fast)
        watch = f"/ws/agent-thoughts?session={session}"
        async with stalled(capped, watch) as held, stalled(autotuned, watch) as free:
            await greeting(held)
            await greeting(free)
            await fast.send("a long answer")
            fast_frames = await read_run(fast)
            started = time.monotonic()
            held_queue = settled_send_queue(capped, held.local_address[1])
            free_queue = settled_send_queue(autotuned, free.local_address[1])
            # The capped kernel holds at most its buffer (it counts each segment's
            # overhead too); the autotuned one takes far more of the run.
            assert held_queue <= 2 * SEND_BUFFER, held_queue
            assert free_queue > 4 * SEND_BUFFER, free_queue
            held_frames = await read_run(held)
            free_frames = await read_run(free)
            assert time.monotonic() - started < seconds(30)
    want = fold(fast_frames)
    assert fold(held_frames) == want and fold(free_frames) == want
    # The capped frontend held the rest of the run in its queue, merged.
    assert any("from_seq" in f for f in held_frames)
    assert len(held_frames) < FLOOD_TOKENS
