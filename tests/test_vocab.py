"""The closed vocabularies are the strings the wire, the run hash and the scripts use."""

from __future__ import annotations

import orjson

from thoughtwire.shared import scripts
from thoughtwire.shared.protocol import TERMINAL_STATUS, Job
from thoughtwire.shared.vocab import OnDisconnect, RunStatus, StopReason, Verdict


def test_every_verdict_is_one_the_start_script_returns():
    returned = {v for v in Verdict if f"'{v}'" in scripts.START}
    assert returned == set(Verdict)


def test_run_statuses_are_the_scripts_and_the_terminal_events():
    for status in (RunStatus.QUEUED, RunStatus.RUNNING):
        assert f"'{status}'" in scripts.CANCEL
        assert not status.ended
    assert set(TERMINAL_STATUS.values()) == {s for s in RunStatus if s.ended}


def test_members_are_their_wire_strings():
    assert StopReason.LOST == "lost" and f"{StopReason.SHUTDOWN}" == "shutdown"
    job = Job(run="r", session="s", prompt="p", on_disconnect=OnDisconnect.CANCEL)
    assert orjson.loads(job.encode())["on_disconnect"] == "cancel"
    assert Job.decode(job.encode()).on_disconnect is OnDisconnect.CANCEL
    assert Job.decode(b'{"session": "s", "run": "r", "prompt": "p"}').on_disconnect == (
        OnDisconnect.CONTINUE
    )
