"""The benchmark must not rot: a tiny run of every scenario and system delivers every event,
and the single-purpose tools run.

Nothing here is about timing; the machine is shared and noisy.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.procs import seconds


@pytest.mark.timeout(600)
def test_every_system_delivers_every_event(tmp_path):
    out = tmp_path / "smoke.json"
    command = [sys.executable, "-m", "bench.run", "--profile", "smoke", "--out", str(out)]
    with (tmp_path / "bench.log").open("wb") as log:
        bench = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert bench.wait(seconds(400)) == 0, (tmp_path / "bench.log").read_text()[-3000:]
        finally:
            if bench.poll() is None:
                bench.terminate()  # the runner stops everything it started on SIGTERM
                bench.wait(60)
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"streams", "fanout", "idle"}
    for scenario, systems in results.items():
        assert set(systems) == {
            "thoughtwire",
            "thoughtwire-public",
            "thoughtwire-nometrics",
            "thin",
            "socketio",
        }
        for system, result in systems.items():
            if scenario == "idle":
                assert result["sockets"] == 50, (scenario, system)
                continue
            assert result["delivered"] > 0, (scenario, system)
            for count in ("lost", "duplicated", "out_of_order", "incomplete_sockets"):
                assert result[count] == 0, (scenario, system, count, result)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("tool", "expected"),
    [
        (["bench.starts", "--count", "50"], '"jobs": 50'),
        (["bench.socket_memory", "--count", "20"], "measured: 20 sockets"),
        (["bench.appends", "--count", "200"], '"appends": 200'),
        (["bench.hub_reads", "--events", "200"], "4 messages a read"),
        (
            [
                *("bench.redis_cost", "--sessions", "2", "--tokens", "10", "--rounds", "1"),
                *(
                    "--systems",
                    "thoughtwire,thin,thin-logged",
                    "--parts-rounds",
                    "1",
                    "--out",
                    os.devnull,
                ),
            ],
            '"redis_cpu_us_per_event_median"',
        ),
    ],
    ids=["starts", "socket_memory", "appends", "hub_reads", "redis_cost"],
)
def test_the_single_purpose_tools_run(tool, expected):
    done = subprocess.run(
        [sys.executable, "-m", *tool], capture_output=True, text=True, timeout=seconds(200)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout
