"""Settings: one frozen object, built from the environment once at startup and passed down.

Nothing else in the codebase reads ``os.environ``. Every setting is declared once
below, with its type, default and description; ``thoughtwire --help`` and
docs/settings.md are generated from that list (``python -m thoughtwire.shared.settings``
rewrites the page). Every setting has a ``THOUGHTWIRE_`` variable, except the few
that the wider ecosystem already names (``REDIS_URL``, ``OPENAI_API_KEY``,
``OPENAI_BASE_URL`` and the ``JWT_``/``JWKS_`` ones).

``Settings(...)`` reads nothing by itself: the environment comes in through
:meth:`Settings.from_env` only, so a test's or a library user's settings never
pick up the process's variables by surprise.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

AGENTS = ("simulated", "openai")

MAX_NUMBER = 2**31 - 1  # the largest number any setting takes
MIN_PROBE_INTERVAL = 0.1  # seconds: a shorter pub/sub probe interval is refused
# Seconds: pings asked for by clients (which drop a socket silent for 2.5 intervals) are
# off or between these: the first keeps a busy page from being cut off, the second is
# a browser timer's longest delay (2**31 ms) over 2.5.
PING_INTERVAL_RANGE = (0.1, 800_000.0)

# The settings whose variable the wider ecosystem already names.
_ENV_NAMES = {
    "redis_url": "REDIS_URL",
    "openai_api_key": "OPENAI_API_KEY",
    "openai_base_url": "OPENAI_BASE_URL",
    "jwt_secret": "JWT_SECRET",
    "jwt_public_key": "JWT_PUBLIC_KEY",
    "jwks_url": "JWKS_URL",
    "jwt_audience": "JWT_AUDIENCE",
    "jwt_issuer": "JWT_ISSUER",
}


# Never printed back in an error about their value.
_SECRETS = frozenset({"openai_api_key", "jwt_secret", "jwt_public_key"})  # a private one, pasted


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""

    def __init__(self, message: str, variable: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable  # the environment variable at fault, when there is one


def env_name(field: str) -> str:
    """The environment variable a setting is read from."""
    return _ENV_NAMES.get(field, "THOUGHTWIRE_" + field.upper())


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """What to say of each ``THOUGHTWIRE_*`` variable that is no setting: a misspelt
    name would otherwise be ignored without a word, its setting left at the default."""
    import difflib

    prefix = "THOUGHTWIRE_"
    known = [env_name(field) for field in Settings.model_fields]
    tails = [name.removeprefix(prefix) for name in known if name.startswith(prefix)]
    said = []
    for name in sorted(environ):
        if name.startswith(prefix) and name not in known:
            close = difflib.get_close_matches(name.removeprefix(prefix), tails, n=1, cutoff=0.75)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            said.append(f"{name} is not a setting and is ignored{hint}")
    return said


class _Environment(PydanticBaseSettingsSource):
    """The variables of one environment mapping, by setting; empty ones count as unset."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """The raw string of one setting's variable, or None when it is unset."""
        return self.environ.get(env_name(field_name)) or None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, info in self.settings_cls.model_fields.items():
            raw, key, _complex = self.get_field_value(info, name)
            if raw is not None:
                values[key] = raw
        return values


class Settings(BaseSettings):
    """Every setting of a frontend, a worker and ``thoughtwire up``: typed, defaulted, frozen."""

    # NaN and infinity are refused: a lease or a timeout of NaN breaks the loop's timers.
    model_config = SettingsConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    redis_url: str | None = Field(
        None,
        repr=False,  # it may hold a password
        description="Where Redis is: `redis://` (one server), `redis+cluster://h:p[,h:p…]`, "
        "`redis+sentinel://h:p[,h:p…]/<service>[/db]`, or their `rediss` TLS forms. "
        "Unset: embedded, an in-process Redis (`thoughtwire up`).",
    )
    key_prefix: str = Field(
        "tw",
        description="Prefix of every key and channel, so several deployments (or tests) "
        "share one Redis. No ':', '{' or '}'.",
    )
    # Pools block (up to redis_pool_timeout) rather than raise when exhausted: redis-py 8
    # raises MaxConnectionsError past its cap, which under load would silently drop streams.
    # The pipelined calls keep one connection to themselves, hence at least 2.
    redis_pool_size: int = Field(
        64, ge=2, description="Connections per process in the command pool (at least 2)."
    )
    redis_pool_timeout: float = Field(
        5.0, gt=0, description="Seconds a command waits for a free pooled connection."
    )
    # The paths that reach into uvicorn's and redis-py's internals for speed
    # (docs/performance.md, "Fast paths"); off, only their public APIs are used. The
    # security bounds on HTTP request heads are not a fast path: they stay either way.
    fast_paths: bool = Field(
        True, description="Use the fast paths through uvicorn's and redis-py's internals."
    )

    # Agent
    agent: str = Field(
        "simulated",
        description="The default agent: simulated, or openai (the default when "
        "OPENAI_API_KEY is set).",
    )
    openai_api_key: str | None = Field(None, repr=False, description="The OpenAI API key.")
    openai_base_url: str | None = Field(
        None, description="An OpenAI-compatible endpoint instead of OpenAI's own."
    )
    openai_model: str = Field("gpt-4o-mini", description="The model the openai agent calls.")
    openai_timeout: float = Field(60.0, gt=0, description="Seconds for one model call.")
    openai_idle_timeout: float = Field(
        30.0, gt=0, description="Longest silence inside a model's stream, in seconds."
    )
    openai_retries: int = Field(
        3,
        ge=0,
        description="Retries before the first token: 429, 5xx, connection errors, timeouts.",
    )
    max_steps: int = Field(8, ge=1, description="Model calls per run (each tool round is one).")
    max_tokens_per_run: int = Field(8192, ge=1, description="Tokens a run may generate.")
    tool_timeout: float = Field(30.0, gt=0, description="Seconds one tool call may take.")
    tools: str = Field("", description='More tools: "pkg.module:function,...".')
    approval_tools: str = Field(
        "",
        description='Tools that wait for a person to allow them before they run: "name,..."; '
        "a name no agent's tool has stops the process at start.",
    )
    approval_timeout: float = Field(
        300.0, gt=0, description="Seconds a run waits for an approval before the default."
    )
    approval_default: Literal["allow", "deny"] = Field(
        "deny", description="The decision taken when an approval times out."
    )
    multitask: Literal["reject", "enqueue", "interrupt"] = Field(
        "enqueue",
        description="What a prompt does while its session has an unfinished run, unless "
        "the prompt says: reject, enqueue or interrupt.",
    )
    budget_tokens_per_minute: int = Field(
        0, ge=0, description="Tokens each user may use per minute, across workers (0: no limit)."
    )
    budget_tokens_per_day: int = Field(
        0, ge=0, description="Tokens each user may use per day, across workers (0: no limit)."
    )
    memory_turns: int = Field(
        20, ge=0, description="Previous turns of a session sent with the next prompt (0: none)."
    )
    coalesce_ms: float = Field(
        15.0, ge=0, description="Merge answer and thinking deltas this close together (ms)."
    )
    sim_step_delay: float = Field(
        0.5, ge=0, description="The simulated agent's pause per step (s)."
    )
    sim_answer_tokens: int = Field(12, ge=0, description="Tokens in a simulated answer.")
    sim_tokens_per_second: float = Field(
        20.0, ge=0, description="The simulated agent's token rate (0: unpaced)."
    )
    # A real model's tokens are not a metronome either.
    sim_jitter: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="Each simulated token lands within this share of an interval of its "
        "slot (0 to 0.5; 0: a metronome).",
    )

    # Event log per session: bounded in length and lifetime. Run states, results and
    # idempotency keys are kept as long.
    log_maxlen: int = Field(10_000, ge=1, description="Events kept per session log.")
    log_ttl: int = Field(86_400, ge=1, description="Seconds a session's log and runs are kept.")

    # Frontend
    send_queue_size: int = Field(
        1024, ge=1, description="Frames queued per viewer before its deltas are merged."
    )
    send_queue_bytes: int = Field(
        1 << 20,
        ge=1,
        description="Bytes a viewer's merged queue may hold; past them it is closed with 4008.",
    )
    # Linux grows an accepted socket's send buffer towards tcp_wmem's maximum (4 MiB):
    # a viewer that stops reading would have its backlog held there, outside the
    # viewer's bounded, merging queue (docs/performance.md, "Slow viewers").
    send_buffer_bytes: int = Field(
        32 * 1024,
        ge=0,
        description="Kernel send buffer (SO_SNDBUF) of each accepted client connection, in "
        "bytes (Linux doubles it); past it a lagging viewer's frames queue, merged, in the "
        "frontend (0: the kernel's autotuning, up to megabytes).",
    )
    ping_interval: float = Field(
        60.0,
        ge=0,
        description="A socket that asks for pings (and every /ws/robust one) is pinged when "
        "nothing came from its client, or went to it, for this many seconds: 0 (never), "
        "or 0.1 to 800000.",
    )
    max_message_bytes: int = Field(64 * 1024, ge=1, description="Largest client frame, in bytes.")
    max_prompt_chars: int = Field(32_000, ge=1, description="Longest prompt, in characters.")
    ws_per_message_deflate: bool = Field(
        False, description="Offer permessage-deflate on WebSockets."
    )
    # Bounds on what a client may make a frontend hold before it is known to be
    # harmless (docs/security.md, "Bounds"); a body is counted as it arrives.
    max_body_bytes: int = Field(
        1024 * 1024, ge=1, description="Largest request body, in bytes (413 past it)."
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1,
        description="Largest request head (request line and headers), in bytes (431 past it).",
    )
    handshake_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds after a connection (or the previous response) by which a "
        "request head or a WebSocket handshake must be done.",
    )
    body_timeout: float = Field(
        30.0, gt=0, description="Seconds after its head by which a body must be whole (408)."
    )
    max_connections: int = Field(
        10_000,
        ge=1,
        description="Open connections per frontend process, sockets included; past it only "
        "/healthz, /readyz and /metrics are answered.",
    )

    # Authentication: any of the key settings turns it on for every socket and endpoint.
    jwt_secret: str | None = Field(None, repr=False, description="HS256 secret for tokens.")
    jwt_public_key: str | None = Field(None, description="PEM public key (RS256/ES256).")
    jwks_url: str | None = Field(None, description="JWKS URL (RS256/ES256).")
    jwt_audience: str | None = Field(None, description="Required `aud` claim.")
    jwt_issuer: str | None = Field(None, description="Required `iss` claim.")
    viewer_token_ttl: int = Field(3600, ge=1, description="Lifetime of a viewer link's token (s).")
    allowed_origins: str = Field(
        "",
        description='Browser origins allowed to open sockets and call the API ("*": any). '
        "Empty: same origin only, and clients that send none.",
    )
    # None: on for `thoughtwire up` without authentication, a gateway on the developer's
    # own machine, so the pages one writes there just work; off everywhere else.
    allow_local_origins: bool | None = Field(
        None,
        description="Also allow file:// pages (Origin null) and loopback origins. "
        "Unset: on for `thoughtwire up` without authentication, off elsewhere.",
    )
    # Without authentication a local frontend is otherwise open to DNS rebinding.
    allowed_hosts: str = Field(
        "",
        description="Host names (name or name:port) requests may be addressed to beyond "
        'loopback ("*": any). Empty: loopback only without authentication, any with it.',
    )

    # Limits per user, held across all frontends (state in Redis).
    rate_limit: int = Field(
        120, ge=1, description="Client frames and API calls per user per minute."
    )
    max_runs_per_user: int = Field(8, ge=1, description="Runs a user may have queued or running.")
    max_sockets_per_user: int = Field(50, ge=1, description="Open sockets per user.")
    idle_timeout: float = Field(
        900.0, gt=0, description="A socket with no frame either way this long is closed (s)."
    )

    # Presence: who watches a session (docs/protocol.md, "Presence").
    presence_refresh: float = Field(
        10.0,
        gt=0,
        description="Seconds between a frontend's refreshes of its presence entries.",
    )
    presence_ttl: float = Field(
        25.0,
        gt=0,
        description="Seconds a frontend's presence entry lasts unrefreshed: a killed "
        "frontend's sockets leave presence within this (more than presence_refresh).",
    )
    presence_interval: float = Field(
        1.0, gt=0, description="Least seconds between two presence frames of a session."
    )
    presence_names: int = Field(
        100, ge=0, description="User names a presence frame lists at most (counts stay exact)."
    )

    # Frontend shutdown
    drain_window: float = Field(
        5.0,
        ge=0,
        description="Seconds over which a stopping frontend tells its sockets to reconnect, "
        "in batches.",
    )
    disconnect_grace: float = Field(
        15.0,
        ge=0,
        description="Interactive runs are cancelled once no socket has watched their "
        "session this long (s).",
    )
    tracked_runs: int = Field(
        10_000,
        ge=1,
        description="Runs a frontend follows until they end, to end those Redis lost.",
    )

    # Worker
    worker_concurrency: int = Field(32, ge=1, description="Runs a worker process runs at once.")
    # Plus drain_window, below Kubernetes' 30 s grace period.
    drain_timeout: float = Field(
        20.0, ge=0, description="Seconds a stopping worker lets its runs finish."
    )
    lease_seconds: float = Field(10.0, gt=0, description="A run's lease; renewed every third.")
    max_attempts: int = Field(3, ge=1, description="Attempts at a run before it is dead-lettered.")
    redis_retry_seconds: float = Field(
        30.0,
        ge=0,
        description="How long a worker retries a Redis write (a restart, a failover) before "
        "it gives the run up to the lease.",
    )
    # Failover (docs/reliability.md, "Failover")
    pubsub_probe_interval: float = Field(
        5.0,
        ge=0,
        description="Seconds between a frontend's probes of its pub/sub connection: one "
        "published on its own channel that has not come back within the next interval "
        "makes it reconnect and resync its viewers. 0: off; else at least 0.1.",
    )
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        description="Replicas the call that ends a run waits for (WAIT) before the job is "
        "acknowledged. 0: off.",
    )
    redis_wait_timeout_ms: int = Field(
        1000,
        ge=1,
        description="How long, in ms, that wait lasts at most; the job is acknowledged "
        "after it either way.",
    )
    embedded_workers: int = Field(2, ge=0, description="Workers `thoughtwire up` runs.")

    # Observability (docs/operations.md, "Metrics", "Logs" and "Traces")
    metrics: bool = Field(
        True,
        description="Serve Prometheus metrics: `/metrics` on a frontend, and a worker's "
        "metrics port. Off, neither is served and nothing is collected at a scrape.",
    )
    metrics_port: int = Field(
        9100,
        ge=0,
        le=65535,
        description="The port a worker serves `/metrics`, `/healthz` and `/readyz` on "
        "(all interfaces); 0: none. With several workers on one machine, give each its own.",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as text, or as one JSON object per line (with the session, "
        "run, attempt and hashed user a line is about).",
    )
    tracing: bool = Field(
        False,
        description="Export OpenTelemetry traces (needs the `thoughtwire[otel]` extra); "
        "the exporter is OTLP over HTTP, set by the standard `OTEL_EXPORTER_OTLP_*` variables.",
    )
    trace_file: str | None = Field(
        None,
        description="With tracing on, write spans as JSON lines to this file instead of "
        "exporting them over OTLP.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments only: the environment is read by :meth:`from_env`."""
        return (init_settings,)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            loc = error.errors(include_url=False)[0]["loc"]
            variable = env_name(str(loc[0])) if loc else None
            raise SettingsError(_one_line(error, values), variable) from None

    @field_validator("redis_url")
    @classmethod
    def _redis_url_is_a_topology(cls, url: str | None) -> str | None:
        # Imported here: the Redis folder imports these settings.
        from thoughtwire.shared.redis.topology import parse

        if url is not None:
            parse(url)  # its ValueError names what is wrong, never the password
        return url

    @field_validator("*")
    @classmethod
    def _number_fits(cls, value: Any) -> Any:
        # A C int: what setsockopt takes, and, as seconds or bytes, past any sane setting;
        # a larger count or TTL would fail only later, in Redis or the kernel.
        if isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_NUMBER:
            raise ValueError(f"must be at most {MAX_NUMBER}")
        return value

    @field_validator("pubsub_probe_interval")
    @classmethod
    def _probe_is_off_or_spaced(cls, value: float) -> float:
        # A probe every few milliseconds would find every busy link silent and resync
        # its viewers over and over.
        if 0 < value < MIN_PROBE_INTERVAL:
            raise ValueError(f"must be 0 (off) or at least {MIN_PROBE_INTERVAL}")
        return value

    @field_validator("ping_interval")
    @classmethod
    def _ping_is_off_or_in_range(cls, value: float) -> float:
        # Every browser socket asks for pings: an interval of a millisecond would ping each
        # a thousand times a second and have the clients drop sockets whenever a page is
        # busy; past a browser timer's range, their watchdog would fire every few ms.
        low, high = PING_INTERVAL_RANGE
        if value and not low <= value <= high:
            raise ValueError(f"must be 0 (off) or between {low:g} and {high:g}")
        return value

    @field_validator("jwt_public_key")
    @classmethod
    def _public_key_loads(cls, pem: str | None) -> str | None:
        # Checked now: a key PyJWT cannot load fails every request, with a 500.
        if pem is None:
            return pem
        from jwt.algorithms import ECAlgorithm, RSAAlgorithm
        from jwt.exceptions import InvalidKeyError

        for algorithm in (RSAAlgorithm(RSAAlgorithm.SHA256), ECAlgorithm(ECAlgorithm.SHA256)):
            with contextlib.suppress(InvalidKeyError, ValueError, TypeError):
                algorithm.prepare_key(pem)
                return pem
        raise ValueError("is not a PEM RSA or EC key")

    @field_validator("jwks_url", "openai_base_url")
    @classmethod
    def _url_is_http(cls, url: str | None) -> str | None:
        # PyJWT's key client takes these two schemes only, and the openai client refuses
        # what httpx cannot parse: either says so with a traceback at start.
        if url is None:
            return url
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises on a port that is not a number)
        except ValueError:
            raise ValueError("must be an https:// (or http://) URL") from None
        if parts.scheme.lower() not in ("https", "http") or not parts.hostname:
            raise ValueError("must be an https:// (or http://) URL")
        return url

    @field_validator("key_prefix")
    @classmethod
    def _prefix_is_one_segment(cls, prefix: str) -> str:
        # keys.py puts ':' between parts and '{...}' around what picks a key's slot.
        if any(part in prefix for part in ":{}"):
            raise ValueError("must not contain ':', '{' or '}'")
        return prefix

    @model_validator(mode="after")
    def _agent_is_runnable(self) -> Settings:
        if self.agent not in AGENTS:
            raise ValueError(f"THOUGHTWIRE_AGENT must be one of {', '.join(AGENTS)}")
        if self.agent == "openai" and not self.openai_api_key:
            raise ValueError("the openai agent needs OPENAI_API_KEY")
        return self

    @property
    def auth_enabled(self) -> bool:
        """Whether any token key is set, which turns authentication on everywhere."""
        return bool(self.jwt_secret or self.jwt_public_key or self.jwks_url)

    @property
    def origins(self) -> tuple[str, ...]:
        """The allowed browser origins, one per entry of ``allowed_origins``."""
        return tuple(o.strip().rstrip("/") for o in self.allowed_origins.split(",") if o.strip())

    @property
    def local_origins(self) -> bool:
        """Whether ``null`` and loopback origins pass (``allow_local_origins``, resolved)."""
        return bool(self.allow_local_origins)

    def for_embedded(self) -> Settings:
        """These settings as ``thoughtwire up`` runs them: the defaults of a local gateway."""
        if self.allow_local_origins is not None:
            return self
        return self.model_copy(update={"allow_local_origins": not self.auth_enabled})

    @property
    def hosts(self) -> frozenset[str]:
        """The allowed host names, lower-cased, from ``allowed_hosts``."""
        return frozenset(h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip())

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Build settings from an environment mapping; explicit overrides win."""
        values = _Environment(cls, environ)()
        if "agent" not in values and values.get("openai_api_key"):
            values["agent"] = "openai"
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _one_line(error: ValidationError, values: Mapping[str, Any]) -> str:
    """The first problem of a validation error, naming the variable it came from."""
    first = error.errors(include_url=False)[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    if not first["loc"]:  # a rule across settings; its message names the variables
        return message
    field = str(first["loc"][0])
    if first["type"] == "extra_forbidden":
        return f"{field} is not a setting"
    if field not in values:
        return f"{field}: {message}"
    value = f"{env_name(field)}={_shown(field, values[field])!r}"
    kind = str(first["type"])
    if kind.endswith(("_parsing", "_type")):  # not a number, not a boolean, ...
        return f"{value} is not a valid {kind.split('_')[0]}"
    return f"{value}: {message.replace('Input should be', 'must be')}"


def _shown(field: str, value: Any) -> Any:
    """A value as an error may print it: secrets hidden, a URL's password replaced."""
    if field in _SECRETS:
        return "***"
    if field == "redis_url" and isinstance(value, str):
        from thoughtwire.shared.redis.topology import redact

        return redact(value)
    if field in ("openai_base_url", "jwks_url") and isinstance(value, str):
        # Up to the last '@' before the path, as shared/logs.py finds a URL's password.
        scheme, sep, rest = value.partition("://")
        userinfo, at, host = rest.rpartition("@")
        if sep and at and ":" in userinfo:
            return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}"
    return value


def describe() -> list[tuple[str, str, str, str]]:
    """``(variable, type, default, description)`` for every setting, in declared order."""
    rows = []
    for name, info in Settings.model_fields.items():
        kind = str(info.annotation).replace("typing.", "").replace("<class '", "")
        kind = kind.replace("'>", "").replace(" | None", " (optional)")
        default = "" if info.default in (None, "") else repr(info.default).strip("'")
        rows.append((env_name(name), kind, default, info.description or ""))
    return rows


def markdown() -> str:
    """docs/settings.md: every setting's variable, type, default and description."""
    lines = [
        "# Settings",
        "",
        "Every setting of a frontend (`thoughtwire api`), a worker (`thoughtwire worker`)",
        "and `thoughtwire up`, read from the environment once at start. A bad value stops",
        "the process with one line naming the variable (exit code 2); a `THOUGHTWIRE_`",
        "variable that is none of these is named in a warning at start (with the setting",
        "it may be a misspelling of), and ignored. Generated from",
        "`shared/settings.py` by `python -m thoughtwire.shared.settings`; do not edit by hand.",
        "",
        "| Variable | Type | Default | Description |",
        "|---|---|---|---|",
    ]
    for variable, kind, default, description in describe():
        shown = f"`{default}`" if default else ""
        text = description.replace("|", "\\|")
        lines.append(f"| `{variable}` | {kind} | {shown} | {text} |")
    return "\n".join(lines) + "\n"


DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"  # the checkout's

if __name__ == "__main__":
    DOC.write_text(markdown())
    print(f"wrote {DOC}", file=sys.stderr)
