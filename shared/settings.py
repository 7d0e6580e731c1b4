"""Settings: one frozen object, built from the environment once at startup and passed down.

Nothing else in the codebase reads ``os.environ``. Every setting has a
``THOUGHTWIRE_`` variable, except the few that the wider ecosystem already names
(``REDIS_URL``, ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, ``JWT_SECRET``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

AGENTS = ("simulated", "openai")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    # Where Redis is. None means embedded: an in-process Redis (``thoughtwire up``).
    redis_url: str | None = None
    # Prefix of every key and channel, so several deployments (or tests) share one Redis.
    key_prefix: str = "tw"
    # Connections per process in the command pool. Pools block (up to redis_pool_timeout)
    # rather than raise when exhausted: redis-py 8 raises MaxConnectionsError past its cap,
    # which under load would silently drop streams.
    redis_pool_size: int = 64
    redis_pool_timeout: float = 5.0

    # Agent
    agent: str = "simulated"
    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    openai_model: str = "gpt-4o-mini"
    openai_timeout: float = 60.0
    openai_idle_timeout: float = 30.0  # longest silence inside a stream
    openai_retries: int = 3  # before the first token: 429, 5xx, connection errors, timeouts
    max_steps: int = 8  # model calls per run (each tool round is one)
    max_tokens_per_run: int = 8192
    tool_timeout: float = 30.0
    tools: str = ""  # more tools: "pkg.module:function,..."
    memory_turns: int = 20  # previous turns of a session sent with the next prompt
    coalesce_ms: float = 15.0  # merge answer/thinking deltas this close together
    sim_step_delay: float = 0.5
    sim_answer_tokens: int = 12
    sim_tokens_per_second: float = 20.0
    # Each answer token lands within this share of an interval of its slot, as a real
    # model's tokens do; 0 is a metronome.
    sim_jitter: float = 0.0

    # Event log per session: bounded in length and lifetime. Run states, results and
    # idempotency keys are kept as long.
    log_maxlen: int = 10_000
    log_ttl: int = 86_400

    # Frontend
    send_queue_size: int = 1024
    ping_interval: float = 60.0
    max_message_bytes: int = 64 * 1024
    max_prompt_chars: int = 32_000
    ws_per_message_deflate: bool = False
    # Bounds on what a client may make a frontend hold before it is known to be
    # harmless (docs/security.md, "Bounds"). A request body: 413 past it, counted as it
    # arrives. A request head (request line and headers): 431 past it.
    max_body_bytes: int = 1024 * 1024
    max_header_bytes: int = 64 * 1024
    # A request head, and a WebSocket handshake until it is answered, must be done this
    # long after the connection (or the previous response); otherwise it is closed.
    handshake_timeout: float = 10.0
    # A request's body must have arrived whole this long after its head; otherwise 408.
    body_timeout: float = 30.0
    # Open connections per frontend process, sockets included; past it only /healthz
    # and /readyz are answered, with a little room, and then connections are closed.
    max_connections: int = 10_000

    # Authentication: HS256 with jwt_secret, and/or RS256/ES256 with a PEM public key or
    # a JWKS URL. Any of them turns authentication on for every socket and endpoint.
    jwt_secret: str | None = field(default=None, repr=False)
    jwt_public_key: str | None = None
    jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    viewer_token_ttl: int = 3600
    # Browser origins allowed to open sockets and call the API ("*": any). Empty: only
    # pages served by the frontend itself (same origin), and clients that send none.
    allowed_origins: str = ""
    # Also allow pages opened from a file (``file://``, Origin ``null``) and loopback
    # origins (http(s)://localhost, 127.0.0.1, [::1], any port). None: on for
    # ``thoughtwire up`` without authentication, a gateway on the developer's own
    # machine, so the pages one writes there just work; off everywhere else.
    allow_local_origins: bool | None = None
    # Host names (``name`` for any port, or ``name:port``) requests may be addressed to,
    # beyond loopback ("*": any). Empty: only loopback without authentication, any with
    # it. A local frontend without authentication is otherwise open to DNS rebinding.
    allowed_hosts: str = ""

    # Limits per user, held across all frontends (state in Redis).
    rate_limit: int = 120  # client frames and API calls per minute
    max_runs_per_user: int = 8
    max_sockets_per_user: int = 50
    idle_timeout: float = 900.0  # a socket with no frame either way this long is closed

    # Frontend shutdown: sockets are told to reconnect in batches spread over this
    # window, so they do not all land on the other frontends at once.
    drain_window: float = 5.0
    # Interactive runs are cancelled once no socket has watched their session this long.
    disconnect_grace: float = 15.0
    # Runs a frontend follows until they end, to end those whose state Redis lost
    # (api/runs.py); past it the oldest is no longer followed.
    tracked_runs: int = 10_000

    # Worker
    worker_concurrency: int = 32
    drain_timeout: float = 20.0  # plus drain_window, below Kubernetes' 30 s grace period
    lease_seconds: float = 10.0
    max_attempts: int = 3
    # How long a worker keeps retrying a Redis write (a restart, a failover) before
    # it gives the run up to the lease, for another worker to retry.
    redis_retry_seconds: float = 30.0
    embedded_workers: int = 2

    @property
    def auth_enabled(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key or self.jwks_url)

    @property
    def origins(self) -> tuple[str, ...]:
        return tuple(o.strip().rstrip("/") for o in self.allowed_origins.split(",") if o.strip())

    @property
    def local_origins(self) -> bool:
        """Whether ``null`` and loopback origins pass (``allow_local_origins``, resolved)."""
        return bool(self.allow_local_origins)

    def for_embedded(self) -> Settings:
        """These settings as ``thoughtwire up`` runs them: the defaults of a local gateway."""
        if self.allow_local_origins is not None:
            return self
        return dataclasses.replace(self, allow_local_origins=not self.auth_enabled)

    @property
    def hosts(self) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip())

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Build settings from an environment mapping; explicit overrides win."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = _ENV_NAMES.get(f.name, "THOUGHTWIRE_" + f.name.upper())
            raw = environ.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(name, raw, f.type)
        if "agent" not in values and values.get("openai_api_key"):
            values["agent"] = "openai"
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.agent not in AGENTS:
            raise SettingsError(f"THOUGHTWIRE_AGENT must be one of {', '.join(AGENTS)}")
        if self.agent == "openai" and not self.openai_api_key:
            raise SettingsError("the openai agent needs OPENAI_API_KEY")
        for name in ("send_queue_size", "log_maxlen", "worker_concurrency", "tracked_runs"):
            if getattr(self, name) < 1:
                raise SettingsError(f"THOUGHTWIRE_{name.upper()} must be at least 1")
        for name in ("max_body_bytes", "max_header_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise SettingsError(f"THOUGHTWIRE_{name.upper()} must be at least 1")
        for name in ("handshake_timeout", "body_timeout"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"THOUGHTWIRE_{name.upper()} must be more than 0")
        if self.redis_pool_size < 2:  # the pipelined calls keep one connection to themselves
            raise SettingsError("THOUGHTWIRE_REDIS_POOL_SIZE must be at least 2")
        if self.memory_turns < 0:
            raise SettingsError("THOUGHTWIRE_MEMORY_TURNS must be 0 (no memory) or more")
        if not 0 <= self.sim_jitter <= 0.5:
            raise SettingsError("THOUGHTWIRE_SIM_JITTER must be between 0 and 0.5")
        if ":" in self.key_prefix or "{" in self.key_prefix:
            raise SettingsError("THOUGHTWIRE_KEY_PREFIX must not contain ':' or '{'")


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


def _parse(name: str, raw: str, kind: Any) -> Any:
    kind = str(kind)
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind.split(' ')[0]}") from None
    return raw
