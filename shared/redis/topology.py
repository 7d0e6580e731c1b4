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
from urllib.parse import parse_qs, quote, unquote, urlsplit


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


@dataclass(frozen=True)
class Topology:
    """A parsed ``REDIS_URL``: its kind, nodes, credentials and (Sentinel) service."""

    kind: Kind
    url: str  # as given; for one server, what redis-py's ``from_url`` takes
    nodes: tuple[tuple[str, int], ...] = ()
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    service: str | None = None  # Sentinel: the master's name
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    @property
    def redacted(self) -> str:
        """The URL with its password replaced, for logs and errors."""
        return redact(self.url)

    def node_url(self, host: str, port: int) -> str:
        """A ``redis://`` (``rediss://``) URL of one node, with the servers' credentials."""
        userinfo = ""
        if self.password is not None:
            userinfo = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return f"{'rediss' if self.tls else 'redis'}://{userinfo}{host}:{port}"


def parse(url: str) -> Topology:
    """Read a ``REDIS_URL``; a ``ValueError`` says what is wrong, never with the password."""
    scheme, sep, _rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        names = ", ".join(f"{s}://" for s in _SCHEMES)
        raise ValueError(f"must start with one of {names}")
    kind, tls = _SCHEMES[scheme.lower()]
    if kind is Kind.SINGLE:
        return Topology(kind, url, tls=tls)
    parts = urlsplit("x://" + url.partition("://")[2])
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo)
    nodes = tuple(_node(item) for item in hosts.split(",") if item)
    if not nodes:
        raise ValueError("names no host:port")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    path = [unquote(p) for p in parts.path.split("/") if p]
    if kind is Kind.CLUSTER:
        if path:
            raise ValueError("a cluster has no database number (it has only db 0)")
        return Topology(kind, url, nodes, tls, username, password)
    if not path:
        raise ValueError("names no Sentinel service: redis+sentinel://host:port/<service>")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("must end in /<service> or /<service>/<db>")
    return Topology(
        kind,
        url,
        nodes,
        tls,
        username,
        password,
        int(path[1]) if len(path) == 2 else 0,
        path[0],
        query.get("sentinel_username"),
        query.get("sentinel_password"),
    )


def redact(url: str) -> str:
    """``url`` with the password of its user info (if any) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc_end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:netloc_end], rest[netloc_end:]
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    path, q, query = tail.partition("?")
    if q:
        query = "&".join(
            "sentinel_password=***" if p.startswith("sentinel_password=") else p
            for p in query.split("&")
        )
        tail = f"{path}?{query}"
    return f"{scheme}{sep}{userinfo}{at}{hosts}{tail}"


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
