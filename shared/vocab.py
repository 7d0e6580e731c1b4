"""Closed vocabularies: the few words a run's life is told in, as enums.

Each value is the string the wire format, the run's hash in Redis and the Lua scripts
(shared/scripts.py) already use, so a ``StrEnum`` member compares equal to, and encodes
as, that string. Event types (``done``, ``error``, ``cancelled``, ...) are listed in
shared/protocol.py, gap reasons in api/recovery.py (``GapReason``).
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """A run's ``status`` in its hash: queued, then running, then one of the three ends."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        """Whether nothing more happens to a run in this status."""
        return self not in (RunStatus.QUEUED, RunStatus.RUNNING)


class StopReason(StrEnum):
    """Why a worker stops an attempt's agent before it finishes on its own."""

    CANCEL = "cancel"  # a client cancelled, or nobody watches an on_disconnect=cancel run
    LOST = "lost"  # the lease or the fence went to another attempt
    SHUTDOWN = "shutdown"  # the worker is stopping; the run goes back to the lease


class Verdict(StrEnum):
    """What the ``START`` script decides for a claimed job (shared/scripts.py)."""

    RUN = "run"  # a new attempt, with a fresh fence and lease
    CANCEL = "cancel"  # cancelled before it started: end it as cancelled
    DEAD = "dead"  # out of attempts: dead-letter it
    BUSY = "busy"  # another attempt holds a live lease: leave it
    FINISHED = "finished"  # already ended: acknowledge the job
    WAIT = "wait"  # an earlier-admitted run of the session has not ended: park the job


class Multitask(StrEnum):
    """What a prompt does while its session has an unfinished run (docs/protocol.md)."""

    REJECT = "reject"  # refused with code ``busy``
    ENQUEUE = "enqueue"  # runs after the unfinished runs, in arrival order
    INTERRUPT = "interrupt"  # cancels the unfinished runs, then runs after they end


class OnDisconnect(StrEnum):
    """What happens to a run once no socket watches its session (``disconnect_grace``)."""

    CONTINUE = "continue"  # it runs on; its events wait in the session's log
    CANCEL = "cancel"  # it is cancelled, as an interactive chat's is


class Decision(StrEnum):
    """The answer to a tool call's ``approval`` (docs/protocol.md, "Approvals")."""

    ALLOW = "allow"  # the tool runs
    DENY = "deny"  # it does not; the model is told so and goes on


class DecidedBy(StrEnum):
    """Who took an approval's decision."""

    USER = "user"  # the session's owner, from any frontend
    TIMEOUT = "timeout"  # nobody answered in time: the default was taken
    LOST = "lost"  # Redis lost the waiting call: denied, whatever the default


class ViewScope(StrEnum):
    """What a viewer token shows of its session (api/scopes.py, docs/protocol.md)."""

    FULL = "full"  # every event, as it is
    ANSWER = "answer"  # the answer and the run's shape: no reasoning, no tool arguments or results


class Replay(StrEnum):
    """How a viewer that joins, or whose position the log no longer holds, is caught up."""

    SNAPSHOT = "snapshot"  # one ``snapshot`` frame of the session's state, then the log after it
    RAW = "raw"  # the log's events as they are, and a ``gap`` for what it lost
