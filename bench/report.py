"""Turn a benchmark result (JSON) into a Markdown table and a plot.

.venv/bin/python -m bench.report bench/results/latest.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SYSTEMS = ("thoughtwire", "thoughtwire-public", "thin", "socketio")
COLUMNS = [
    ("events_per_s", "events/s"),
    ("latency_ms_p50", "p50 ms"),
    ("latency_ms_p99", "p99 ms"),
    ("latency_ms_max", "max ms"),
    ("handled_ms_p99", "p99 handled ms"),
    ("lost", "lost"),
    ("duplicated", "dup"),
    ("out_of_order", "ooo"),
    ("frontend_cpu_us_per_event", "frontend µs/event"),
    ("worker_cpu_us_per_event", "worker µs/event"),
    ("redis_cpu_us_per_event", "Redis µs/event"),
    ("client_cpu_us_per_event", "load µs/event"),
    ("frontend_peak_rss_mb", "peak RSS MB"),
]


def table(report: dict[str, Any]) -> str:
    lines = []
    for scenario, systems in report["results"].items():
        lines.append(f"\n**{scenario}**\n")
        if scenario == "idle":
            lines.append("| system | sockets | RSS MB | KB per socket |\n|---|---:|---:|---:|")
            for name, r in systems.items():
                if "error" in r:
                    lines.append(f"| {name} | failed: {r['error']} | | |")
                    continue
                lines.append(
                    f"| {name} | {r['sockets']} | {r['rss_mb']} | {r['rss_kb_per_socket']} |"
                )
            continue
        lines.append("| system | " + " | ".join(label for _, label in COLUMNS) + " |")
        lines.append("|---|" + "---:|" * len(COLUMNS))
        for name, r in systems.items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error']} |" + " |" * (len(COLUMNS) - 1))
                continue
            cells = (str(r.get(key, "")) for key, _ in COLUMNS)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> None:
    scenarios = [s for s in report["results"] if s not in ("idle", "coalescing")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.2
    for i, system in enumerate(SYSTEMS):
        xs = [j + (i - 1.5) * width for j in range(len(scenarios))]
        p99 = [report["results"][s].get(system, {}).get("latency_ms_p99", 0) for s in scenarios]
        cpu = [
            report["results"][s].get(system, {}).get("frontend_cpu_us_per_event", 0)
            for s in scenarios
        ]
        axes[0].bar(xs, p99, width, label=system)
        axes[1].bar(xs, cpu, width, label=system)
    for ax, title in zip(
        axes,
        (
            "latency p99 (ms), worker ts to the client's socket",
            "frontend CPU per delivered event (µs)",
        ),
        strict=True,
    ):
        ax.set_xticks(range(len(scenarios)), scenarios)
        ax.set_title(title)
        ax.set_yscale("log")
        ax.legend()
    machine = report["machine"]
    fig.suptitle(
        f"{machine['cores']} cores, {machine['cpu']}, Python {machine['python']}, Redis {machine['redis']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest.json")
    report = json.loads(source.read_text())
    markdown = table(report)
    source.with_suffix(".md").write_text(markdown + "\n")
    plot(report, source.with_suffix(".png"))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
