"""The image's HEALTHCHECK: GET /healthz of whichever role the container runs.

The slim base has no curl. A frontend (`api`, `up`) answers on its ``--port`` (8000
unless told); a worker on ``THOUGHTWIRE_METRICS_PORT`` (9100 unless set). The role
and port are read from PID 1's command line, the container's own command.
"""

import os
import sys
import urllib.request
from pathlib import Path


def port(argv: list[str]) -> int:
    """The port /healthz is served on for this command line."""
    if "worker" in argv:
        return int(os.environ.get("THOUGHTWIRE_METRICS_PORT") or 9100)
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--port="):
            return int(arg.partition("=")[2])
    return 8000


def main() -> int:
    """0 if /healthz answers 200 within 2 s, else 1."""
    argv = Path("/proc/1/cmdline").read_bytes().decode().split("\0")
    url = f"http://127.0.0.1:{port(argv)}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
