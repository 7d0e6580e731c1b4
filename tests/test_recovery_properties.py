"""Resume as a property: any client position against any log, through the whole catch-up.

A model session publishes a history of events, one epoch after another (a restart, or
an expiry then a new epoch), into a log that keeps its last ``maxlen`` events and into
the live buffer of a viewer subscribed from some point. The real catch-up loop
(:func:`thoughtwire.api.recovery.catch_up`) runs against it, with more events published between
its reads. Whatever the position and the history, the loop ends within a bounded
number of steps, and a client that applies what it was sent (events, and gaps that
move it) never sees an event that does not follow its position: nothing repeated,
nothing skipped without a gap. It ends at the last event published, and when nothing
moved during the catch-up, a position the log can continue from gets exactly what
follows it, with no gap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from thoughtwire.api.recovery import (
    CATCH_UP_ROUNDS,
    Emit,
    GapReason,
    Position,
    ReadLog,
    ReadMeta,
    Settle,
    TakeLive,
    catch_up,
    log_reset,
    replay_from,
)
from thoughtwire.shared.bus import Meta

EPOCHS = ("ea", "eb", "ec")
FOREIGN = "zz"  # an epoch this session never had
EXPIRE = None  # in a history: the log and its meta are gone; the next event starts an epoch

Item = tuple[str, int] | None


def ev(epoch: str, seq: int) -> str:
    return (
        f'{{"type":"answer","content":"t","session":"s","run":"r","ts":1,'
        f'"seq":{seq},"epoch":"{epoch}"}}'
    )


@dataclass
class Session:
    """A model of a session's log, meta and channel, published one item at a time."""

    history: list[Item]
    maxlen: int
    subscribed_at: int
    published: int = 0
    live: list[str] = field(default_factory=list)  # what the viewer heard and not yet took

    def publish(self, count: int) -> None:
        for _ in range(count):
            if self.published == len(self.history):
                return
            item = self.history[self.published]
            if item is not None and self.published >= self.subscribed_at:
                self.live.append(ev(*item))
            self.published += 1

    def log(self) -> tuple[str | None, list[int]]:
        """The current epoch and the seqs its log still holds."""
        epoch: str | None = None
        seqs: list[int] = []
        for item in self.history[: self.published]:
            if item is None or item[0] != epoch:
                epoch, seqs = (None, []) if item is None else (item[0], [])
            if item is not None:
                seqs.append(item[1])
        return epoch, seqs[-self.maxlen :]

    def meta(self) -> Meta:
        epoch, seqs = self.log()
        return Meta(epoch, seqs[-1] if seqs else 0)

    def read(self, after: int, count: int) -> list[str]:
        epoch, seqs = self.log()
        assert epoch is not None or not seqs
        return [ev(epoch, s) for s in seqs if s > after][:count] if epoch else []

    def last_event(self) -> tuple[str, int] | None:
        """The last event published, when nothing expired after it."""
        return self.history[self.published - 1] if self.published else None


@dataclass
class Run:
    frames: list[dict[str, Any]]
    settled: bool
    metas: int
    steps: int


STEP_LIMIT = CATCH_UP_ROUNDS * 64  # far above what any example needs, far below a spin


def drive(
    session: Session, position: Position | None, schedule: list[int], page: int, resyncs: int = 0
) -> Run:
    """Run the real catch-up loop against the model; ``schedule`` publishes between reads.

    ``resyncs``: how many times the viewer answers that it may have missed frames (its
    hub reconnected) when the loop asks whether it is settled.
    """
    steps = catch_up("s", position, page=page)
    plan = iter(schedule)
    frames: list[dict[str, Any]] = []
    answer: Any = None
    metas = 0
    for count in range(1, STEP_LIMIT + 1):
        try:
            step = steps.send(answer)
        except StopIteration as done:
            return Run(frames, bool(done.value), metas, count)
        if isinstance(step, TakeLive):
            answer, session.live = session.live, []
        elif isinstance(step, ReadMeta):
            session.publish(next(plan, 0))
            answer, metas = session.meta(), metas + 1
        elif isinstance(step, ReadLog):
            session.publish(next(plan, 0))
            answer = session.read(step.after, step.count)
        elif isinstance(step, Emit):
            frames += [orjson.loads(f) for f in step.frames]
            answer = None
        else:
            assert isinstance(step, Settle)
            answer = not session.live and resyncs == 0
            resyncs = max(0, resyncs - 1)
    raise AssertionError(f"the catch-up loop did not end within {STEP_LIMIT} steps")


def start_of(session: Session, position: Position | None) -> Position:
    """Where a client following "from now on" stands: just before the first event it heard."""
    if position is not None:
        return position
    heard = [i for i in session.history[session.subscribed_at : session.published] if i]
    if not heard:
        return Position(FOREIGN, -1)  # nothing to hear: no event may be sent
    return Position(heard[0][0], heard[0][1] - 1)


def apply(
    position: Position, frames: list[dict[str, Any]], session: Session, fresh: bool = False
) -> Position:
    """Play the frames as a client would; fail on any event that does not follow.

    ``fresh``: the client followed "from now on" and has nothing yet, so its first frame
    may also be a gap (after wherever "now" was when it joined) or the first event of
    the log's epoch (the whole of the current log, when the log it joined was lost).
    """
    epoch, seq = position.epoch, position.seq
    for i, frame in enumerate(frames):
        anywhere = fresh and i == 0
        if anywhere and frame["type"] != "gap" and frame["seq"] == 1:
            epoch, seq = frame["epoch"], 1
            continue
        if frame["type"] == "gap":
            if not anywhere:
                assert frame["after"] == seq, (
                    f"a gap after {frame['after']}, the client is at {seq}"
                )
            assert frame["next"] > 0 and frame["reason"] in set(GapReason), frame
            if frame["reason"] == GapReason.TRIMMED and frame["epoch"] == session.log()[0]:
                kept = session.log()[1]
                assert not kept or frame["next"] - 1 < kept[0], "a gap over events the log has"
            epoch, seq = frame["epoch"], frame["next"] - 1
            continue
        if epoch is None:
            assert seq == 0 and frame["seq"] == 1, f"{frame} after ({epoch}, {seq})"
        else:
            assert (frame["epoch"], frame["seq"]) == (epoch, seq + 1), (
                f"{frame['epoch']}:{frame['seq']} after {epoch}:{seq}"
            )
        epoch, seq = frame["epoch"], frame["seq"]
    return Position(epoch, seq)


@st.composite
def histories(draw: st.DrawFn) -> list[Item]:
    history: list[Item] = []
    for i in range(draw(st.integers(1, len(EPOCHS)))):
        if i and draw(st.booleans()):
            history.append(EXPIRE)  # otherwise a restart: the new epoch replaces the log
        history += [(EPOCHS[i], seq) for seq in range(1, draw(st.integers(1, 12)) + 1)]
    if draw(st.integers(0, 5)) == 0:
        history.append(EXPIRE)
    return history


positions = st.one_of(
    st.none(),
    st.builds(
        Position,
        st.sampled_from([None, *EPOCHS, FOREIGN]),
        st.one_of(st.just(0), st.integers(1, 16)),
    ),
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Session, Position | None, list[int], int, int]:
    history = draw(histories())
    before = draw(st.integers(0, len(history)))  # published before the catch-up starts
    session = Session(
        history,
        maxlen=draw(st.integers(1, 14)),
        subscribed_at=draw(st.integers(0, before)),
    )
    session.publish(before)
    schedule = draw(st.lists(st.integers(0, 4), max_size=8))
    return session, draw(positions), schedule, draw(st.integers(1, 6)), draw(st.integers(0, 2))


def continuable(session: Session, position: Position | None) -> bool:
    """Whether the log, as it stands, continues ``position`` with nothing missing."""
    epoch, seqs = session.log()
    if position is None or epoch is None:
        return False
    first, last = seqs[0], seqs[-1]
    if position.epoch is None:
        return position.seq == 0 and first == 1
    return position.epoch == epoch and first - 1 <= position.seq <= last


@settings(max_examples=2000, deadline=None)
@given(scenarios())
def test_any_resume_ends_and_sends_each_event_once_or_says_what_is_missing(scenario):
    session, position, schedule, page, resyncs = scenario
    quiet = not any(schedule)
    expected = None
    if quiet and continuable(session, position):
        assert position is not None
        expected = [(session.log()[0], s) for s in session.log()[1] if s > position.seq]
    run = drive(session, position, schedule, page, resyncs)
    assert run.settled, f"gave up after {run.metas} rounds"
    # One round, one more per epoch that began or frame of an old epoch that was heard,
    # and one more per resync.
    assert run.metas <= 2 + 2 * len(EPOCHS) + resyncs, f"{run.metas} rounds"
    start = start_of(session, position)  # once all that will be published is
    end = apply(start, run.frames, session, fresh=position is None)
    last = session.last_event()
    if start.seq < 0:
        # No event was published since the client joined; the log may still have been
        # lost meanwhile, and that is worth a gap.
        assert all(f["type"] == "gap" for f in run.frames), "an event nobody published"
        assert all(f["reason"] == GapReason.EXPIRED for f in run.frames), run.frames
    elif last is not None:
        assert (end.epoch, end.seq) == last, f"ended at {end}, the session is at {last}"
    if expected is not None:
        assert [(f.get("epoch"), f.get("seq")) for f in run.frames] == expected


@settings(max_examples=2000, deadline=None)
@given(
    st.builds(
        Position,
        st.sampled_from([None, "ea", FOREIGN]),
        st.one_of(st.just(0), st.integers(1, 40)),
    ),
    st.builds(Meta, st.sampled_from([None, "ea"]), st.integers(0, 30)),
)
def test_the_log_continues_a_position_only_when_it_is_that_positions_log(position, meta):
    if meta.epoch is None:
        meta = Meta(None, 0)
    reason = log_reset(position, meta)
    after = replay_from(position, meta)
    confirmed = position.epoch == meta.epoch and position.seq <= meta.last_seq
    if reason is None:
        assert confirmed or (position.epoch is None and position.seq == 0)
        assert after == position.seq
    else:
        assert not confirmed
        assert after == (position.seq if reason == GapReason.UNCONFIRMED else 0)
    if position.epoch not in (None, meta.epoch):
        assert reason is not None, "a foreign epoch is never taken as the log's, not even at 0"


def test_a_stale_epoch_at_seq_0_is_a_gap_and_ends():
    session = Session([("ea", s) for s in range(1, 6)], maxlen=10, subscribed_at=5)
    session.publish(5)
    run = drive(session, Position("zz", 0), [], page=2)
    assert run.settled and run.metas == 1
    gap = run.frames[0]
    assert (gap["type"], gap["reason"], gap["after"], gap["epoch"], gap["next"]) == (
        "gap",
        "epoch",
        0,
        "ea",
        1,
    )
    assert [f["seq"] for f in run.frames[1:]] == [1, 2, 3, 4, 5]


def test_a_client_sent_to_the_start_of_an_epoch_that_then_restarted_gets_a_gap():
    # Told "next 1 of ea", the client comes back after ea was lost and eb began.
    session = Session([("eb", 1), ("eb", 2)], maxlen=10, subscribed_at=2)
    session.publish(2)
    run = drive(session, Position("ea", 0), [], page=500)
    assert [f.get("reason", f.get("seq")) for f in run.frames] == ["epoch", 1, 2]


def test_an_old_epochs_frame_heard_before_the_meta_does_not_keep_the_loop_going():
    # ea 1-3 were heard, then the log restarted as eb before the meta was read.
    history: list[Item] = [("ea", 1), ("ea", 2), ("ea", 3), ("eb", 1)]
    session = Session(history, maxlen=10, subscribed_at=0)
    session.publish(4)
    run = drive(session, Position("eb", 0), [], page=500)
    assert run.settled and run.metas == 1
    assert [f.get("seq") for f in run.frames] == [1]


def test_an_epochless_position_is_told_where_the_stream_continues():
    session = Session([("ea", s) for s in range(1, 11)], maxlen=20, subscribed_at=10)
    session.publish(10)
    run = drive(session, Position(None, 4), [], page=3)
    gap = run.frames[0]
    assert (gap["reason"], gap["after"], gap["epoch"], gap["next"]) == ("unconfirmed", 4, "ea", 5)
    assert [f["seq"] for f in run.frames[1:]] == [5, 6, 7, 8, 9, 10]


def test_a_catch_up_that_never_settles_gives_up_after_its_rounds():
    steps = catch_up("s", Position("ea", 0), rounds=3)
    answer: Any = None
    metas = 0
    for _ in range(100):
        try:
            step = steps.send(answer)
        except StopIteration as done:
            assert done.value is False
            break
        metas += isinstance(step, ReadMeta)
        # A buffer that is never empty (a client that can never catch up).
        answer = {
            TakeLive: [],
            ReadMeta: Meta("ea", 0),
            ReadLog: [],
            Emit: None,
            Settle: False,
        }[type(step)]
    else:
        raise AssertionError("did not give up")
    assert metas == 3
