"""Paced runs: events stream one at a time, and clients come and go mid-stream."""

import asyncio
import json
import socket
import time

import pytest
import redis
import websockets

from tests.conftest import sim_run, start_cluster
from tests.procs import seconds
from tests.wsclient import connect, greeting, recv_json, run_events
from thoughtwire.api.connection import CLOSE_TIMEOUT
from thoughtwire.shared.closecodes import Close
from thoughtwire.shared.keys import Keys


@pytest.fixture(scope="module")
def paced(redis_server, logdir):
    """Runs of about 2 s: five steps 0.25 s apart, then 20 answer tokens at 20/s."""
    c = start_cluster(
        redis_server,
        logdir,
        THOUGHTWIRE_SIM_STEP_DELAY="0.25",
        THOUGHTWIRE_SIM_ANSWER_TOKENS="20",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="20",
    )
    yield c
    c.stop()


async def test_thoughts_arrive_as_they_are_produced_not_in_one_block(paced):
    async with connect(paced.frontends[0].ws + "/ws/agent-thoughts") as ws:
        await greeting(ws)
        await ws.send("What is machine learning?")
        events = await run_events(ws, stamp=True)
    first, last = events[0], events[-1]
    assert last["type"] == "done"
    # The first thought was in the client's hands more than a second before the
    # worker even produced the last one.
    assert first["_received_ms"] < last["ts"] - 1000
    # And each event reached the client soon after the worker produced it: most at once,
    # none held back (a busy machine may pause any one process for a moment).
    lags = sorted(e["_received_ms"] - e["ts"] for e in events)
    assert lags[len(lags) // 2] < seconds(0.2) * 1000, lags
    assert lags[-1] < seconds(1.5) * 1000, lags


def numsub(redis_client: redis.Redis, channel: str) -> int:
    return int(dict(redis_client.pubsub_numsub(channel))[channel.encode()])


async def wait_numsub(redis_client, channel, expected):
    deadline = time.monotonic() + seconds(10)
    while (count := numsub(redis_client, channel)) != expected:
        assert time.monotonic() < deadline, f"NUMSUB stayed {count}, expected {expected}"
        await asyncio.sleep(0.02)


async def test_a_client_closing_mid_stream_breaks_nothing_and_the_last_one_out_unsubscribes(paced):
    a, b = paced.frontends
    channel = Keys(paced.prefix).session_channel
    with paced.redis.client() as r:
        async with connect(a.ws + "/ws/agent-thoughts") as prompter:
            session = await greeting(prompter)
            async with (
                connect(f"{a.ws}/ws/agent-thoughts?session={session}") as neighbour,
                connect(f"{b.ws}/ws/agent-thoughts?session={session}") as remote,
            ):
                await greeting(neighbour)
                await greeting(remote)
                await wait_numsub(r, channel(session), 2)  # one subscription per frontend
                await prompter.send("a long story")
                while (await recv_json(prompter))["type"] != "answer":
                    pass
                await prompter.close()  # mid-stream

                remote_events, neighbour_events = await asyncio.gather(
                    run_events(remote), run_events(neighbour)
                )
                assert remote_events == neighbour_events
                assert [e["seq"] for e in remote_events] == list(range(1, len(sim_run(20)) + 1))
                assert numsub(r, channel(session)) == 2  # a still holds the neighbour

                await neighbour.close()
                await wait_numsub(r, channel(session), 1)  # a's last socket left
            await wait_numsub(r, channel(session), 0)

    for frontend in (a, b):
        assert frontend.proc.alive()
        async with connect(frontend.ws + "/ws/agent-thoughts") as ws:
            await greeting(ws)
            await ws.send("still serving?")
            assert (await run_events(ws))[-1]["type"] == "done"


async def test_a_client_that_stops_reading_is_closed_with_4008_and_nobody_else_waits(
    redis_server, logdir
):
    """Sockets that keep up get ready-made frames written at once (api.wire); one that
    stops reading is pushed back on by its transport, falls back to its queue, where
    its deltas are merged, and is closed with 4008 when the merged queue is over its
    byte cap. The others get every event.

    The close frame goes out behind what the transport already holds, without waiting
    for the client to read: a client that stays stalled past the close timeout still
    finds a clean prefix and then 4008, not a dropped connection (1006)."""
    c = start_cluster(
        redis_server,
        logdir,
        frontends=1,
        THOUGHTWIRE_SIM_ANSWER_TOKENS="40000",
        THOUGHTWIRE_SEND_QUEUE_SIZE="16",
        THOUGHTWIRE_SEND_QUEUE_BYTES="16384",
        # The prompter reads 40,000 tokens sent at once, every one as its own frame: it
        # keeps up only with the kernel's send buffer (megabytes) taking the burst. A
        # capped one hands the burst to its queue, which merges and, at this byte cap,
        # closes it too (tests/test_send_buffer.py shows the cap).
        THOUGHTWIRE_SEND_BUFFER_BYTES="0",
    )
    try:
        url = c.frontends[0].ws + "/ws/agent-thoughts"
        async with connect(url) as prompter:
            session = await greeting(prompter)
            stalled = socket.socket()
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect(("127.0.0.1", c.frontends[0].port))
            async with connect(f"{url}?session={session}", sock=stalled, max_queue=1) as slow:
                await greeting(slow)
                await prompter.send("a long answer")
                events = await run_events(prompter, timeout=60)
                assert [e["seq"] for e in events] == list(range(1, len(sim_run(40_000)) + 1))
                # The stall is the input here, not a wait for something: the client
                # goes on not reading for several times the frontend's close timeout,
                # and the close frame must still be there behind the prefix.
                await asyncio.sleep(seconds(4 * CLOSE_TIMEOUT))
                # Now read what the stalled client was sent: a prefix, then the close.
                got = []
                with pytest.raises(websockets.ConnectionClosed):
                    async with asyncio.timeout(seconds(30)):
                        while True:
                            got.append(json.loads(await slow.recv()))
                assert slow.close_code == Close.SLOW
                # Every event up to the close, once: a merged frame covers from_seq..seq.
                spans = [(e.get("from_seq", e["seq"]), e["seq"]) for e in got if "seq" in e]
                assert [first for first, _ in spans] == [1] + [last + 1 for _, last in spans[:-1]]
                assert spans[-1][1] < len(sim_run(40_000))
    finally:
        c.stop()
