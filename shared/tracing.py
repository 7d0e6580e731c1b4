"""OpenTelemetry traces of a run, from the prompt to the first event relayed back; optional.

One trace follows a prompt through every process it crosses:

- ``prompt`` (frontend): the prompt received, admitted and queued. Its W3C
  ``traceparent`` goes into the queued job (:class:`~thoughtwire.shared.protocol.Job`,
  set by :meth:`~thoughtwire.shared.bus.Bus.submit`), so the context travels with the job
  through Redis.
- ``queued`` (worker): from the job's entry on the stream (its id is its time) to its
  claim.
- ``run`` (worker): one attempt at the run, its children ``chat <model>`` for each model
  call (the GenAI semantic conventions: ``gen_ai.operation.name``,
  ``gen_ai.request.model``, ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``),
  ``execute_tool <name>`` for each tool call, and ``append`` for each write of events.
- ``first event relayed`` (frontend): the run's first event written to the socket the
  prompt came from.

Off by default (``THOUGHTWIRE_TRACING=1`` turns it on; the standard
``OTEL_SDK_DISABLED=true`` still turns the SDK off). Off, or without the ``thoughtwire[otel]`` extra, this module imports
nothing of OpenTelemetry and every helper costs a test of one global: spans are made
only by :func:`configure`'s tracer. An explicit switch rather than the mere presence of
``OTEL_*`` variables, which a platform may set for every process it runs.

Spans go to the OTLP/HTTP exporter, which reads the standard ``OTEL_EXPORTER_OTLP_*``
variables (endpoint, headers) itself, in batches; or, with ``THOUGHTWIRE_TRACE_FILE``,
to that file as one JSON object per line, each as it ends (for tests and debugging).
``OTEL_SERVICE_NAME`` names the process (default ``thoughtwire-api`` or
``thoughtwire-worker``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from thoughtwire.shared.settings import Settings

logger = logging.getLogger("thoughtwire.tracing")

Attributes = Mapping[str, str | int | float | bool]

# Set by configure() when tracing is on: the tracer, and the SDK's provider to flush.
_tracer: Any = None
_provider: Any = None


def enabled() -> bool:
    """Whether spans are being made."""
    return _tracer is not None


def configure(settings: Settings, service: str) -> bool:
    """Start tracing if the settings ask for it and the extra is installed; whether it did."""
    global _tracer, _provider
    if not settings.tracing or _tracer is not None:
        return _tracer is not None
    try:
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        logger.warning("THOUGHTWIRE_TRACING is on, but the thoughtwire[otel] extra is missing")
        return False
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, read by the SDK, win over ours;
    # OTEL_SDK_DISABLED=true makes the provider's tracer one that records nothing.
    resource = Resource.create({"service.name": service}).merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(_processor(settings.trace_file))
    _provider, _tracer = provider, provider.get_tracer("thoughtwire")
    return True


def _processor(trace_file: str | None) -> Any:
    """Each span to ``trace_file`` as one JSON line as it ends; else batched, over OTLP."""
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    if trace_file:
        out = open(trace_file, "a", buffering=1)  # noqa: SIM115 (open for the process's life)
        exporter = ConsoleSpanExporter(
            out=out, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
        return SimpleSpanProcessor(exporter)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return BatchSpanProcessor(OTLPSpanExporter())


def shutdown() -> None:
    """Export what is pending and stop; a no-op when tracing is off."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def _context(parent: Any) -> Any:
    """The context of ``parent``, a ``traceparent`` or a span (None: the current one)."""
    if parent is None:
        return None
    if isinstance(parent, str):
        from opentelemetry.propagate import extract

        return extract({"traceparent": parent})
    from opentelemetry.trace import set_span_in_context

    return set_span_in_context(parent)


def _kind(kind: str) -> Any:
    from opentelemetry.trace import SpanKind

    return SpanKind[kind.upper()]


@contextlib.contextmanager
def span(
    name: str,
    attributes: Attributes | None = None,
    *,
    parent: str | None = None,
    kind: str = "internal",
) -> Iterator[Any]:
    """A span around the block, current within it (and in the tasks started there);
    yields it, or None when tracing is off. ``parent``: a ``traceparent`` to continue."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(
        name, context=_context(parent), kind=_kind(kind), attributes=attributes
    ) as current:
        yield current


def start(name: str, attributes: Attributes | None = None, *, parent: Any = None) -> Any:
    """A span begun now, a child of the current one (or of ``parent``, a span) and not
    made current: for work that ends in a callback or across an async generator's
    yields. :func:`end` ends it. None when tracing is off."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, context=_context(parent), attributes=attributes)


def end(span: Any, attributes: Attributes | None = None, *, error: str | None = None) -> None:
    """End a span :func:`start` began (None: nothing), with ``attributes`` added."""
    if span is None:
        return
    if attributes:
        span.set_attributes(attributes)
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def record(name: str, start_ns: int, *, parent: Any, attributes: Attributes | None = None) -> None:
    """A span that began at ``start_ns`` (Unix ns) and ends now, under ``parent`` (a
    ``traceparent`` or a span)."""
    if _tracer is None:
        return
    begun = _tracer.start_span(
        name, context=_context(parent), attributes=attributes, start_time=start_ns
    )
    begun.end(end_time=max(start_ns, time.time_ns()))


def current_span() -> Any:
    """The current span, to :func:`start` children of later elsewhere; None when off."""
    if _tracer is None:
        return None
    from opentelemetry.trace import get_current_span

    return get_current_span()


def annotate(attributes: Attributes) -> None:
    """Add ``attributes`` to the current span; nothing when off."""
    if _tracer is not None:
        from opentelemetry.trace import get_current_span

        get_current_span().set_attributes(attributes)


def traceparent() -> str | None:
    """The current span's W3C ``traceparent``, to send along; None when off or outside one."""
    if _tracer is None:
        return None
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent")
