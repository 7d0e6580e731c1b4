"""Prometheus metrics: the process's one registry, and its exposition.

Every metric thoughtwire exposes is registered in :data:`REGISTRY`, and only while
``THOUGHTWIRE_METRICS`` is on: a frontend registers its collector
(:mod:`thoughtwire.api.metrics`) when it starts, a worker its instruments
(:mod:`thoughtwire.worker.metrics`). A frontend serves the registry at ``/metrics``, a
worker on ``THOUGHTWIRE_METRICS_PORT``; in ``thoughtwire up`` the frontend's
``/metrics`` holds the in-process workers' metrics too. The names are a contract,
listed in docs/operations.md, "Metrics", and charted by deploy/grafana/thoughtwire.json.

Labels are bounded: no session, run or user id is ever a label value.
"""

from __future__ import annotations

import threading

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.registry import Collector

# No `_created` series beside each counter and histogram: no chart reads them.
disable_created_metrics()

# The process's registry: its CPU, memory and file descriptors, and thoughtwire's own.
REGISTRY = CollectorRegistry(auto_describe=True)
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

CONTENT_TYPE = CONTENT_TYPE_LATEST
_installed: set[int] = set()
_lock = threading.Lock()


def install(*collectors: Collector) -> None:
    """Register ``collectors`` in :data:`REGISTRY`, each once per process, however often
    this is called (several frontends or workers in one process share them)."""
    with _lock:
        for collector in collectors:
            if id(collector) not in _installed:
                REGISTRY.register(collector)
                _installed.add(id(collector))


def exposition() -> bytes:
    """Every metric of the registry, in Prometheus' text format (:data:`CONTENT_TYPE`)."""
    return generate_latest(REGISTRY)
