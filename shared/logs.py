"""Log lines in one format for every process (text or JSON), with the run a line is about.

:func:`configure` sets up the root logger and uvicorn's loggers (``uvicorn``,
``uvicorn.error``, ``uvicorn.access``, which then only propagate to the root: the
frontend passes ``log_config=None`` to uvicorn), for frontends, workers and
``thoughtwire up`` alike (``THOUGHTWIRE_LOG_FORMAT``).

- **Fields.** ``session``, ``run``, ``attempt`` and ``user`` are held in a context
  variable (:func:`bind`), set where a run or a socket is handled: a worker's run task,
  a frontend's socket task and HTTP handlers. Every line logged from there, and from
  the tasks started there, carries them without its call naming them. ``user`` is
  always a short sha256 digest of the subject (:func:`user_digest`), never the subject.
- **JSON.** One object per line: ``time`` (UTC, ISO 8601, ms), ``level``, ``logger``,
  ``message``, the fields that are known, and ``exception``, the whole traceback as one
  string. Tracebacks go to the log only: no client ever gets one.
- **Redaction**, in both formats, on the whole line as written (message, arguments and
  traceback): ``token=`` values (uvicorn's access log has request paths with their
  query), anything shaped like a JWT, ``Bearer`` credentials, the password of any URL
  (a ``REDIS_URL``), and the process's own secrets, verbatim (the JWT secret, the
  OpenAI API key, the Redis passwords, an OpenAI proxy URL's password).

The JSON formatter is twenty lines over the standard library and orjson (already a
dependency). python-json-logger would do the same through a dependency, and the
redaction, which must see the finished line, would still be ours.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, unquote

import orjson

if TYPE_CHECKING:
    from thoughtwire.shared.settings import Settings

LogFormat = Literal["text", "json"]

# The fields a line may be about, in the order they are written.
FIELDS = ("session", "run", "attempt", "user")

UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")

_fields: ContextVar[Mapping[str, str | int] | None] = ContextVar("log_fields", default=None)

# Set by configure(): how the process logs, for announce().
_format: LogFormat = "text"

REDACTED = "[redacted]"
_TOKEN_QUERY = re.compile(r"((?:^|[?&\s\"'])(?:access_)?token=)[^&\s\"']+")
# No word boundary before it: a token may follow '%20', '%3D' or '_' in a logged path.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(\bBearer\s+)[^\s\"',]+", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@\"']*:)[^\s/@\"']+@")
_URL_SECRET_QUERY = re.compile(r"((?:sentinel_)?password=)[^&\s\"']+")
_BASIC = re.compile(r"(\bBasic\s+)[A-Za-z0-9+/=]{8,}", re.IGNORECASE)
# Any query parameter whose name, percent-decoded, names a credential ("tok%65n" too).
_QUERY_PARAM = re.compile(r"([?&]([^=&\s\"'#]+)=)([^&\s\"'#]+)")
_CREDENTIAL_NAMES = frozenset(
    {"token", "access_token", "id_token", "api_key", "apikey", "key", "secret", "password"}
)

MIN_SECRET_CHARS = 4  # shorter "secrets" would blank out ordinary words


def user_digest(subject: str) -> str:
    """The name a log line gives a user: a short sha256 digest of its subject."""
    return hashlib.sha256(subject.encode()).hexdigest()[:12]


def current() -> Mapping[str, str | int]:
    """The fields bound in this context (empty outside any run or socket)."""
    return _fields.get() or {}


def bind(
    *,
    session: str | None = None,
    run: str | None = None,
    attempt: int | None = None,
    user: str | None = None,
) -> Token[Mapping[str, str | int] | None]:
    """Add fields to this context's lines (``user`` as the raw subject: it is hashed here).

    Tasks started afterwards inherit them. Returns the token :func:`unbind` takes.
    """
    given: dict[str, str | int | None] = {
        "session": session,
        "run": run,
        "attempt": attempt,
        "user": None if user is None else user_digest(user),
    }
    merged = {**current(), **{k: v for k, v in given.items() if v is not None}}
    return _fields.set(merged)


def unbind(token: Token[Mapping[str, str | int] | None]) -> None:
    """Restore the fields :func:`bind` replaced."""
    _fields.reset(token)


@contextlib.contextmanager
def bound(
    *,
    session: str | None = None,
    run: str | None = None,
    attempt: int | None = None,
    user: str | None = None,
) -> Iterator[None]:
    """Within the block, this context's lines carry these fields too."""
    token = bind(session=session, run=run, attempt=attempt, user=user)
    try:
        yield
    finally:
        unbind(token)


def url_secrets(url: str | None) -> list[str]:
    """The passwords in a URL (its user info's, ``sentinel_password``), as written and decoded."""
    if not url:
        return []
    rest = url.partition("://")[2]
    # The user info runs to the last '@': a password may hold '/', '?' or '#' unencoded.
    userinfo = rest.rpartition("@")[0]
    query = rest.rpartition("@")[2].partition("?")[2]
    found = [userinfo.partition(":")[2]] if ":" in userinfo else []
    found += [v for k, v in parse_qsl(query, keep_blank_values=False) if "password" in k]
    return [s for raw in found for s in {raw, unquote(raw)} if s]


class Redactor:
    """Takes tokens, JWTs, URL passwords and the process's secrets out of a text."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        chosen = {s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}
        self.secrets = sorted(chosen, key=len, reverse=True)  # longest first

    def __call__(self, text: str) -> str:
        """``text`` with every secret it holds replaced."""
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _TOKEN_QUERY.sub(r"\1" + REDACTED, text)
        text = _JWT.sub(REDACTED, text)
        text = _BEARER.sub(r"\1" + REDACTED, text)
        text = _BASIC.sub(r"\1" + REDACTED, text)
        text = _QUERY_PARAM.sub(_credential_param, text)
        text = _URL_PASSWORD.sub(r"\1***@", text)
        return _URL_SECRET_QUERY.sub(r"\1***", text)


def _credential_param(match: re.Match[str]) -> str:
    """A query parameter, its value redacted when its (decoded) name names a credential."""
    name = unquote(match.group(2)).lower()
    if name in _CREDENTIAL_NAMES or "password" in name or name.endswith("_token"):
        return match.group(1) + REDACTED
    return match.group(0)


def _fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """A record's fields: those its call passed (``extra=``), else those bound."""
    bound_fields = getattr(record, "fields", None) or {}
    return {
        name: getattr(record, name, None) or bound_fields.get(name)
        for name in FIELDS
        if getattr(record, name, None) is not None or name in bound_fields
    }


class ContextFields(logging.Filter):
    """Stamps each record with the fields bound where it was logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Note the caller's fields on the record; keep it."""
        if not hasattr(record, "fields"):
            record.fields = dict(current())
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [session=… run=…]``, then any traceback; redacted."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.redact = redact

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line, with the record's fields after the message."""
        line = super().formatMessage(record)
        fields = _fields_of(record)
        if fields:
            line += " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        return line

    def format(self, record: logging.LogRecord) -> str:
        """The whole entry, secrets taken out."""
        return self.redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, fields, exception; redacted."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
            **_fields_of(record),
        }
        if record.exc_info:
            entry["exception"] = self.redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = self.redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = self.redact(self.formatStack(record.stack_info))
        return orjson.dumps(entry, default=str).decode()


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is written (as logging's last resort)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        """The current standard error."""
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure(
    fmt: LogFormat = "text", *, secrets: Iterable[str | None] = (), level: int = logging.INFO
) -> None:
    """Send every log line, uvicorn's too, to standard error in ``fmt``, with ``secrets`` kept out.

    Idempotent: a second call replaces the handler the first one installed.
    """
    global _format
    _format = fmt
    redact = Redactor(secrets)
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    handler.addFilter(ContextFields())
    handler.set_name("thoughtwire")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "thoughtwire"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in UVICORN_LOGGERS:  # uvicorn's own handlers would write their own format
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    """An exception nothing caught ends the process as one log entry, in the log's format."""
    logging.getLogger("thoughtwire").critical(
        "uncaught exception", exc_info=(kind, error, traceback)
    )


def _log_uncaught_in_thread(uncaught: threading.ExceptHookArgs) -> None:
    """The same for a thread's (the metrics port's, say): else Python prints it raw."""
    if uncaught.exc_type is SystemExit:  # as threading's own hook: a thread's quiet exit
        return
    _log_uncaught(
        uncaught.exc_type, uncaught.exc_value or uncaught.exc_type(), uncaught.exc_traceback
    )


def announce(text: str, level: int = logging.INFO) -> None:
    """A line for the operator (a start banner, a reason to stop): printed as it is with
    text logs (on stderr from WARNING up), a log entry with JSON logs, so that every line
    a process writes is JSON."""
    if _format == "json":
        logging.getLogger("thoughtwire").log(level, text)
        return
    print(text, file=sys.stderr if level >= logging.WARNING else sys.stdout, flush=True)


def configure_from(settings: Settings) -> None:
    """:func:`configure` as ``settings`` say, with their secrets kept out of every line."""
    secrets = [
        settings.jwt_secret,
        settings.openai_api_key,
        *url_secrets(settings.redis_url),
        *url_secrets(settings.openai_base_url),
    ]
    configure(settings.log_format, secrets=secrets)
