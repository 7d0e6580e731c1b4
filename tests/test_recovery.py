"""The resume merge, with plain data in and out; the viewer's catch-up, bounded."""

import asyncio
import logging

import orjson
import pytest

from tests.procs import seconds
from thoughtwire.api.recovery import CATCH_UP_ROUNDS, Position, Replay, recover, replay_from
from thoughtwire.api.viewer import Viewer
from thoughtwire.shared.bus import Meta
from thoughtwire.shared.closecodes import RECONNECT, Close
from thoughtwire.shared.keys import Keys


def ev(seq, epoch="e1", run="r"):
    return f'{{"type":"answer","content":"t{seq}","session":"s","run":"{run}","ts":1,"seq":{seq},"epoch":"{epoch}"}}'


def seqs(frames):
    return [orjson.loads(f).get("seq", orjson.loads(f)["type"]) for f in frames]


def test_resume_sends_what_follows_then_the_live_tail_without_duplicates():
    meta = Meta("e1", 7)
    assert replay_from(Position("e1", 4), meta) == 4
    result = recover("s", Position("e1", 4), meta, [ev(5), ev(6), ev(7)], [ev(7), ev(8)])
    assert seqs(result.frames) == [5, 6, 7, 8]
    assert result.position == Position("e1", 8)
    assert result.pending == []


def test_live_frames_already_in_the_log_are_dropped():
    result = recover("s", Position("e1", 0), Meta("e1", 3), [ev(1), ev(2), ev(3)], [ev(2), ev(3)])
    assert seqs(result.frames) == [1, 2, 3]


def test_following_from_now_sends_only_what_came_after_the_meta_read():
    meta = Meta("e1", 10)
    assert replay_from(None, meta) == 10
    result = recover("s", None, meta, [ev(11)], [ev(11), ev(12)])
    assert seqs(result.frames) == [11, 12]


def test_following_from_now_keeps_live_frames_the_meta_read_already_counted():
    # Subscribed, then seqs 1-3 were written, then the meta was read, then the log
    # (after 3) was read: 1-3 are new to us, and in order before 4 and 5.
    result = recover("s", None, Meta("e1", 3), [ev(4), ev(5)], [ev(1), ev(2), ev(3), ev(4), ev(5)])
    assert seqs(result.frames) == [1, 2, 3, 4, 5]


def test_a_trimmed_log_is_announced_as_a_gap():
    result = recover("s", Position("e1", 2), Meta("e1", 9), [ev(6), ev(7), ev(8), ev(9)], [])
    gap = orjson.loads(result.frames[0])
    assert gap == {
        "type": "gap",
        "session": "s",
        "reason": "trimmed",
        "after": 2,
        "epoch": "e1",
        "next": 6,
    }
    assert seqs(result.frames[1:]) == [6, 7, 8, 9]


def test_a_new_epoch_is_a_gap_and_replays_the_new_log_from_its_start():
    meta = Meta("e2", 3)
    assert replay_from(Position("e1", 40), meta) == 0
    result = recover("s", Position("e1", 40), meta, [ev(1, "e2"), ev(2, "e2"), ev(3, "e2")], [])
    assert orjson.loads(result.frames[0])["reason"] == "epoch"
    assert orjson.loads(result.frames[0])["next"] == 1
    assert seqs(result.frames[1:]) == [1, 2, 3]
    assert result.position == Position("e2", 3)


def test_a_position_past_the_end_means_the_log_restarted():
    # A client that does not know the epoch: seq 40 cannot exist in a log at seq 3.
    assert replay_from(Position(None, 40), Meta("e2", 3)) == 0
    result = recover("s", Position(None, 40), Meta("e2", 3), [ev(1, "e2")], [])
    assert orjson.loads(result.frames[0])["reason"] == "epoch"


def test_an_expired_log_is_a_gap_and_later_events_are_adopted():
    result = recover("s", Position("e1", 5), Meta(None, 0), [], [ev(1, "e9"), ev(2, "e9")])
    gap = orjson.loads(result.frames[0])
    assert (gap["reason"], gap["after"], gap["next"]) == ("expired", 5, 1)
    assert seqs(result.frames[1:]) == [1, 2]
    assert result.position == Position("e9", 2)


def test_a_fresh_viewer_of_an_empty_session_gets_no_gap():
    result = recover("s", Position(None, 0), Meta(None, 0), [], [ev(1)])
    assert seqs(result.frames) == [1]


def test_frames_of_a_newer_epoch_than_the_log_read_are_left_pending():
    result = recover("s", Position("e1", 1), Meta("e1", 2), [ev(2)], [ev(1, "e2"), ev(2, "e2")])
    assert seqs(result.frames) == [2]
    assert result.position == Position("e1", 2)
    assert result.pending == [ev(1, "e2"), ev(2, "e2")]


def test_non_event_frames_are_ignored():
    result = recover("s", Position("e1", 0), Meta("e1", 1), [ev(1)], ['{"type":"personal"}'])
    assert seqs(result.frames) == [1]


def test_a_stale_epoch_at_seq_0_is_a_gap_not_a_frame_left_pending_forever():
    meta = Meta("e2", 2)
    assert replay_from(Position("e1", 0), meta) == 0
    result = recover("s", Position("e1", 0), meta, [ev(1, "e2"), ev(2, "e2")], [])
    gap = orjson.loads(result.frames[0])
    assert (gap["reason"], gap["after"], gap["epoch"], gap["next"]) == ("epoch", 0, "e2", 1)
    assert seqs(result.frames[1:]) == [1, 2]
    assert result.pending == []


def test_a_named_epoch_at_seq_0_of_a_log_that_is_gone_is_a_gap():
    result = recover("s", Position("e1", 0), Meta(None, 0), [], [ev(1, "e2")])
    assert [orjson.loads(f).get("reason") for f in result.frames] == ["expired", None]
    assert result.position == Position("e2", 1)


def test_a_position_without_an_epoch_is_told_which_epoch_it_continues_in():
    meta = Meta("e1", 7)
    assert replay_from(Position(None, 4), meta) == 4
    result = recover("s", Position(None, 4), meta, [ev(5), ev(6), ev(7)], [])
    gap = orjson.loads(result.frames[0])
    assert (gap["reason"], gap["after"], gap["epoch"], gap["next"]) == ("unconfirmed", 4, "e1", 5)
    assert seqs(result.frames[1:]) == [5, 6, 7]


def test_a_gap_that_did_not_know_the_epoch_learns_it_from_the_hole_that_follows():
    result = recover("s", Position("e1", 5), Meta(None, 0), [], [ev(3, "e9"), ev(4, "e9")])
    gap = orjson.loads(result.frames[0])
    assert (gap["reason"], gap["epoch"], gap["next"]) == ("expired", "e9", 3)


class RestartingLog:
    """A log that restarts under a new epoch between every two reads: nothing can settle."""

    keys = Keys("t")

    def __init__(self) -> None:
        self.epochs = 0
        self.calls = 0

    def session_channel(self, session):
        return self.keys.session_channel(session)

    async def meta(self, session):
        self.calls += 1
        self.epochs += 1
        return Meta(f"e{self.epochs}", 1)

    async def history(self, session, after=0, count=None):
        self.calls += 1
        self.epochs += 1
        return [ev(1, f"e{self.epochs}")]


class ClosedLog:
    """A transport that takes every frame and notes each close."""

    def __init__(self, closed):
        self.closed = closed

    def write(self, frame, wire):
        return True

    async def send(self, frame):
        return True

    def close(self, code, reason):
        self.closed.append((code, reason))


class NoHub:
    async def join(self, channel, viewer, *args, **kwargs):
        pass

    async def leave(self, channel, viewer, *args, **kwargs):
        pass


async def test_a_catch_up_that_cannot_settle_closes_for_a_reconnect_and_warns_once(caplog):
    log, closed = RestartingLog(), []
    viewer = Viewer(log, NoHub(), ClosedLog(closed), queue_size=1000)
    with caplog.at_level(logging.WARNING, "thoughtwire.viewer"):
        await viewer.follow("s", 0, "e0")
        task = viewer._recovery
        assert task is not None
        await asyncio.wait([task], timeout=seconds(5))  # closing cancels the task itself
    assert task.done(), "the catch-up is still going"
    assert closed == [(Close.TRY_LATER, "could not catch up; reconnect and resume")]
    assert Close.TRY_LATER in RECONNECT
    assert len(caplog.records) == 1 and "did not settle" in caplog.records[0].getMessage()
    assert log.calls == 2 * CATCH_UP_ROUNDS  # a meta and a page a round, then no more
    await viewer.detach()


class LaggingLog:
    """A session log that counts an event before pub/sub has brought it to the frontend:
    the append writes and publishes at once, but the message is still on its way."""

    keys = Keys("t")

    def __init__(self) -> None:
        self.events: list[str] = []

    def session_channel(self, session):
        return self.keys.session_channel(session)

    async def meta(self, session):
        return Meta("e1", len(self.events)) if self.events else Meta(None, 0)

    async def history(self, session, after=0, count=None):
        newer = [e for e in self.events if orjson.loads(e)["seq"] > after]
        return newer if count is None else newer[:count]

    async def snapshot(self, session):
        return None  # none stored: a join's snapshot is folded from the log


class Frames(ClosedLog):
    """A transport that keeps every frame it is given."""

    def __init__(self):
        super().__init__([])
        self.frames = []

    def write(self, frame, wire):
        self.frames.append(frame)
        return True

    async def send(self, frame):
        self.frames.append(frame)
        return True


@pytest.mark.parametrize("replay", [Replay.RAW, Replay.SNAPSHOT])
async def test_a_viewer_joining_from_now_on_gets_the_event_its_greeting_led_to(replay):
    """The client, greeted, prompts; the run's first event is in the log (and its meta)
    before pub/sub brings it here. Now is where the log stood before the greeting, so
    the event is the viewer's, once, whichever way it comes first. A join that takes a
    snapshot (what JSON sockets ask for) got none of the event before: it read the log
    after the greeting, and took the event for the past, a snapshot of it or nothing."""
    log, sink = LaggingLog(), Frames()
    viewer = Viewer(log, NoHub(), sink, queue_size=100)
    await viewer.follow("s", greeting='{"type":"session","session":"s"}', replay=replay)
    log.events.append(ev(1))  # the answer to the greeting: logged, not heard yet
    async with asyncio.timeout(seconds(5)):  # the catch-up reads the log, and settles
        while viewer._buffer is not None:
            await asyncio.sleep(0.005)
    viewer.deliver(ev(1), (1, "e1"))  # pub/sub brings it at last
    viewer.deliver(ev(2), (2, "e1"))
    log.events.append(ev(2))
    async with asyncio.timeout(seconds(5)):
        while len(sink.frames) < 3:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert seqs(sink.frames) == ["session", 1, 2]
    await viewer.detach()


async def test_a_join_to_a_session_with_events_gets_a_snapshot_up_to_its_greeting_only():
    """The session has two events; the client, greeted, prompts, and its run's first event
    is logged before the join's snapshot is read (and before pub/sub brings it). The
    snapshot stops where the log stood at the greeting: the run's event comes as an
    event. Before, it was folded into the snapshot, and a client waiting for its own run's
    events (``ask()``) never got them."""
    log, sink = LaggingLog(), Frames()
    log.events += [ev(1, run="earlier"), ev(2, run="earlier")]
    viewer = Viewer(log, NoHub(), sink, queue_size=100)
    await viewer.follow("s", greeting='{"type":"session","session":"s"}', replay=Replay.SNAPSHOT)
    log.events.append(ev(3))  # the answer to the greeting: logged, not heard yet
    async with asyncio.timeout(seconds(5)):
        while viewer._buffer is not None:
            await asyncio.sleep(0.005)
    viewer.deliver(ev(3), (3, "e1"))
    async with asyncio.timeout(seconds(5)):
        while len(sink.frames) < 3:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    frames = [orjson.loads(f) for f in sink.frames]
    assert [(f["type"], f.get("seq")) for f in frames] == [
        ("session", None),
        ("snapshot", 2),
        ("answer", 3),
    ]
    assert list(frames[1]["state"]["runs"]) == ["earlier"]
    await viewer.detach()


class TwoLogs:
    """Two sessions' logs; reading ``gated`` ones' meta waits for ``gate``."""

    keys = Keys("t")

    def __init__(self, events: dict[str, list[str]]) -> None:
        self.events = events
        self.gated: set[str] = set()
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()  # a gated read waits
        self.swallow = False  # a cancel while a gated read waits is lost

    def session_channel(self, session):
        return self.keys.session_channel(session)

    async def meta(self, session):
        if session in self.gated:
            self.waiting.set()
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                if not self.swallow:
                    raise
                # What asyncio.wait_for does on Python 3.11 when the reply and the
                # cancel come together: the reply is returned, the cancel is lost.
        events = self.events[session]
        return Meta(orjson.loads(events[-1])["epoch"], len(events)) if events else Meta(None, 0)

    async def history(self, session, after=0, count=None):
        newer = [e for e in self.events[session] if orjson.loads(e)["seq"] > after]
        return newer if count is None else newer[:count]


class SlowLeaveHub(NoHub):
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.leaving = asyncio.Event()

    async def leave(self, channel, viewer, *args, **kwargs):
        self.leaving.set()
        await self.release.wait()  # the hub's lock, held by a reconnect, say


async def test_a_switch_to_another_session_is_not_taken_over_by_a_catch_up_of_the_old_one():
    """A frame with a hole in the old session, while the viewer waited to leave it,
    started a catch-up of the old session; the new session's own then never started,
    and the client got the old session's frames after the new one's greeting."""
    log = TwoLogs({"s1": [ev(1)], "s2": [ev(1, "e2", "x"), ev(2, "e2", "x")]})
    hub, sink = SlowLeaveHub(), Frames()
    viewer = Viewer(log, hub, sink, queue_size=100)
    await viewer.follow("s1", 0, "e1")
    async with asyncio.timeout(seconds(5)):
        while viewer._buffer is not None:
            await asyncio.sleep(0.005)
    log.gated.add("s1")
    switching = asyncio.create_task(viewer.follow("s2", 0, "e2", greeting='{"type":"session"}'))
    async with asyncio.timeout(seconds(5)):
        await hub.leaving.wait()  # waiting to leave s1
    viewer.deliver(ev(3), (3, "e1"))  # a hole in s1: seq 2 never came
    hub.release.set()
    async with asyncio.timeout(seconds(5)):
        await switching
        log.gate.set()
        while len(sink.frames) < 4 or viewer._buffer is not None:
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    frames = [orjson.loads(f) for f in sink.frames]
    assert [(f["type"], f.get("epoch"), f.get("seq")) for f in frames] == [
        ("answer", "e1", 1),
        ("session", None, None),
        ("answer", "e2", 1),
        ("answer", "e2", 2),
    ]
    viewer._stop_recovery()


async def test_a_catch_up_whose_cancel_was_lost_stops_once_its_viewer_moved_on():
    """A catch-up cancelled as its Redis read returned went on (Python 3.11 loses such a
    cancel inside asyncio.wait_for): a socket that resumed another session right on
    its greeting got the old session's frames, a false ``trimmed`` gap and events twice."""
    log = TwoLogs({"s1": [ev(1), ev(2)], "s2": [ev(1, "e2", "x"), ev(2, "e2", "x")]})
    log.gated.add("s1")
    log.swallow = True
    sink = Frames()
    viewer = Viewer(log, NoHub(), sink, queue_size=100)
    await viewer.follow("s1", 0, "e1")
    async with asyncio.timeout(seconds(5)):
        await log.waiting.wait()  # its catch-up waits for the meta read
    await viewer.follow("s2", 0, "e2", greeting='{"type":"session"}')
    async with asyncio.timeout(seconds(5)):
        while len(sink.frames) < 3 or viewer._buffer is not None:
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    frames = [orjson.loads(f) for f in sink.frames]
    assert [(f["type"], f.get("epoch"), f.get("seq")) for f in frames] == [
        ("session", None, None),
        ("answer", "e2", 1),
        ("answer", "e2", 2),
    ]
    viewer._stop_recovery()
