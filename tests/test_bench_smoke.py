"""The benchmark must not rot: a tiny run of every scenario and system delivers every event.

Nothing here is about timing; the machine is shared and noisy.
"""

import json
import subprocess
import sys

from tests.procs import seconds


def test_every_system_delivers_every_event(tmp_path):
    out = tmp_path / "smoke.json"
    subprocess.run(
        [sys.executable, "-m", "bench.run", "--profile", "smoke", "--out", str(out)],
        check=True,
        timeout=seconds(300),
        capture_output=True,
    )
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"streams", "saturation", "fanout", "idle", "coalescing"}
    for scenario, systems in results.items():
        expected = (
            {"thoughtwire"} if scenario == "coalescing" else {"thoughtwire", "thin", "socketio"}
        )
        assert set(systems) == expected
        for system, result in systems.items():
            if scenario == "idle":
                assert result["sockets"] == 50, (scenario, system)
                continue
            assert result["delivered"] > 0, (scenario, system)
            for count in ("lost", "duplicated", "out_of_order", "incomplete_sockets"):
                assert result[count] == 0, (scenario, system, count, result)
