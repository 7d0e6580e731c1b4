"""Paced runs: events stream one at a time, and clients come and go mid-stream."""

import asyncio
import time

import pytest
import redis

from shared.keys import Keys
from tests.conftest import start_cluster
from tests.procs import seconds
from tests.wsclient import connect, greeting, recv_json, run_events


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
    # And each event reached the client soon after the worker produced it.
    lags = [e["_received_ms"] - e["ts"] for e in events]
    assert max(lags) < seconds(0.5) * 1000


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
                assert [e["seq"] for e in remote_events] == list(range(1, 27))
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
