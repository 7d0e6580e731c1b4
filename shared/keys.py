"""Every Redis key, stream and channel name, built in one place.

A session's keys and channel all carry the Redis Cluster hash tag ``{<session>}``,
so they hash to one slot: the atomic "append to log and publish" script touches
only keys of one slot, and sharded pub/sub (SPUBLISH) lands on the same shard.
Nobody else formats key names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """Key and channel names under one prefix (one deployment, or one test)."""

    prefix: str = "tw"

    # Jobs: one stream, read by the ``workers`` consumer group.
    @property
    def jobs(self) -> str:
        """The stream of jobs the workers claim."""
        return f"{self.prefix}:jobs"

    jobs_group: str = "workers"

    # Per session: the event log, its metadata (seq, epoch) and its live channel.
    def session_log(self, session: str) -> str:
        """A session's bounded event log (a stream, ids ``0-<seq>``)."""
        return f"{self.prefix}:{{{session}}}:log"

    def session_meta(self, session: str) -> str:
        """A session's meta hash: its epoch and last seq."""
        return f"{self.prefix}:{{{session}}}:meta"

    def session_channel(self, session: str) -> str:
        """The pub/sub channel a session's events are published on."""
        return f"{self.prefix}:{{{session}}}:events"

    def session_snapshot(self, session: str) -> str:
        """A session's snapshot (a hash): ``epoch``, ``seq`` and the compacted ``state``."""
        return f"{self.prefix}:{{{session}}}:snapshot"

    def run(self, session: str, run: str) -> str:
        """A run's state: status, attempt, fence, lease, result. In its session's slot."""
        return f"{self.prefix}:{{{session}}}:run:{run}"

    def run_approval(self, session: str, run: str) -> str:
        """A run's tool call waiting for a person (a hash), and what resumes it there."""
        return f"{self.prefix}:{{{session}}}:run:{run}:approval"

    def session_memory(self, session: str) -> str:
        """The session's conversation: a list, one JSON array of messages per turn."""
        return f"{self.prefix}:{{{session}}}:memory"

    def session_runs(self, session: str) -> str:
        """The session's unfinished runs (a set), for "cancel everything"."""
        return f"{self.prefix}:{{{session}}}:runs"

    def session_queue(self, session: str) -> str:
        """The session's unfinished admitted runs (a sorted set scored by arrival order)."""
        return f"{self.prefix}:{{{session}}}:queue"

    def session_arrivals(self, session: str) -> str:
        """The session's arrival counter: the order number of its last admitted run."""
        return f"{self.prefix}:{{{session}}}:arrivals"

    def session_owner(self, session: str) -> str:
        """The user who owns a session."""
        return f"{self.prefix}:{{{session}}}:owner"

    # Presence: who watches a session, one entry per frontend (shared/presence.py).
    def session_presence(self, session: str) -> str:
        """A session's watchers: a hash, frontend id -> JSON ``{user: sockets}``."""
        return f"{self.prefix}:{{{session}}}:presence"

    def session_presence_expiry(self, session: str) -> str:
        """When each frontend's presence entry lapses (a sorted set, Unix ms)."""
        return f"{self.prefix}:{{{session}}}:presence:expiry"

    def session_presence_channel(self, session: str) -> str:
        """The pub/sub channel a session's ``presence`` frames are published on."""
        return f"{self.prefix}:{{{session}}}:presence:frames"

    # Per user, for limits held across frontends. User ids (JWT subjects) can hold any
    # character, so keys carry a digest of them.
    def user_rate(self, user: str, window: int) -> str:
        """A user's request count in one rate window."""
        return f"{self.prefix}:user:{{{_digest(user)}}}:rate:{window}"

    def user_runs(self, user: str) -> str:
        """A user's run slots: the runs queued or running."""
        return f"{self.prefix}:user:{{{_digest(user)}}}:runs"

    def user_sockets(self, user: str) -> str:
        """A user's socket slots: the sockets open on any frontend."""
        return f"{self.prefix}:user:{{{_digest(user)}}}:sockets"

    def user_budget(self, user: str, window: str, number: int) -> str:
        """A user's tokens charged in budget window ``number`` of its kind (``minute``, ``day``)."""
        return f"{self.prefix}:user:{{{_digest(user)}}}:budget:{window}:{number}"

    # Jobs by id (the run id), and by the client's idempotency key.
    def job(self, run: str) -> str:
        """A job by its id, the run id: the session it runs in."""
        return f"{self.prefix}:job:{run}"

    def idempotency(self, user: str, key: str) -> str:
        """A user's idempotency key: two users choosing the same key never meet."""
        # Hashed: the client's key can be any text, and its length is bounded here. The
        # user's length goes first, so no (user, key) pair spells another's.
        scoped = f"{len(user)}:{user}:{key}"
        return f"{self.prefix}:idem:{hashlib.sha256(scoped.encode()).hexdigest()}"

    def idempotency_prompt(self, user: str, key: str) -> str:
        """Which prompt a user's idempotency key was taken for: beside the key, in its slot
        (tagged with the key's whole name), so that one script writes both."""
        return f"{{{self.idempotency(user, key)}}}:prompt"

    @property
    def dead_letters(self) -> str:
        """The stream of jobs that failed every attempt."""
        return f"{self.prefix}:dead"

    @property
    def worker_control(self) -> str:
        """Where frontends tell every worker to cancel a run."""
        return f"{self.prefix}:workers:control"

    # Connection-manager messages: one channel per client id, one for everyone.
    def client_channel(self, client_id: str) -> str:
        """A client's personal channel."""
        return f"{self.prefix}:client:{{{client_id}}}"

    @property
    def broadcast_channel(self) -> str:
        """The channel every client hears."""
        return f"{self.prefix}:broadcast"

    def node_channel(self, node: str) -> str:
        """A frontend's own control channel; its pub/sub connection is never idle."""
        return f"{self.prefix}:node:{node}"

    def probe_channel(self, node: str, tag: str) -> str:
        """Where a frontend probes its connection to one master of a cluster: a sharded
        channel, in the slot of ``tag``, which the frontend picks among that master's."""
        return f"{self.prefix}:node:{node}:probe:{{{tag}}}"

    @property
    def runs_ended(self) -> str:
        """Where each run's end is announced (its id), for the frontends following runs."""
        return f"{self.prefix}:runs:ended"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]
