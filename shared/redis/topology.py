"""Where Redis is: one server, a Redis Cluster, or a master found through Sentinel.

``REDIS_URL`` takes one of three forms, each with a TLS twin (``rediss``):

- ``redis://[user:password@]host:port[/db]``: one server;
- ``redis+cluster://[user:password@]host:port[,host:port…]``: a Redis Cluster, reached
  through any of the listed nodes (it finds the others itself);
- ``redis+sentinel://[user:password@]host:port[,host:port…]/<service>[/db]``: the master
  of ``service`` as the sentinels name it, followed across failovers.

The user and password are those of the Redis servers. Sentinels that want their own
are given ``?sentinel_password=…`` (and ``sentinel_username``). Nothing here connects:
:mod:`thoughtwire.shared.redis.connections` builds the clients from a :class:`Topology`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from redis.connection import parse_url


class Kind(enum.StrEnum):
    """The shape of a deployment's Redis."""

    SINGLE = "single"
    CLUSTER = "cluster"
    SENTINEL = "sentinel"


_SCHEMES = {
    "redis": (Kind.SINGLE, False),
    "rediss": (Kind.SINGLE, True),
    "unix": (Kind.SINGLE, False),
    "redis+cluster": (Kind.CLUSTER, False),
    "rediss+cluster": (Kind.CLUSTER, True),
    "redis+sentinel": (Kind.SENTINEL, False),
    "rediss+sentinel": (Kind.SENTINEL, True),
}

# The TLS options a ``rediss+cluster://`` or ``rediss+sentinel://`` URL may carry (a
# private CA's ``ssl_ca_certs``, a client certificate...), named and read as redis-py reads
# them from a ``rediss://`` URL: every connection to a node, a sentinel or the master
# takes them.
TLS_OPTIONS = frozenset(
    {
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_cert_reqs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
        "ssl_min_version",
        "ssl_ciphers",
    }
)


@dataclass(frozen=True)
class Topology:
    """A parsed ``REDIS_URL``: its kind, nodes, credentials and (Sentinel) service."""

    kind: Kind
    url: str = field(repr=False)  # as given (password too); for one server, ``from_url``'s
    nodes: tuple[tuple[str, int], ...] = ()
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    service: str | None = None  # Sentinel: the master's name
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls_query: str = ""  # the URL's TLS options (TLS_OPTIONS), as given

    @property
    def tls_options(self) -> dict[str, Any]:
        """The URL's TLS options as redis-py's clients take them as keyword arguments."""
        if not self.tls_query:
            return {}
        options: dict[str, Any] = dict(parse_url(f"rediss://localhost?{self.tls_query}"))
        return {name: value for name, value in options.items() if name in TLS_OPTIONS}

    @property
    def redacted(self) -> str:
        """The URL with its password replaced, for logs and errors."""
        return redact(self.url)

    def node_url(self, host: str, port: int) -> str:
        """A ``redis://`` (``rediss://``) URL of one node, with the servers' credentials."""
        userinfo = ""
        if self.password is not None or self.username:  # a user with no password signs in too
            password = quote(self.password or "", safe="")
            userinfo = f"{quote(self.username or '', safe='')}:{password}@"
        host = f"[{host}]" if ":" in host else host  # an IPv6 address
        query = f"?{self.tls_query}" if self.tls_query else ""
        return f"{'rediss' if self.tls else 'redis'}://{userinfo}{host}:{port}{query}"


def parse(url: str) -> Topology:
    """Read a ``REDIS_URL``; a ``ValueError`` says what is wrong, never with the password."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        names = ", ".join(f"{s}://" for s in _SCHEMES)
        raise ValueError(f"must start with one of {names}")
    kind, tls = _SCHEMES[scheme.lower()]
    if kind is Kind.SINGLE:
        try:
            query = urlsplit(url).query  # what redis-py reads it with: an unclosed '[' fails
        except ValueError:
            raise ValueError("is not a URL: an IPv6 host is written [address]:port") from None
        if query:  # an option's value redis-py cannot read: its ValueError names the option
            parse_url(f"redis://localhost?{query}")
        return Topology(kind, url, tls=tls)
    # The user info ends at the last '@' (a password may hold '#', '/', '?' or '@' not
    # percent-encoded), so nothing of it reaches the host list or an error about it.
    userinfo, _, located = rest.rpartition("@")
    username, password = _credentials(userinfo)
    hosts, path, query = _located(located)
    nodes = tuple(_node(item) for item in hosts.split(",") if item)
    if not nodes:
        raise ValueError("names no host:port")
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    tls_query = _tls_query(query) if tls else ""
    segments = [unquote(p) for p in path.split("/") if p]
    if kind is Kind.CLUSTER:
        if segments:
            raise ValueError("a cluster has no database number (it has only db 0)")
        return Topology(kind, url, nodes, tls, username, password, tls_query=tls_query)
    if not segments:
        raise ValueError("names no Sentinel service: redis+sentinel://host:port/<service>")
    if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ValueError("must end in /<service> or /<service>/<db>")
    return Topology(
        kind,
        url,
        nodes,
        tls,
        username,
        password,
        int(segments[1]) if len(segments) == 2 else 0,
        segments[0],
        options.get("sentinel_username"),
        options.get("sentinel_password"),
        tls_query,
    )


def redact(url: str) -> str:
    """``url`` with every password in it replaced by ``***``: its user info's (up to the
    last '@', however malformed the rest) and any query value whose name says password."""
    head, at, located = url.rpartition("@")
    if at:
        scheme_end = head.find("://") + 3 if "://" in head else head.find(":") + 1
        user = head[scheme_end:].lstrip("/").partition(":")[0]
        slashes = head[scheme_end:][: len(head[scheme_end:]) - len(head[scheme_end:].lstrip("/"))]
        url = f"{head[:scheme_end]}{slashes}{user}:***@{located}"
    base, q, query = url.partition("?")
    if not q:
        return url
    pairs = []
    for pair in query.split("&"):
        name, eq, _value = pair.partition("=")
        pairs.append(f"{name}=***" if eq and "password" in unquote(name).lower() else pair)
    return f"{base}?{'&'.join(pairs)}"


def _tls_query(query: str) -> str:
    """The TLS options of a URL's query; an ``ssl_`` option that is none of them is refused
    rather than left out silently."""
    pairs = [pair for pair in query.split("&") if pair.startswith("ssl_")]
    for pair in pairs:
        if (name := pair.partition("=")[0]) not in TLS_OPTIONS:
            raise ValueError(f"takes no option {name!r} (TLS: {', '.join(sorted(TLS_OPTIONS))})")
    parse_url(f"rediss://localhost?{'&'.join(pairs)}")  # a value it cannot read: ValueError
    return "&".join(pairs)


def _located(text: str) -> tuple[str, str, str]:
    """``host:port,...[/path][?query]`` split into its three parts."""
    hosts_end = min((i for i in (text.find("/"), text.find("?")) if i >= 0), default=len(text))
    hosts, tail = text[:hosts_end], text[hosts_end:]
    path, _, query = tail.partition("?")
    return hosts, path, query


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _node(item: str) -> tuple[str, int]:
    host, colon, port = item.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{item!r} is not host:port")
    return host.strip("[]"), int(port)
