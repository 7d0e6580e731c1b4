"""The page's own files and the JavaScript client, held gzipped in memory and served by name.

Every frontend holds them for its lifetime, so they are kept compressed: about 70 KB
instead of 250, and a third of the bytes to send (docs/page.md, "Files"). A browser takes them as they are, with
``Content-Encoding: gzip``; a client that does not accept gzip gets them decompressed.
No request path reaches the file system: a name is looked up among the files read at
start.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

GZIP_LEVEL = 9  # once per file at start: the smallest copy costs a few milliseconds once


@dataclass(frozen=True, slots=True)
class Asset:
    """One file: its gzipped bytes, its content type and the ETag of its bytes."""

    gzipped: bytes
    media_type: str
    etag: str  # of the file's own bytes; the gzipped copy's is this with ".gz"

    @classmethod
    def of(cls, body: bytes, media_type: str) -> Asset:
        """An asset of ``body``, compressed once (``mtime=0``: the same bytes on every start)."""
        digest = hashlib.sha256(body).hexdigest()[:16]
        return cls(gzip.compress(body, GZIP_LEVEL, mtime=0), media_type, digest)

    def response(self, request: Request, cache_control: str) -> Response:
        """The file for ``request``: 304 when it has this copy, gzipped when it takes gzip."""
        zipped = takes_gzip(request.headers.get("accept-encoding", ""))
        etag = f'"{self.etag}.gz"' if zipped else f'"{self.etag}"'
        headers = {"Cache-Control": cache_control, "ETag": etag, "Vary": "Accept-Encoding"}
        if _matches(request.headers.get("if-none-match", ""), etag):
            return Response(status_code=304, headers=headers)
        if zipped:
            headers["Content-Encoding"] = "gzip"
            return Response(self.gzipped, media_type=self.media_type, headers=headers)
        body = gzip.decompress(self.gzipped)
        return Response(body, media_type=self.media_type, headers=headers)


def takes_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value accepts gzip: named, else ``*``, and not ``q=0``."""
    weights = {}
    for item in accept_encoding.lower().split(","):
        coding, _, params = item.partition(";")
        weights[coding.strip()] = params.strip()
    weight = weights.get("gzip", weights.get("*"))
    return weight is not None and not _zero(weight)


def _zero(params: str) -> bool:
    """Whether a coding's parameters give it weight 0 (``q=0``, ``q=0.000``): refused."""
    name, _, value = params.partition("=")
    try:
        return name.strip() == "q" and float(value) == 0
    except ValueError:
        return False


def _matches(if_none_match: str, etag: str) -> bool:
    """Whether an ``If-None-Match`` value names ``etag``: ``*``, or it in its list, weak
    (``W/``) or not, as a GET compares (RFC 9110, 13.1.2)."""
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags
