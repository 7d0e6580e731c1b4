"""The switch and the version check every fast path goes through.

A fast path reaches into a dependency's private API because it measured faster or
lighter than the public one (docs/performance.md, "Fast paths"). Each dependency's
private API is touched in one adapter module, which declares an :class:`Adapter`
with the versions it was tested on:

- :mod:`thoughtwire.api.wsserver`: uvicorn (its websockets-sansio protocol, and the
  raw frame writes of :mod:`thoughtwire.api.wire`);
- :mod:`thoughtwire.shared.redis.fast`: redis-py's connection and parser internals,
  read by hiredis;
- :mod:`thoughtwire.api.fastapi_lean`: FastAPI's check for pydantic v1 models, which
  otherwise imports ``pydantic.v1`` into every frontend;
- :mod:`thoughtwire.shared.redis_import`: redis-py's first import, without the
  OpenTelemetry metrics SDK it otherwise imports into every process.

An adapter's fast path is used only when ``THOUGHTWIRE_FAST_PATHS`` is on and the
installed versions are ones it was tested on (same major and minor release). With an
unknown version the process logs one warning per adapter and takes the public path:
a new release may have moved what the fast path leans on, and the public path is
slower but correct.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import metadata

logger = logging.getLogger("thoughtwire.fastpaths")


def installed(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[str, ...]:
    """A version's major and minor release: patch releases keep internals as they are."""
    return tuple(version.split(".")[:2])


@dataclass
class Adapter:
    """One dependency's fast paths: the versions they were tested on, and whether to use them."""

    name: str
    tested: dict[str, str]  # distribution: the version the adapter was tested on
    _untested: list[str] | None = field(default=None, init=False, repr=False)

    def untested(self) -> list[str]:
        """``"name installed (tested: version)"`` for each installed version not tested."""
        if self._untested is None:
            found = []
            for distribution, version in self.tested.items():
                have = installed(distribution)
                if have is None or release(have) != release(version):
                    found.append(f"{distribution} {have or 'missing'} (tested: {version})")
            self._untested = found
            if found:  # once per adapter and process, however often it is asked
                logger.warning(
                    "%s fast paths off: untested %s; using public APIs only",
                    self.name,
                    ", ".join(found),
                )
        return self._untested

    def quietly_tested(self) -> bool:
        """Whether every installed version is a tested release, without a warning: for a
        check made before logging is set up (:meth:`untested` warns, when asked later)."""
        return all(
            (have := installed(distribution)) is not None and release(have) == release(version)
            for distribution, version in self.tested.items()
        )

    def enabled(self, switch: bool) -> bool:
        """Whether to take the fast paths: ``switch`` (the setting) on and versions tested."""
        return switch and not self.untested()

    def mode(self, switch: bool) -> str:
        """``"fast"`` or ``"public"``, for a banner or a log line."""
        return "fast" if self.enabled(switch) else "public"


def mode(switch: bool, *adapters: Adapter) -> str:
    """One banner word for all ``adapters``: ``fast paths on``, ``off`` or which are on."""
    if not switch:
        return "fast paths off"
    off = [adapter.name for adapter in adapters if not adapter.enabled(switch)]
    if not off:
        return "fast paths on"
    return f"fast paths on, except {', '.join(off)} (untested versions)"
