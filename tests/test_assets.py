"""The page's files and the JavaScript client as the frontend serves them (api/assets.py):
held gzipped, sent gzipped to whoever takes gzip and whole to whoever does not."""

from __future__ import annotations

import gzip
from importlib import resources

import pytest
from starlette.requests import Request

from thoughtwire.api.app import _page_assets
from thoughtwire.api.assets import Asset, takes_gzip


def request(**headers: str) -> Request:
    """A GET with ``headers``, as a route receives it."""
    raw = [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": raw})


@pytest.mark.parametrize(
    ("accept", "gzipped"),
    [
        ("gzip, deflate, br", True),
        ("GZIP", True),
        ("*", True),
        ("deflate;q=1, gzip;q=0.5", True),
        ("*;q=0, gzip", True),  # named beats the wildcard
        ("", False),
        ("identity", False),
        ("gzip;q=0", False),
        ("gzip;q=0.000, *", False),
        ("br, *;q=0", False),
    ],
)
def test_gzip_is_taken_when_named_or_wildcarded_without_weight_zero(accept, gzipped):
    assert takes_gzip(accept) is gzipped


def test_every_file_is_held_gzipped_and_comes_back_whole_either_way():
    """Each file of the page answers gzipped to a browser and byte for byte to a client
    without gzip, each with its own ETag, and a 304 for the copy the client has."""
    root = resources.files("thoughtwire.api").joinpath("static")
    assets = _page_assets()
    assert {"page.js", "page.css", "vendor/purify.es.js", "vendor/marked.esm.js"} <= set(assets)
    held = sum(len(asset.gzipped) for asset in assets.values())
    whole = sum(len(root.joinpath(name).read_bytes()) for name in assets)
    print(f"\npage files held: {held / 1024:.0f} KiB gzipped, {whole / 1024:.0f} KiB whole")
    assert held < whole / 2
    for name, asset in assets.items():
        body = root.joinpath(name).read_bytes()
        zipped = asset.response(request(accept_encoding="gzip, deflate"), "no-cache")
        assert zipped.headers["content-encoding"] == "gzip"
        assert gzip.decompress(zipped.body) == body
        plain = asset.response(request(), "no-cache")
        assert plain.body == body and "content-encoding" not in plain.headers
        for answer in (zipped, plain):
            assert answer.headers["vary"] == "Accept-Encoding"
            assert answer.headers["cache-control"] == "no-cache"
        assert zipped.headers["etag"] != plain.headers["etag"]
        unchanged = asset.response(
            request(accept_encoding="gzip", if_none_match=zipped.headers["etag"]), "no-cache"
        )
        assert unchanged.status_code == 304 and unchanged.body == b""
        for held in (f"W/{zipped.headers['etag']}", f'"x",{zipped.headers["etag"]}', "*"):
            weak = asset.response(request(accept_encoding="gzip", if_none_match=held), "no-cache")
            assert weak.status_code == 304, held
        # A client holding the other copy gets this one.
        other = asset.response(request(if_none_match=zipped.headers["etag"]), "no-cache")
        assert other.status_code == 200 and other.body == body


def test_the_same_file_makes_the_same_bytes_and_etag_on_every_start():
    """``mtime=0``: frontends of one release answer one ETag, so a balancer moving a
    browser between them costs no download."""
    first, second = Asset.of(b"x" * 1000, "text/plain"), Asset.of(b"x" * 1000, "text/plain")
    assert first == second
