"""Slow viewers: their deltas are merged, never dropped, and only a byte cap closes them.

The merge is a pure function on a queue of frames (api/backlog.py), tested with plain
data; then a real frontend serves one session at 100 tokens/s to a viewer that keeps
up, one that reads a tenth of the time, one that stops reading for 10 s, and one on a
frontend with a small byte cap.
"""

import asyncio
import json
import socket
import time

import orjson
import pytest
import websockets

from tests.conftest import start_cluster
from tests.procs import seconds
from tests.wsclient import connect, greeting
from thoughtwire.api.backlog import CONTROL_PATIENCE, Backlog, merge
from thoughtwire.shared.protocol import event_position
from thoughtwire.shared.reducer import fold, reduce

E = "e1"


def event(seq, type_="answer", content="t", block="b6", run="r1", **extra):
    """An event frame as the log writes it: position last."""
    fields = {"type": type_, "content": content, "block": block, "delta": True, **extra}
    fields.update(session="s1", run=run, ts=1000 + seq)
    return orjson.dumps(fields)[:-1].decode() + f',"seq":{seq},"epoch":"{E}"}}'


def end(seq, block="b6", run="r1"):
    fields = {"type": "block_end", "block": block, "session": "s1", "run": run, "ts": seq}
    return orjson.dumps(fields)[:-1].decode() + f',"seq":{seq},"epoch":"{E}"}}'


def done(seq, run="r1"):
    fields = {"type": "done", "content": "", "session": "s1", "run": run, "ts": seq}
    return orjson.dumps(fields)[:-1].decode() + f',"seq":{seq},"epoch":"{E}"}}'


def folded(frames):
    return fold(json.loads(f) if f.startswith("{") else f for f in frames)


# --- the merge, on plain data ---------------------------------------------------------


def test_consecutive_deltas_of_one_block_become_one_frame_covering_their_seqs():
    frames = [
        event(s, content=c) for s, c in zip(range(3, 8), ["a", "bc", "", "dé", "😀"], strict=True)
    ]
    (merged,) = merge(frames)
    got = json.loads(merged)
    assert got["content"] == "abcdé😀"
    assert (got["from_seq"], got["seq"], got["lengths"]) == (3, 7, [1, 2, 0, 2, 1])
    assert got["ts"] == 1007 and got["block"] == "b6" and got["delta"] is True
    assert event_position(merged) == (7, E)  # its position still reads off its tail
    assert folded([merged]) == folded(frames)


def test_control_events_other_blocks_and_runs_and_replies_are_kept_in_place():
    frames = [
        '{"type":"session","session":"s1"}',
        event(1, "thinking", "x", "b1"),
        event(2, "thinking", "y", "b1"),
        end(3, "b1"),
        event(4, "tool_input", "{", "b2", tool="search", call_id="c1"),
        event(5, "tool_input", "}", "b2", tool="search", call_id="c1"),
        event(6, content="A", block="b3"),
        event(7, content="B", block="b3", run="r2"),  # another run's block of the same id
        event(8, content="C", block="b3"),
        event(9, content="D", block="b3"),
        "not json",
        end(10, "b3"),
        done(11),
    ]
    out = merge(frames)
    kinds = [json.loads(f).get("type") if f.startswith("{") else f for f in out]
    assert kinds == [
        "session",
        "thinking",
        "block_end",
        "tool_input",
        "answer",
        "answer",
        "answer",
        "not json",
        "block_end",
        "done",
    ]
    assert [event_position(f) and event_position(f)[0] for f in out] == [
        None,
        2,
        3,
        5,
        6,
        7,
        9,
        None,
        10,
        11,
    ]
    assert out[4] == frames[6] and out[5] == frames[7]  # single deltas: not re-encoded
    assert folded(out) == folded(frames)


def test_a_hole_in_the_seqs_or_a_whole_item_is_not_merged_across():
    whole = event(3, content="whole", block="b6")
    whole = whole.replace('"delta":true', '"delta":false')
    frames = [event(1), event(2), whole, event(4), event(6)]
    assert merge(frames) == [merge(frames[:2])[0], whole, event(4), event(6)]


def test_a_merged_frame_merges_again_and_a_resumed_reducer_takes_only_what_it_lacks():
    frames = [event(s, content=f"<{s}>") for s in range(1, 21)]
    twice = merge([*merge(frames[:7]), *merge(frames[7:])])
    assert len(twice) == 1 and json.loads(twice[0])["lengths"] == [3] * 9 + [4] * 11
    want = folded(frames)
    for seen in range(21):  # a client that had the first `seen` events, one by one
        state = folded(frames[:seen])
        assert reduce(state, json.loads(twice[0])) == want


def test_the_backlog_merges_only_past_its_threshold_and_closes_only_past_its_bytes():
    backlog = Backlog(merge_after=8, max_bytes=10_000)
    frames = [event(s, content="tok ") for s in range(1, 9)]
    for f in frames:
        assert backlog.push(f)
    assert len(backlog) == 8  # at the threshold: left alone
    assert backlog.push(event(9, content="tok "))
    assert len(backlog) == 1 and json.loads(backlog.pop())["from_seq"] == 1
    small = Backlog(merge_after=8, max_bytes=600)
    pushed = [small.push(event(s, content="x" * 20)) for s in range(1, 40)]
    assert all(pushed[:20]) and not pushed[-1]  # merged, the content alone is over 600


def test_on_a_lagging_backlog_a_control_event_does_not_wait_behind_tokens():
    backlog = Backlog(merge_after=16, max_bytes=1 << 20)
    for s in range(1, 18):
        backlog.push(event(s))  # past the threshold: merged into one, and lagging
    for s in range(18, 18 + CONTROL_PATIENCE + 2):
        backlog.push(event(s))
    backlog.push(end(CONTROL_PATIENCE + 20))
    queued = [backlog.pop() for _ in range(len(backlog))]
    assert [json.loads(f)["type"] for f in queued] == ["answer", "block_end"]
    assert json.loads(queued[0])["from_seq"] == 1


def test_a_backlog_under_its_threshold_is_never_merged():
    """A reader that keeps up, or a catch-up pacing itself, gets every event as it is."""
    backlog = Backlog(merge_after=16, max_bytes=1 << 20)
    frames = [event(s) if s % 5 else end(s) for s in range(1, 17)]
    for f in frames:
        backlog.push(f)
    assert [backlog.pop() for _ in range(len(backlog))] == frames
    for s in range(1, 18):
        backlog.push(event(s))  # past the threshold: merged
    assert json.loads(backlog.pop())["from_seq"] == 1
    assert backlog.empty()  # emptied: no longer lagging
    frames = [event(s) for s in range(18, 28)] + [end(28)]
    for f in frames:
        backlog.push(f)
    assert [backlog.pop() for _ in range(len(backlog))] == frames


def test_the_backlog_counts_its_bytes_as_frames_come_and_go():
    backlog = Backlog(merge_after=4, max_bytes=1 << 20)
    for s in range(1, 30):
        backlog.push(event(s))
        if s % 3 == 0:
            backlog.pop()
        assert backlog.bytes == sum(map(len, list(backlog._frames)))


# --- a real frontend ---------------------------------------------------------------
#
# On loopback the kernel takes megabytes for a client that stops reading before the
# frontend sees any push back, so a run at 100 tokens/s (16 KB/s) fits in the socket
# buffers for the whole of a 10 s pause. The paced test shows what a viewer gets at
# that rate; the flooded one streams 40,000 tokens at once, so that the frontend's
# queues fill, merge and, on the frontend with a small byte cap, close.

PACED_TOKENS = 1500  # 15 s at 100 tokens/s
FLOOD_TOKENS = 40_000
PAUSE = 10.0


def lagging(frontend, path):
    """A client with a small receive buffer, and no keepalive of its own (its pong
    would wait behind the frames it has not read)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", frontend.port))
    return connect(frontend.ws + path, sock=sock, max_queue=1, ping_interval=None)


async def read_until_done(ws, frames, slowly=False):
    """Append frames (decoded) until the run's ``done``; returns when the first frame
    arrived that was produced less than 250 ms before. ``slowly``: read a tenth of the
    time, 10 ms of every 100 ms (the slow reader's pace is the input here)."""
    loop = asyncio.get_running_loop()
    live = None
    async with asyncio.timeout(seconds(90)):
        while True:
            burst = loop.time() + 0.01
            while not slowly or loop.time() < burst:
                frames.append(json.loads(await ws.recv()))
                if live is None and time.time() * 1000 - frames[-1].get("ts", 0) < 250:
                    live = time.monotonic()
                if frames[-1].get("type") == "done":
                    return live
            await asyncio.sleep(0.09)


async def assert_open(*sockets):
    """Nobody was closed: each socket still answers a ping."""
    for ws in sockets:
        async with asyncio.timeout(seconds(5)):
            await (await ws.ping())


@pytest.fixture
def paced(redis_server, logdir):
    """100 tokens/s."""
    c = start_cluster(
        redis_server,
        logdir,
        frontends=1,
        THOUGHTWIRE_SIM_ANSWER_TOKENS=str(PACED_TOKENS),
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="100",
        THOUGHTWIRE_SEND_QUEUE_SIZE="32",
    )
    yield c
    c.stop()


@pytest.fixture
def flooded(redis_server, logdir):
    """40,000 tokens at once; a second frontend with a byte cap of 2,000."""
    c = start_cluster(
        redis_server,
        logdir,
        frontends=1,
        THOUGHTWIRE_SIM_ANSWER_TOKENS=str(FLOOD_TOKENS),
        THOUGHTWIRE_SEND_QUEUE_SIZE="32",
        # The fast viewer must read 40,000 tokens sent at once unmerged: only the
        # kernel's send buffer (megabytes) takes that burst for it on a loaded machine.
        # The capped buffer is tested in tests/test_send_buffer.py.
        THOUGHTWIRE_SEND_BUFFER_BYTES="0",
    )
    c.add_frontend(THOUGHTWIRE_SEND_QUEUE_BYTES="2000")
    yield c
    c.stop()


async def test_at_100_tokens_a_slow_viewer_and_one_paused_10_s_get_every_token_and_stay(paced):
    (frontend,) = paced.frontends
    async with connect(frontend.ws + "/ws/agent-thoughts") as fast:
        session = await greeting(fast)
        watch = f"/ws/agent-thoughts?session={session}"
        async with lagging(frontend, watch) as slow, lagging(frontend, watch) as paused:
            await greeting(slow)
            await greeting(paused)
            await fast.send("a long answer")
            fast_frames, slow_frames, paused_frames = [], [], []
            fast_reading = asyncio.create_task(read_until_done(fast, fast_frames))
            slow_reading = asyncio.create_task(read_until_done(slow, slow_frames, slowly=True))
            await asyncio.sleep(PAUSE)  # the pause is the input
            resumed = time.monotonic()
            live = await read_until_done(paused, paused_frames)
            assert live is not None and live - resumed < seconds(2.0), live and live - resumed
            await fast_reading
            await slow_reading
            want = folded(json.dumps(f) for f in fast_frames)
            assert len([f for f in fast_frames if "seq" in f]) >= PACED_TOKENS
            assert fold(slow_frames) == want and fold(paused_frames) == want
            await assert_open(fast, slow, paused)


async def test_flooded_lagging_viewers_get_merged_deltas_and_only_one_past_the_byte_cap_is_closed(
    flooded,
):
    roomy, capped = flooded.frontends
    async with connect(roomy.ws + "/ws/agent-thoughts") as fast:
        session = await greeting(fast)
        watch = f"/ws/agent-thoughts?session={session}"
        async with (
            lagging(roomy, watch) as slow,
            lagging(roomy, watch) as paused,
            lagging(capped, watch) as over,
        ):
            for ws in (slow, paused, over):
                await greeting(ws)
            await fast.send("a long answer")
            fast_frames, slow_frames, paused_frames = [], [], []
            slow_reading = asyncio.create_task(read_until_done(slow, slow_frames, slowly=True))
            await read_until_done(fast, fast_frames)
            want = folded(json.dumps(f) for f in fast_frames)
            assert len([f for f in fast_frames if "seq" in f]) >= FLOOD_TOKENS

            # The paused viewer read nothing for the whole run; it reads again now.
            resumed = time.monotonic()
            await read_until_done(paused, paused_frames)
            assert time.monotonic() - resumed < seconds(2.0)
            assert fold(paused_frames) == want
            await slow_reading
            assert fold(slow_frames) == want
            for frames in (slow_frames, paused_frames):
                assert any("from_seq" in f for f in frames)
                assert len(frames) < len(fast_frames)
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(seconds(30)):
                    while True:
                        await over.recv()
            assert over.close_code == 4008
            await assert_open(fast, slow, paused)
