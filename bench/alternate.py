"""Two checkouts of thoughtwire measured alternately, and what lies outside the noise.

One round runs ``python -m bench.run --systems thoughtwire`` in the first checkout, then
in the second; the rounds repeat. The first checkout's own spread over its rounds is the
run-to-run noise: a figure of the second is called worse only when every one of its
rounds is worse than every round of the first. Each checkout runs with its own Python,
so that each imports its own code::

    python -m bench.alternate --rounds 3 \\
        --a /tmp/old --a-python "env PYTHONPATH=/tmp/old .venv/bin/python" \\
        --b . --out bench/results/alternate.json

Every run is bounded in time; nothing is left running (bench.run stops what it starts).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCENARIOS = "streams,saturation,fanout"
FIGURES = (  # (name in bench.run's JSON, True when more is better)
    ("events_per_s", True),
    ("latency_ms_p50", False),
    ("latency_ms_p99", False),
    ("frontend_cpu_us_per_event", False),
    ("worker_cpu_us_per_event", False),
    ("redis_cpu_us_per_event", False),
    ("frontend_peak_rss_mb", False),
)
RUN_SECONDS = 900


def measure(checkout: str, python: str, scenarios: str, out: Path) -> dict[str, Any]:
    """One ``bench.run`` of thoughtwire in ``checkout``; its results by scenario."""
    command = [*shlex.split(python), "-m", "bench.run", "--systems", "thoughtwire"]
    command += ["--scenarios", scenarios, "--out", str(out)]
    subprocess.run(command, cwd=checkout, check=True, timeout=RUN_SECONDS)
    results: dict[str, Any] = json.loads(out.read_text())["results"]
    return {scenario: systems["thoughtwire"] for scenario, systems in results.items()}


def spread(rounds: list[dict[str, Any]], scenario: str, figure: str) -> list[float]:
    """One figure of one scenario, over the rounds."""
    return [float(r[scenario][figure]) for r in rounds]


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each figure's range in ``a`` and ``b``, and whether ``b`` is worse in every round."""
    rows = []
    for scenario in a[0]:
        for figure, more_is_better in FIGURES:
            old, new = spread(a, scenario, figure), spread(b, scenario, figure)
            worse = max(new) < min(old) if more_is_better else min(new) > max(old)
            rows.append(
                {"scenario": scenario, "figure": figure, "a": old, "b": new, "worse": worse}
            )
    return rows


def exact(rounds: list[dict[str, Any]]) -> bool:
    """Nothing lost, duplicated or out of order in any round."""
    return all(
        r[s]["lost"] == r[s]["duplicated"] == r[s]["out_of_order"] == 0 for r in rounds for s in r
    )


def table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table."""
    lines = ["| scenario | figure | a | b | b worse in every round |", "|---|---|---:|---:|---|"]
    for row in rows:
        a, b = row["a"], row["b"]
        lines.append(
            f"| {row['scenario']} | {row['figure']} | {min(a)}-{max(a)} | {min(b)}-{max(b)} "
            f"| {'yes' if row['worse'] else ''} |"
        )
    return "\n".join(lines)


def main() -> int:
    """Run the rounds, write the JSON, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="the checkout measured first each round")
    parser.add_argument("--a-python", default=sys.executable)
    parser.add_argument("--b", required=True, help="the checkout measured second")
    parser.add_argument("--b-python", default=sys.executable)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenarios", default=SCENARIOS)
    parser.add_argument("--out", default="bench/results/alternate.json")
    args = parser.parse_args()
    a: list[dict[str, Any]] = []
    b: list[dict[str, Any]] = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="thoughtwire-alternate-") as scratch:
        for n in range(args.rounds):
            a.append(measure(args.a, args.a_python, args.scenarios, Path(scratch, f"a{n}.json")))
            b.append(measure(args.b, args.b_python, args.scenarios, Path(scratch, f"b{n}.json")))
    rows = compare(a, b)
    report = {
        "what": "thoughtwire in two checkouts, alternately; a figure of b is worse only "
        "when every round of b is worse than every round of a",
        "a": args.a,
        "b": args.b,
        "rounds": args.rounds,
        "minutes": round((time.time() - started) / 60, 1),
        "exact": exact(a) and exact(b),
        "comparison": rows,
        "raw": {"a": a, "b": b},
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(f"nothing lost, duplicated or reordered: {report['exact']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
