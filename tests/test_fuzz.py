"""Hostile input, generated: random frames at a running frontend, while a good client streams.

The frontend must never crash, never answer 5xx, and the well-behaved client beside the
fuzzing must get every event of every run.
"""

import asyncio
import json

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import start_cluster
from tests.wsclient import connect, greeting, run_events

MAX_MESSAGE_BYTES = 4096

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
frames = st.one_of(
    st.text(max_size=300),  # random (and odd) unicode
    st.binary(max_size=300),
    st.builds(
        lambda n: "x" * n, st.integers(MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES * 3)
    ),  # oversized
    st.text(max_size=60).map(lambda t: "{" + t),  # broken JSON
    st.builds(
        lambda kind, rest: json.dumps({"type": kind, **rest}),
        st.sampled_from(
            ["prompt", "resume", "cancel", "auth", "personal", "broadcast", "pong", "launch", ""]
        ),
        st.dictionaries(
            st.sampled_from(["content", "session", "after", "run", "to", "token", "key", "epoch"]),
            json_values,
            max_size=4,
        ),
    ),
    st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth),  # deep nesting
    st.integers(1, 3000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
)


@pytest.fixture(scope="module")
def target(redis_server, logdir):
    c = start_cluster(
        redis_server, logdir, frontends=1, THOUGHTWIRE_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES)
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def loop_runner():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


async def send_one(url, frame):
    try:
        async with connect(url, open_timeout=5, close_timeout=1) as ws:
            await ws.send(frame)
            try:
                async with asyncio.timeout(0.2):
                    async for _ in ws:
                        pass
            except TimeoutError:
                pass
    except websockets.ConnectionClosed as exc:
        # Closing is an allowed answer to garbage, with a policy or size code, never 1011.
        assert exc.rcvd is None or exc.rcvd.code in (1000, 1008, 1009, 4003, 4029), exc


def test_random_frames_never_crash_the_frontend_or_lose_a_good_clients_events(target, loop_runner):
    frontend = target.frontends[0]
    endpoints = ["/ws/agent-thoughts", "/ws/robust", "/ws/chat", "/ws", "/ws/fuzzer"]
    good_runs = []

    async def good_client(stop):
        async with connect(frontend.ws + "/ws/agent-thoughts") as ws:
            await greeting(ws)
            while not stop.is_set():
                await ws.send("a well-behaved prompt")
                good_runs.append(await run_events(ws))

    @settings(
        max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(frame=frames, endpoint=st.sampled_from(endpoints))
    def fuzz(frame, endpoint):
        loop_runner.run_until_complete(send_one(frontend.ws + endpoint, frame))

    stop = asyncio.Event()
    good = loop_runner.create_task(good_client(stop))
    fuzz()
    stop.set()
    loop_runner.run_until_complete(asyncio.wait_for(good, 30))
    assert frontend.proc.alive()
    assert len(good_runs) >= 2
    for events in good_runs:
        assert [e["type"] for e in events][-1] == "done"
        assert [e["seq"] for e in events] == list(
            range(events[0]["seq"], events[0]["seq"] + len(events))
        )
    assert "Traceback" not in frontend.proc.output()


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    body=json_values,
    path=st.sampled_from(
        [
            "/v1/jobs",
            "/v1/jobs/x",
            "/v1/sessions/s/events?after=-1",
            "/v1/sessions/%7B/viewer-token",
        ]
    ),
)
def test_random_http_bodies_never_get_a_5xx(target, body, path):
    url = target.frontends[0].http + path
    with httpx.Client(timeout=5) as http:
        for method in ("POST", "GET", "DELETE"):
            response = http.request(method, url, json=body)
            assert response.status_code < 500, (method, path, body, response.text)
