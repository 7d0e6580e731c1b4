"""The redis-py adapter for its first import: without OpenTelemetry's metrics SDK.

When ``opentelemetry-sdk`` is installed (thoughtwire installs it for traces), ``import
redis`` imports its metrics SDK too, for redis-py's own OpenTelemetry metrics, which a
process turns on with ``redis.observability``. thoughtwire never does: its metrics are
Prometheus (docs/operations.md, "Metrics"). The import costs 1.5 MB in every frontend
and worker (docs/performance.md, "Fast paths"). redis-py takes the SDK as absent when
importing it fails, so the fast path makes it fail while redis-py is first imported, and
then lets it be imported again, by anyone who wants it. This module imports no redis
before that: the rest of the redis adapter is :mod:`thoughtwire.shared.redis.fast`,
which can only be imported with redis.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping

from pydantic import TypeAdapter, ValidationError

from thoughtwire.shared.fastpaths import Adapter
from thoughtwire.shared.settings import Settings, env_name

REDIS_IMPORT = Adapter("redis-py import", {"redis": "8.1.0"})
DECLINED = "opentelemetry.sdk.metrics"  # redis/observability/providers.py tries it


def install(switch: bool) -> bool:
    """Import redis-py without the metrics SDK when ``switch`` is on and redis-py is a
    tested release; say whether. A no-op once redis or the SDK is imported."""
    if not switch or "redis" in sys.modules or DECLINED in sys.modules:
        return False
    if not REDIS_IMPORT.quietly_tested():  # the banner's check warns, once logging is set up
        return False
    sys.modules[DECLINED] = None  # type: ignore[assignment]  # an import of it fails
    try:
        importlib.import_module("redis")
    finally:
        del sys.modules[DECLINED]
    return True


def install_from(environ: Mapping[str, str]) -> bool:
    """:func:`install`, with ``THOUGHTWIRE_FAST_PATHS`` as ``environ`` sets it: called
    before the settings are read, as reading them imports redis (to check ``REDIS_URL``).
    A value the settings will refuse counts as the default; they then fail at start."""
    field = Settings.model_fields["fast_paths"]
    value = environ.get(env_name("fast_paths"))
    try:
        switch = field.default if value is None else TypeAdapter(bool).validate_python(value)
    except ValidationError:
        switch = field.default
    return install(bool(switch))
