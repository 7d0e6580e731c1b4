"""A frontend's metrics: plain counters where things happen, read by Prometheus at a scrape.

The relay's hot path pays no metric call per socket, nor one per message: the hub
adds the number of viewers a message went to to an ``int`` (:class:`Counts`), and
:class:`FrontendCollector` turns the counts, the open sockets and each viewer's lag
into Prometheus samples when ``/metrics`` is scraped. Rare things (a merge, a slow
viewer closed, a resume, a refusal, a pub/sub reconnect) add to the same counts.

The counts are the process's, as Prometheus' own instruments are: every frontend of a
process (a test's, or ``thoughtwire up``'s one) adds to them. The sockets and lags
are read from the frontends running now (:func:`watching`).

Names and labels: docs/operations.md, "Metrics". Label values come from closed sets
(route templates, close codes, outcomes, reasons), never from ids.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from enum import StrEnum
from typing import TYPE_CHECKING

import orjson
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from thoughtwire.shared import metrics
from thoughtwire.shared.closecodes import Close

if TYPE_CHECKING:
    from thoughtwire.api.frontend import Frontend
    from thoughtwire.api.viewer import Viewer

# Upper bounds of the viewer-lag histogram's buckets, in seqs.
LAG_BUCKETS = (0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10_000)


class Resume(StrEnum):
    """What a reconnect with a position got (``thoughtwire_resumes_total{outcome}``)."""

    RECOVERED = "recovered"  # every event it missed, from the log
    GAP = "gap"  # a ``gap`` reply: some of what it missed is gone
    SNAPSHOT = "snapshot"  # a snapshot in place of a log that no longer reached back


class Refusal(StrEnum):
    """Why a socket or request was refused (``thoughtwire_connections_refused_total``)."""

    # no token, a bad one, no right to the session, or a page of an origin (or a Host)
    # not allowed (4001, 4003, 1008 at admission, 401, 403)
    AUTH = "auth"
    LIMIT = "limit"  # over a per-user limit: rate, sockets, runs, budget (4029, 429)
    DRAINING = "draining"  # the frontend is restarting (1012, 503)
    INVALID = "invalid"  # a malformed request: a bad query or position (1008, 400, 422)
    UNAVAILABLE = "unavailable"  # Redis did not answer (1013, 503)


_REFUSALS: dict[int, Refusal] = {
    Close.RATE_LIMITED: Refusal.LIMIT,
    Close.RESTART: Refusal.DRAINING,
    Close.TRY_LATER: Refusal.UNAVAILABLE,
}


class Counts:
    """The frontend's counters, as plain ints: what the hot path can afford."""

    __slots__ = ("merged", "pubsub_reconnects", "refused", "relayed", "resumes", "slow_closes")

    def __init__(self) -> None:
        self.relayed = 0  # events handed to viewers, one per viewer and event
        self.merged = 0  # frames that a merge folded into another in a viewer's queue
        self.pubsub_reconnects = 0
        self.slow_closes: Counter[int] = Counter()  # by close code
        self.resumes: Counter[str] = Counter()  # by Resume
        self.refused: Counter[str] = Counter()  # by Refusal


COUNTS = Counts()

_frontends: dict[int, Frontend] = {}


@contextlib.contextmanager
def watching(frontend: Frontend) -> Iterator[None]:
    """Count ``frontend``'s sockets and lags while it runs (and serve them, if metrics are on)."""
    if frontend.settings.metrics:
        metrics.install(COLLECTOR)
    _frontends[id(frontend)] = frontend
    try:
        yield
    finally:
        _frontends.pop(id(frontend), None)


def refused(reason: Refusal) -> None:
    """A socket or request refused for ``reason``."""
    COUNTS.refused[reason] += 1


def refusal(code: int) -> Refusal:
    """Why a socket closed with ``code`` before it was served was refused."""
    return _REFUSALS.get(code, Refusal.AUTH)


def lag(viewer: Viewer, heads: dict[bytes, tuple[int, str]]) -> int | None:
    """How many seqs ``viewer`` is behind its session's last event this frontend heard.

    Counted from the oldest event not yet taken by its transport: the first frame of
    its queue, if any (a merged frame from its first seq), else its position. None
    when it follows no session, or the head is of another epoch than its position.
    """
    if viewer.session is None:
        return None
    head = heads.get(viewer.bus.session_channel(viewer.session).encode())
    position = viewer.position
    if head is None or head[1] != position.epoch:
        return None
    taken = position.seq
    oldest = viewer.oldest_waiting()
    if oldest is not None:
        with contextlib.suppress(orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
            event = orjson.loads(oldest)
            taken = min(taken, int(event.get("from_seq", event["seq"])) - 1)
    return max(head[0] - taken, 0)


class FrontendCollector(Collector):
    """The frontend's metrics, made from :data:`COUNTS` and the running frontends at a scrape.

    The viewer-lag histogram samples every viewer's lag at each scrape: its buckets
    count viewer-scrapes, so a quantile of its rate is the lag of a typical viewer
    over the window.
    """

    def __init__(self) -> None:
        self._lag_buckets = [0] * (len(LAG_BUCKETS) + 1)  # the last: above every bound
        self._lag_sum = 0

    def describe(self) -> Iterable[Metric]:
        """The families, without samples (what registering needs)."""
        return []

    def collect(self) -> Iterable[Metric]:
        """Every frontend metric, as it stands now."""
        counts = COUNTS
        frontends = list(_frontends.values())
        yield self._sockets(frontends)
        yield _counter("events_relayed", "Events handed to viewers.", counts.relayed)
        yield _counter(
            "frames_merged", "Frames merged into a lagging viewer's queue.", counts.merged
        )
        yield _labelled(
            "slow_viewer_closes",
            "Viewers closed for not keeping up.",
            "code",
            {str(code): n for code, n in counts.slow_closes.items()},
        )
        yield _labelled(
            "resumes", "Reconnects with a position, by what they got.", "outcome", counts.resumes
        )
        yield self._lag(frontends)
        yield _counter(
            "pubsub_reconnects",
            "Pub/sub connections to Redis lost and remade.",
            counts.pubsub_reconnects,
        )
        yield _labelled(
            "connections_refused",
            "Sockets and requests refused (limits, authentication, draining).",
            "reason",
            counts.refused,
        )

    @staticmethod
    def _sockets(frontends: list[Frontend]) -> Metric:
        family = GaugeMetricFamily(
            "thoughtwire_sockets_open",
            "Sockets and event streams open now.",
            labels=("endpoint", "transport"),
        )
        open_now: Counter[tuple[str, str]] = Counter()
        for frontend in frontends:
            open_now.update(frontend.open_sockets)
        for (endpoint, transport), n in sorted(open_now.items()):
            family.add_metric((endpoint, transport), n)
        return family

    def _lag(self, frontends: list[Frontend]) -> Metric:
        from thoughtwire.api.viewer import Viewer  # it counts in COUNTS: imported after this

        for frontend in frontends:
            heads = frontend.hub.heads
            for viewer in frontend.hub.viewers():  # sockets and streams, and the runs watcher
                behind = lag(viewer, heads) if isinstance(viewer, Viewer) else None
                if behind is not None:
                    self._lag_buckets[bisect.bisect_left(LAG_BUCKETS, behind)] += 1
                    self._lag_sum += behind
        family = HistogramMetricFamily(
            "thoughtwire_viewer_lag_seqs",
            "How many seqs behind its session's head a viewer is, sampled at each scrape.",
        )
        cumulative = list(itertools.accumulate(self._lag_buckets))
        bounds = [floatToGoString(b) for b in LAG_BUCKETS] + ["+Inf"]
        family.add_metric([], list(zip(bounds, map(float, cumulative), strict=True)), self._lag_sum)
        return family


def _counter(name: str, documentation: str, value: float) -> Metric:
    family = CounterMetricFamily(f"thoughtwire_{name}", documentation)
    family.add_metric([], value)
    return family


def _labelled(name: str, documentation: str, label: str, values: dict[str, int]) -> Metric:
    family = CounterMetricFamily(f"thoughtwire_{name}", documentation, labels=(label,))
    for value, n in sorted(values.items()):
        family.add_metric((str(value),), n)
    return family


COLLECTOR = FrontendCollector()


def resume_outcome(frames: Iterable[str], so_far: Resume) -> Resume:
    """What a resume got, once a catch-up sent ``frames`` too: a gap outweighs a snapshot."""
    for frame in frames:
        if frame.startswith('{"type":"gap"'):
            return Resume.GAP
        if frame.startswith('{"type":"snapshot"'):
            so_far = Resume.SNAPSHOT
    return so_far
