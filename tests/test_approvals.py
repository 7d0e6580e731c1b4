"""Approvals: a tool call waits for the session's owner, across frontends and worker deaths.

Unit tests feed the pieces plain data or a real Redis; the integration tests run two
uvicorn frontends and worker processes on a real redis-server, with the simulated
agent's "search" call needing approval. Every wait is bounded; processes are stopped
by their own PID.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import pytest

from tests.conftest import openai_env, start_cluster
from tests.fake_openai import Reply
from tests.procs import seconds, wait_until
from tests.wsclient import connect, greeting, recv_json
from thoughtwire.shared.bus import Bus
from thoughtwire.shared.closecodes import ErrorCode
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import (
    Approve,
    Job,
    ProtocolError,
    Thought,
    parse_client_message,
)
from thoughtwire.shared.reducer import fold
from thoughtwire.shared.vocab import DecidedBy, Decision
from thoughtwire.worker import approvals as worker_approvals
from thoughtwire.worker.agents.base import Decided, Turn, denied
from thoughtwire.worker.agents.openai_chat import OpenAIAgent
from thoughtwire.worker.agents.simulated import SimulatedAgent
from thoughtwire.worker.approvals import ApprovalPolicy, Approvals
from thoughtwire.worker.attempt import RunAttempt, RunLimits
from thoughtwire.worker.tools import requires_approval, tool, toolbox

SECRET = "an-approvals-test-secret-that-is-32-bytes-or-more"
TIMEOUT = 6.0  # the cluster's approval timeout (s): long enough for a worker to die and be replaced


def token(sub: str = "alice") -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


# --- the message, the agent contract, the tools -------------------------------------


def test_an_approve_message_parses_and_its_fields_are_checked():
    frame = '{"type":"approve","run":"r1","call_id":"call_1","decision":"deny","reason":"no"}'
    assert parse_client_message(frame, max_prompt_chars=10) == Approve(
        "r1", "call_1", Decision.DENY, "no"
    )
    bad = [
        '{"type":"approve","run":"r1","call_id":"c","decision":"maybe"}',
        '{"type":"approve","run":"r 1","call_id":"c","decision":"allow"}',
        '{"type":"approve","run":"r1","call_id":"","decision":"allow"}',
        '{"type":"approve","run":"r1","decision":"allow"}',
        '{"type":"approve","run":"r1","call_id":"c","decision":"allow","reason":7}',
    ]
    for frame in bad:
        with pytest.raises(ProtocolError) as refused:
            parse_client_message(frame, max_prompt_chars=10)
        assert refused.value.code == ErrorCode.BAD_MESSAGE


async def test_a_not_waiting_reply_names_the_run_and_the_call():
    """Plain data: the ``error`` reply to an ``approve`` for a call that does not wait
    names its ``run`` and ``call_id``, so a client that sent the approval again on a new
    socket (the first may have counted just as the old one closed) knows which it was,
    whatever else it sent meanwhile. Before, it named neither."""
    from types import SimpleNamespace

    from thoughtwire.api.sockets import SessionSocket
    from thoughtwire.shared.settings import Settings

    asked: list[tuple[str, str, str]] = []

    class Guard:
        async def check_rate(self, principal: Any) -> None:
            pass

    class Frontend:
        settings = Settings()
        guard = Guard()

        async def approve(self, principal, run, call_id, decision, reason):
            asked.append((run, call_id, decision))
            return False  # decided already

    sent: list[str] = []
    socket = SessionSocket.__new__(SessionSocket)
    socket.raw_prompts = False
    socket.principal = None
    socket.frontend = Frontend()
    socket.conn = SimpleNamespace(send=sent.append, viewer=SimpleNamespace(session="S"))
    frame = {"type": "approve", "run": "r1", "call_id": "call_1", "decision": "allow"}
    await socket._handle_frame(json.dumps(frame))
    assert asked == [("r1", "call_1", "allow")]
    assert [json.loads(reply) for reply in sent] == [
        {
            "type": "error",
            "code": "not_waiting",
            "message": "that call is not waiting for an approval",
            "run": "r1",
            "call_id": "call_1",
        }
    ]
    # Every refusal of an approve names it: a client settles the approval on any of them,
    # where one it could not tell from another would be sent again on every new socket.
    sent.clear()
    for bad in (
        {**frame, "decision": "maybe"},
        {**frame, "reason": "x" * 3000},
        {**frame, "reason": "half \ud83d"},
    ):
        await socket._handle_frame(json.dumps(bad))
    replies = [json.loads(reply) for reply in sent]
    assert [(r["code"], r["run"], r["call_id"]) for r in replies] == [
        ("bad_message", "r1", "call_1")
    ] * 3, replies


async def test_a_turn_without_an_approver_denies_and_a_denial_is_an_error_observation():
    decided = await Turn("hi").ask("c1", "search", {}, None)
    assert not decided.allowed
    observation = denied("search", "c1", Decided(Decision.DENY, "not now", DecidedBy.USER))
    assert observation.type == "observation"
    assert observation.extra == {"tool": "search", "call_id": "c1", "is_error": True}
    assert "denied" in observation.content and "not now" in observation.content
    by_timeout = denied("search", "c1", Decided(Decision.DENY, None, DecidedBy.TIMEOUT))
    assert "no answer in time" in by_timeout.content


def test_a_tool_needs_approval_if_it_declares_it_or_is_named_in_the_setting():
    def wipe(path: str) -> str:
        """Delete a file."""
        return path

    assert not tool(wipe).needs_approval
    assert tool(wipe, needs_approval=True).needs_approval
    assert tool(requires_approval(wipe)).needs_approval
    tools = toolbox("", "calculator, nothing")
    assert tools["calculator"].needs_approval
    assert not tools["current_time"].needs_approval


async def test_the_simulated_agent_asks_about_search_and_goes_on_after_a_denial():
    asked: list[tuple[str, str, Any, Any]] = []

    async def approver(call_id: str, name: str, arguments: Any, checkpoint: Any) -> Decided:
        asked.append((call_id, name, arguments, checkpoint))
        return Decided(Decision.DENY, "no searching", DecidedBy.USER)

    agent = SimulatedAgent(0, 2, 0, approval_tools=frozenset({"search"}))
    thoughts = [t async for t in agent.run(Turn("cats", approver=approver))]
    types = [t.type for t in thoughts]
    assert asked == [("call_1", "search", {"query": "cats"}, {"step": 3})]
    observation = thoughts[types.index("observation")]
    assert observation.extra is not None and observation.extra["is_error"] is True
    assert types[types.index("action") - 1] == "tool_input"
    assert types.count("answer") == 2
    # Resumed from the checkpoint: it asks again first, and writes nothing before.
    resumed = [t async for t in agent.run(Turn("cats", resume={"step": 3}, approver=approver))]
    assert resumed[0].type == "observation" and len(asked) == 2


# --- the bus and Approvals on a real Redis -------------------------------------------


def make_bus(redis_client: Any, prefix: str) -> Bus:
    return Bus(redis_client, Keys(prefix), log_maxlen=10_000, log_ttl=600)


async def started_run(bus: Bus, session: str = "s1") -> tuple[Job, str]:
    job = Job(run="r" + session, session=session, prompt="hi")
    await bus.submit(job)
    start = await bus.start(job, "w1", 30_000, 3)
    return job, start.fence


async def test_a_waiting_call_is_decided_once_and_only_while_its_run_waits(redis_client, prefix):
    bus = make_bus(redis_client, prefix)
    job, fence = await started_run(bus)
    # Nothing waits yet: a decision is refused.
    assert not await bus.decide(job.session, job.run, "c1", Decision.ALLOW, None, DecidedBy.USER)
    assert not await bus.await_approval(job, "another-fence", {"call_id": "c1"})
    assert await bus.await_approval(job, fence, {"call_id": "c1", "deadline": "1"})
    assert await bus.run_session(job.run) == job.session
    assert not await bus.decide(job.session, job.run, "c2", Decision.ALLOW, None, DecidedBy.USER)
    assert await bus.decide(job.session, job.run, "c1", Decision.DENY, "no", DecidedBy.USER)
    # The first answer counts: the timeout's, or a second person's, is refused.
    assert not await bus.decide(job.session, job.run, "c1", Decision.ALLOW, None, DecidedBy.USER)
    state = await bus.approval(job)
    assert state is not None
    assert (state["decision"], json.loads(state["reason"]), state["by"]) == ("deny", "no", "user")
    await bus.end_approval(job)
    assert await bus.approval(job) is None


async def test_a_cancelled_run_takes_no_decision(redis_client, prefix):
    bus = make_bus(redis_client, prefix)
    job, fence = await started_run(bus)
    assert await bus.await_approval(job, fence, {"call_id": "c1", "deadline": "1"})
    await bus.cancel(job.session, job.run)
    assert not await bus.decide(job.session, job.run, "c1", Decision.ALLOW, None, DecidedBy.USER)


class Written:
    """Stands in for the attempt: what Approvals writes, numbered as the tracker would."""

    def __init__(self) -> None:
        self.events: list[Thought] = []

    async def send(self, thought: Thought) -> None:
        self.events.append(thought)

    def snapshot(self) -> dict[str, str]:
        return {"blocks": "{}", "answer": ""}


def approvals_for(
    bus: Bus,
    job: Job,
    fence: str,
    written: Written,
    timeout: float = 30,
    waiting: dict[str, str] | None = None,
) -> Approvals:
    policy = ApprovalPolicy(timeout, Decision.DENY, 1.0)
    return Approvals(
        bus, job, fence, policy, send=written.send, snapshot=written.snapshot, waiting=waiting
    )


async def test_ask_writes_the_approval_keeps_the_wait_and_a_decision_wakes_it(
    redis_client, prefix, monkeypatch
):
    # Its poll is longer than the wait below: only the wake can end the ask in time.
    monkeypatch.setattr(worker_approvals, "POLL_SECONDS", 60.0)
    bus = make_bus(redis_client, prefix)
    job, fence = await started_run(bus)
    written = Written()
    approvals = approvals_for(bus, job, fence, written)
    approvals.seen(Thought("action", "", {"call_id": "c1"}))
    asking = asyncio.create_task(approvals.ask("c1", "search", {"q": 1}, {"step": 3}))
    async with asyncio.timeout(seconds(5)):
        while await bus.approval(job) is None:
            await asyncio.sleep(0.01)
    state = await bus.approval(job)
    assert state is not None and json.loads(state["checkpoint"]) == {"step": 3}
    assert [e.type for e in written.events] == ["approval"]
    assert written.events[0].extra is not None
    assert written.events[0].extra["default"] == "deny"
    assert await bus.decide(job.session, job.run, "c1", Decision.ALLOW, "ok", DecidedBy.USER)
    approvals.wake()  # what the worker's control channel does
    async with asyncio.timeout(seconds(5)):
        decided = await asking
    assert decided == Decided(Decision.ALLOW, "ok", DecidedBy.USER)
    assert [e.type for e in written.events] == ["approval", "decision"]
    assert await bus.approval(job) is None  # forgotten once written


async def test_nobody_answers_and_the_default_is_taken_at_the_deadline(redis_client, prefix):
    bus = make_bus(redis_client, prefix)
    job, fence = await started_run(bus)
    written = Written()
    approvals = approvals_for(bus, job, fence, written, timeout=0.3)
    approvals.seen(Thought("action", "", {"call_id": "c1"}))
    async with asyncio.timeout(seconds(5)):
        decided = await approvals.ask("c1", "search", {}, None)
    assert decided == Decided(Decision.DENY, None, DecidedBy.TIMEOUT)
    assert written.events[-1].extra is not None
    assert written.events[-1].extra["by"] == "timeout"


async def test_past_the_deadline_a_refused_default_is_not_asked_again_in_a_loop(
    redis_client, prefix
):
    bus = make_bus(redis_client, prefix)
    job, fence = await started_run(bus)
    calls = 0
    decide = bus.decide

    async def counted(*args: Any) -> bool:
        nonlocal calls
        calls += 1
        return await decide(*args)

    bus.decide = counted  # type: ignore[method-assign]
    approvals = approvals_for(bus, job, fence, Written(), timeout=0.05)
    approvals.seen(Thought("action", "", {"call_id": "c1"}))
    asking = asyncio.create_task(approvals.ask("c1", "search", {}, None))
    async with asyncio.timeout(seconds(5)):
        while await bus.approval(job) is None:
            await asyncio.sleep(0.01)
    await bus.cancel(job.session, job.run)  # DECIDE refuses from now on
    # A measure over half a second, not a wait for an event: how often it asks.
    await asyncio.wait({asking}, timeout=0.5)
    asking.cancel()
    await asyncio.gather(asking, return_exceptions=True)
    assert calls <= 2, f"{calls} decisions asked for in 0.5 s"


async def test_a_wait_past_its_deadline_ends_when_the_run_is_marked_for_cancel(
    redis_client, prefix
):
    bus = make_bus(redis_client, prefix)
    job, fence = await started_run(bus)
    policy = ApprovalPolicy(0.05, Decision.DENY, 1.0)
    written = Written()
    asking: asyncio.Task[Decided] | None = None

    def cancel() -> None:  # what the attempt does: it stops its agent with "cancel"
        assert asking is not None
        asking.cancel()

    approvals = Approvals(
        bus, job, fence, policy, send=written.send, snapshot=written.snapshot, on_cancel=cancel
    )
    approvals.seen(Thought("action", "", {"call_id": "c1"}))
    asking = asyncio.create_task(approvals.ask("c1", "search", {}, None))
    async with asyncio.timeout(seconds(5)):
        while await bus.approval(job) is None:
            await asyncio.sleep(0.01)
    await bus.cancel(job.session, job.run)
    async with asyncio.timeout(seconds(3)):
        with pytest.raises(asyncio.CancelledError):
            await asking
    assert [e.type for e in written.events] == ["approval"]  # no decision: the run ends


async def test_a_lost_approval_record_is_a_denial_even_when_the_default_allows(
    redis_client, prefix
):
    bus = make_bus(redis_client, prefix)
    job, fence = await started_run(bus)
    written = Written()
    policy = ApprovalPolicy(30, Decision.ALLOW, 1.0)
    approvals = Approvals(bus, job, fence, policy, send=written.send, snapshot=written.snapshot)
    approvals.seen(Thought("action", "", {"call_id": "c1"}))
    asking = asyncio.create_task(approvals.ask("c1", "search", {}, None))
    async with asyncio.timeout(seconds(5)):
        while await bus.approval(job) is None:
            await asyncio.sleep(0.01)
    await bus.end_approval(job)  # as a failover to a replica without it would
    approvals.wake()
    async with asyncio.timeout(seconds(5)):
        decided = await asking
    assert decided == Decided(Decision.DENY, None, DecidedBy.LOST)
    assert written.events[-1].extra is not None
    assert (written.events[-1].extra["decision"], written.events[-1].extra["by"]) == (
        "deny",
        "lost",
    )


@pytest.mark.parametrize("died", ["after the decision", "before the approval"])
async def test_a_resumed_wait_writes_what_the_log_lacks_and_nothing_twice(
    redis_client, prefix, died
):
    bus = make_bus(redis_client, prefix)
    job, fence = await started_run(bus)
    waiting = {"call_id": "c1", "tool": "search", "deadline": str(2**40), "seq": "0"}
    assert await bus.await_approval(job, fence, waiting)
    assert await bus.decide(job.session, job.run, "c1", Decision.ALLOW, None, DecidedBy.USER)
    if died == "after the decision":  # it died before it forgot the wait
        heads = [
            bus.encode(job, Thought(kind, "", {"call_id": "c1"}))
            for kind in ("approval", "decision")
        ]
        await bus.submit_encoded(job, heads, fence=fence, first=1)
    written = Written()
    state = await bus.approval(job)
    approvals = approvals_for(bus, job, fence, written, waiting=state)
    async with asyncio.timeout(seconds(5)):
        decided = await approvals.ask("c1", "search", {}, None)
    assert decided.allowed
    expected = [] if died == "after the decision" else ["approval", "decision"]
    assert [e.type for e in written.events] == expected
    assert await bus.approval(job) is None


class AsksAfterDeltas:
    """Streams reasoning and a call's pieces, yields its action, and asks at once."""

    async def run(self, turn: Turn) -> Any:
        for i in range(40):
            yield Thought("thinking", f"t{i} ", {"delta": True})
        for i in range(1500):  # more than the writer takes before the agent must wait
            yield Thought("thinking", f"step {i}")
        for piece in ('{"query": ', '"cats"}'):
            yield Thought("tool_input", piece, {"delta": True, "call_id": "c1", "tool": "search"})
        yield Thought("action", "search", {"tool": "search", "arguments": {}, "call_id": "c1"})
        decided = await turn.ask("c1", "search", {"query": "cats"}, {"at": "search"})
        yield Thought(
            "observation", "found", {"tool": "search", "call_id": "c1", "is_error": False}
        )
        assert decided.allowed


async def test_with_coalescing_the_approval_still_follows_its_action_in_the_log(
    redis_client, prefix
):
    bus = make_bus(redis_client, prefix)
    job, fence = await started_run(bus)
    limits = RunLimits(
        lease_ms=10_000, redis_retry_seconds=1.0, disconnect_grace=5.0, coalesce_window=0.05
    )
    attempt = RunAttempt(bus, job, "0-1", fence, "w1", limits)

    async def person() -> None:
        while await bus.approval(job) is None:
            await asyncio.sleep(0.005)
        assert await bus.decide(job.session, job.run, "c1", Decision.ALLOW, None, DecidedBy.USER)
        attempt.approvals.wake()

    async with asyncio.timeout(seconds(10)):
        answering = asyncio.create_task(person())
        await attempt.execute(AsksAfterDeltas())
        await answering
    log = [json.loads(e) for e in await bus.history(job.session)]
    types = [e["type"] for e in log]
    assert types.index("action") < types.index("approval") < types.index("decision")
    assert types.index("decision") < types.index("observation")
    assert types[-1] == "done"
    blocks = {e["type"]: e.get("block") for e in log}
    assert blocks["approval"] == blocks["action"] == blocks["decision"]


# --- integration: two frontends, workers, kill -9 ------------------------------------


@pytest.fixture(scope="module")
def approving(redis_server, logdir):
    """Two frontends, two workers; "search" needs approval; 1 s leases; quick runs."""
    c = start_cluster(
        redis_server,
        logdir,
        frontends=2,
        workers=2,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_APPROVAL_TOOLS="search",
        THOUGHTWIRE_APPROVAL_TIMEOUT=str(TIMEOUT),
        THOUGHTWIRE_LEASE_SECONDS="1",
    )
    yield c
    c.stop()


async def prompt_until_approval(ws: Any, text: str) -> list[dict[str, Any]]:
    """Send a prompt; the events up to and including its ``approval``."""
    await ws.send(text)
    return await until_approval(ws)


async def until_approval(ws: Any) -> list[dict[str, Any]]:
    """The events up to and including the next ``approval``."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(seconds(20)):
        while not events or events[-1]["type"] != "approval":
            message = await recv_json(ws)
            if "seq" in message:
                events.append(message)
    return events


async def rest_of_run(ws: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(seconds(30)):
        while not events or events[-1]["type"] not in ("done", "error", "cancelled"):
            message = await recv_json(ws)
            if "seq" in message:
                events.append(message)
    return events


def socket_url(frontend: Any, session: str | None = None, who: str | None = None) -> str:
    url = f"{frontend.ws}/ws/agent-thoughts?token={who or token()}"
    return url + (f"&session={session}" if session else "")


def assert_whole_run(events: list[dict[str, Any]]) -> None:
    """One attempt's log of a run: no retry, each block started once, ends with done."""
    types = [e["type"] for e in events]
    assert "retry" not in types
    assert types[-1] == "done"
    assert [e["seq"] for e in events] == list(range(events[0]["seq"], events[-1]["seq"] + 1))
    starts: list[str] = []
    for e in events:
        block = e.get("block")
        kind = e["type"]
        starting = not starts or starts[-1] != block
        if block is not None and kind not in ("approval", "decision", "block_end") and starting:
            starts.append(block)
    assert len(starts) == len(set(starts)), f"a block written twice: {starts}"
    assert types.count("approval") == 1 and types.count("decision") == 1


async def test_approved_over_frontend_b_while_the_prompt_came_on_frontend_a(approving):
    a, b = approving.frontends
    async with connect(socket_url(a)) as ws:
        session = await greeting(ws)
        before = await prompt_until_approval(ws, "find cats")
        approval = before[-1]
        action = next(e for e in before if e["type"] == "action")
        assert approval["block"] == action["block"]
        assert (approval["call_id"], approval["tool"]) == ("call_1", "search")
        assert approval["arguments"] == {"query": "find cats"}
        assert (approval["timeout_ms"], approval["default"]) == (TIMEOUT * 1000, "deny")
        async with connect(socket_url(b, session)) as other:
            await greeting(other)
            message = {"type": "approve", "run": approval["run"], "call_id": "call_1"}
            await other.send(json.dumps({**message, "decision": "allow", "reason": "fine"}))
            after = await rest_of_run(ws)
            # The same call again: it is not waiting any more.
            await other.send(json.dumps({**message, "decision": "deny"}))
            refused = await recv_json(other)
            while "seq" in refused:
                refused = await recv_json(other)
            assert refused["code"] == "not_waiting"
            assert (refused["run"], refused["call_id"]) == (approval["run"], "call_1")
    decision = after[0]
    assert decision["type"] == "decision"
    assert (decision["decision"], decision["reason"], decision["by"]) == ("allow", "fine", "user")
    assert decision["block"] == approval["block"]
    observation = next(e for e in after if e["type"] == "observation")
    assert observation["is_error"] is False
    assert_whole_run(before + after)


async def test_denied_over_http_the_observation_is_an_error_and_the_run_goes_on(approving):
    a, b = approving.frontends
    async with connect(socket_url(a)) as ws:
        await greeting(ws)
        approval = (await prompt_until_approval(ws, "find dogs"))[-1]
        path = f"/v1/runs/{approval['run']}/approvals/call_1"
        headers = {"Authorization": f"Bearer {token()}"}
        async with httpx.AsyncClient(timeout=10, headers=headers) as http:
            response = await http.post(b.http + path, json={"decision": "deny", "reason": "no"})
            assert response.status_code == 200, response.text
            assert response.json()["decision"] == "deny"
            after = await rest_of_run(ws)
            again = await http.post(b.http + path, json={"decision": "allow"})
            assert again.status_code == 409
            assert again.json()["code"] == "not_waiting"
            unknown = await http.post(
                b.http + "/v1/runs/nope/approvals/x", json={"decision": "allow"}
            )
            assert unknown.status_code == 409
    assert [e["type"] for e in after[:2]] == ["decision", "observation"]
    assert after[0]["by"] == "user" and after[0]["decision"] == "deny"
    assert after[1]["is_error"] is True and "denied" in after[1]["content"]
    assert "answer" in [e["type"] for e in after]
    assert after[-1]["type"] == "done"


async def test_nobody_answers_and_the_default_deny_is_taken_by_timeout(approving):
    async with connect(socket_url(approving.frontends[0])) as ws:
        await greeting(ws)
        await prompt_until_approval(ws, "wait for nobody")
        began = time.monotonic()
        after = await rest_of_run(ws)
    waited = time.monotonic() - began
    assert TIMEOUT - 1 < waited < TIMEOUT + 3, waited
    assert (after[0]["type"], after[0]["decision"], after[0]["by"]) == (
        "decision",
        "deny",
        "timeout",
    )
    assert after[1]["is_error"] is True
    assert after[-1]["type"] == "done"


async def test_a_viewer_cannot_approve(approving):
    a, b = approving.frontends
    async with connect(socket_url(a)) as ws:
        session = await greeting(ws)
        approval = (await prompt_until_approval(ws, "viewers watch"))[-1]
        async with httpx.AsyncClient(timeout=10) as http:
            minted = await http.post(
                f"{a.http}/v1/sessions/{session}/viewer-token",
                headers={"Authorization": f"Bearer {token()}"},
            )
            viewer = minted.json()["token"]
            path = f"/v1/runs/{approval['run']}/approvals/call_1"
            response = await http.post(
                b.http + path,
                json={"decision": "allow"},
                headers={"Authorization": f"Bearer {viewer}"},
            )
            assert response.status_code == 403
            # The same for a run that does not exist, or has no call waiting: a viewer
            # never hears "not waiting", as if it might have answered another time.
            for other in ("no-such-run", approval["run"]):
                response = await http.post(
                    f"{b.http}/v1/runs/{other}/approvals/call_9",
                    json={"decision": "allow"},
                    headers={"Authorization": f"Bearer {viewer}"},
                )
                assert response.status_code == 403, (other, response.text)
                response = await http.delete(
                    f"{b.http}/v1/jobs/{other}", headers={"Authorization": f"Bearer {viewer}"}
                )
                assert response.status_code == 403, (other, response.text)
            stranger = await http.post(
                b.http + path,
                json={"decision": "allow"},
                headers={"Authorization": f"Bearer {token('mallory')}"},
            )
            assert stranger.status_code == 403
        async with connect(socket_url(b, session, viewer)) as watcher:
            await greeting(watcher)
            message = {"type": "approve", "run": "no-such-run", "call_id": "call_1"}
            await watcher.send(json.dumps({**message, "decision": "allow"}))
            async with asyncio.timeout(seconds(5)):
                await watcher.wait_closed()
            assert watcher.close_code == 4003
        async with connect(socket_url(b, session, viewer)) as watcher:
            await greeting(watcher)
            message = {"type": "approve", "run": approval["run"], "call_id": "call_1"}
            await watcher.send(json.dumps({**message, "decision": "allow"}))
            async with asyncio.timeout(seconds(5)):
                await watcher.wait_closed()
            assert watcher.close_code == 4003
        # Still waiting: the owner cancels it.
        await ws.send(json.dumps({"type": "cancel", "run": approval["run"]}))
        after = await rest_of_run(ws)
    assert after[-1]["type"] == "cancelled"


async def test_cancel_while_waiting_ends_the_run_within_a_second(approving):
    a, b = approving.frontends
    async with connect(socket_url(a)) as ws:
        session = await greeting(ws)
        approval = (await prompt_until_approval(ws, "cancel me"))[-1]
        async with connect(socket_url(b, session)) as other:
            await greeting(other)
            sent = time.monotonic()
            await other.send(json.dumps({"type": "cancel", "run": approval["run"]}))
            after = await rest_of_run(ws)
            elapsed = time.monotonic() - sent
            await other.send(
                json.dumps(
                    {
                        "type": "approve",
                        "run": approval["run"],
                        "call_id": "call_1",
                        "decision": "allow",
                    }
                )
            )
            refused = await recv_json(other)
            while "seq" in refused:
                refused = await recv_json(other)
    assert [e["type"] for e in after] == ["cancelled"]
    assert elapsed < 1.0, f"cancel took {elapsed:.2f} s"
    assert refused["code"] == "not_waiting"
    with approving.redis.client() as r:
        assert not r.exists(Keys(approving.prefix).run_approval(session, approval["run"]))


def run_owner_pid(cluster: Any, session: str, run: str) -> int:
    with cluster.redis.client() as r:
        owner = r.hget(Keys(cluster.prefix).run(session, run), "owner")
    return int(owner.decode().split("-")[-2])


def session_log(cluster: Any, session: str) -> list[dict[str, Any]]:
    with cluster.redis.client() as r:
        entries = r.xrange(Keys(cluster.prefix).session_log(session))
    return [json.loads(fields[b"e"]) for _id, fields in entries]


@pytest.mark.parametrize("when", ["after the takeover", "before the takeover"])
async def test_the_waiting_worker_is_killed_and_another_finishes_the_run_after_approval(
    approving, when
):
    a, b = approving.frontends
    async with connect(socket_url(a)) as ws:
        session = await greeting(ws)
        before = await prompt_until_approval(ws, f"survive {when}")
        run = before[-1]["run"]
        pid = run_owner_pid(approving, session, run)
        victim = approving.worker_with_pid(pid)
        victim.kill()  # SIGKILL, this worker's PID only
        approving.workers.remove(victim)
        approving.add_worker()
        if when == "after the takeover":
            wait_until(
                lambda: run_owner_pid(approving, session, run) != pid,
                10,
                "another worker to take the waiting run",
            )
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(
                f"{b.http}/v1/runs/{run}/approvals/call_1",
                json={"decision": "allow"},
                headers={"Authorization": f"Bearer {token()}"},
            )
            assert response.status_code == 200, response.text
        after = await rest_of_run(ws)
    assert run_owner_pid(approving, session, run) != pid
    assert_whole_run(before + after)
    assert after[0]["type"] == "decision" and after[0]["by"] == "user"
    log = [e for e in session_log(approving, session) if e["run"] == run]
    assert log == before + after


async def test_a_waiting_run_cancelled_after_its_worker_died_ends_and_forgets_its_wait(
    approving,
):
    a, _b = approving.frontends
    async with connect(socket_url(a)) as ws:
        session = await greeting(ws)
        before = await prompt_until_approval(ws, "cancel me while nobody runs me")
        run = before[-1]["run"]
        victim = approving.worker_with_pid(run_owner_pid(approving, session, run))
        victim.kill()  # SIGKILL, this worker's PID only
        approving.workers.remove(victim)
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.delete(
                f"{a.http}/v1/jobs/{run}",
                headers={"Authorization": f"Bearer {token()}"},
            )
            assert response.status_code < 300, response.text
        approving.add_worker()
        after = await rest_of_run(ws)  # the next worker's START finds the cancel
    assert [e["type"] for e in after] == ["cancelled"]
    with approving.redis.client() as r:
        assert not r.exists(Keys(approving.prefix).run_approval(session, run))


# --- the whole thing: a model's run with an approval, folded by the reducer ----------

CONFORMANCE = Path(__file__).resolve().parent.parent / "clients" / "conformance" / "reducer.json"
CASE_NAME = "a model's run: reasoning, a tool call in 4 pieces approved, a Markdown answer"
MARKDOWN = (
    "**Six times seven** is ",
    "`42`.\n\n",
    "- six sevens\n",
    "- checked with the calculator",
)


@pytest.fixture(scope="module")
def modelled(redis_server, logdir, llm):
    """Two frontends and one worker whose openai agent asks before each calculator call."""
    c = start_cluster(
        redis_server,
        logdir,
        frontends=2,
        workers=1,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_APPROVAL_TOOLS="calculator",
        **openai_env(llm),
    )
    yield c
    c.stop()


def normalized(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's frames with its ids and clocks replaced by fixed ones, as a case has them."""
    fixed = {"session": "s1", "run": "r1", "epoch": "e1", "ts": 0}
    timings = {"ttft_ms": 0, "total_ms": 0}
    return [{**e, **fixed, **{k: v for k, v in timings.items() if k in e}} for e in events]


async def test_a_model_run_with_an_approved_call_folds_to_its_conformance_case(modelled, llm):
    call = Reply.tool_call(
        "call_1", "calculator", {"expression": "6 * 7"}, reasoning=("Let me ", "compute.")
    )
    call.usage = {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32}
    answer = Reply.text(
        *MARKDOWN, usage={"prompt_tokens": 40, "completion_tokens": 18, "total_tokens": 58}
    )
    llm.replies.extend([call, answer])
    a, b = modelled.frontends
    async with connect(socket_url(a)) as ws:
        await greeting(ws)
        before = await prompt_until_approval(ws, "What is 6 * 7?")
        approval = before[-1]
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(
                f"{b.http}/v1/runs/{approval['run']}/approvals/{approval['call_id']}",
                json={"decision": "allow"},
                headers={"Authorization": f"Bearer {token()}"},
            )
            assert response.status_code == 200, response.text
        after = await rest_of_run(ws)
    events = before + after
    assert approval["call_id"] == "c1.1"  # the run's id for the call, not the server's
    types = [e["type"] for e in events]
    assert types.count("tool_input") == 4
    assert types.index("action") < types.index("approval") < types.index("decision")
    observation = next(e for e in events if e["type"] == "observation")
    assert (observation["content"], observation["is_error"]) == ("42", False)
    assert_whole_run(events)
    frames = normalized(events)
    state = fold(frames)
    (run,) = state["runs"].values()
    text = next(block for block in run["blocks"] if block["kind"] == "text")
    assert text["text"] == "".join(MARKDOWN)
    call = next(block for block in run["blocks"] if block["kind"] == "tool_call")
    assert call["input"] == '{"expression": "6 * 7"}'
    assert call["approval"] == {"status": "allow", "reason": None, "by": "user"}
    (case,) = [c for c in json.loads(CONFORMANCE.read_text())["cases"] if c["name"] == CASE_NAME]
    assert frames == case["frames"]
    assert state == case["expected"]


@pytest.mark.parametrize("model_id", [None, "call_0"], ids=["no ids", "reused ids"])
async def test_an_answer_meant_for_the_first_call_cannot_decide_the_second(modelled, llm, model_id):
    """A server that sends no call ids, or "call_0" at every step: each call waits under its
    own id, and an allow sent late for the first call does not approve the second."""
    llm.replies.clear()
    llm.replies.extend(
        [
            Reply.tool_call(model_id, "calculator", {"expression": "1 + 1"}),
            Reply.tool_call(model_id, "calculator", {"expression": "2 + 2"}),
            Reply.text("Done."),
        ]
    )
    a, b = modelled.frontends
    headers = {"Authorization": f"Bearer {token()}"}
    async with connect(socket_url(a)) as ws, httpx.AsyncClient(timeout=10, headers=headers) as http:
        await greeting(ws)
        before = await prompt_until_approval(ws, "two sums")
        first = before[-1]
        approvals = f"{b.http}/v1/runs/{first['run']}/approvals/"
        allowed = await http.post(approvals + first["call_id"], json={"decision": "allow"})
        assert allowed.status_code == 200, (first["call_id"], allowed.text)
        between = await until_approval(ws)
        second = between[-1]
        late = await http.post(approvals + first["call_id"], json={"decision": "allow"})
        assert late.status_code == 409, "an allow for the first call approved the second"
        assert late.json()["code"] == "not_waiting"
        refused = await http.post(
            approvals + second["call_id"], json={"decision": "deny", "reason": "not this one"}
        )
        assert refused.status_code == 200, refused.text
        after = await rest_of_run(ws)
    events = before + between + after
    assert second["call_id"] != first["call_id"] and second["block"] != first["block"]
    decisions = [(e["call_id"], e["decision"]) for e in events if e["type"] == "decision"]
    assert decisions == [(first["call_id"], "allow"), (second["call_id"], "deny")]
    observations = [e for e in events if e["type"] == "observation"]
    assert [(e["call_id"], e["is_error"]) for e in observations] == [
        (first["call_id"], False),
        (second["call_id"], True),
    ]
    (run,) = fold(events)["runs"].values()
    calls = [block for block in run["blocks"] if block["kind"] == "tool_call"]
    assert [(c["input"], c["approval"]["status"]) for c in calls] == [
        ('{"expression": "1 + 1"}', "allow"),
        ('{"expression": "2 + 2"}', "deny"),
    ]


class Died(Exception):
    """The worker went away while the run waited."""


async def test_the_openai_agent_goes_on_from_its_checkpoint_without_asking_the_model_again(llm):
    llm.replies.extend(
        [
            Reply.tool_call("call_9", "calculator", {"expression": "2 + 3"}),
            Reply.text("It is ", "5."),
        ]
    )
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=llm.base_url, max_retries=0)
    agent = OpenAIAgent(client=client, model="m", tools=toolbox(None, "calculator"))
    checkpoints: list[Any] = []

    async def dies(call_id: str, name: str, arguments: Any, checkpoint: Any) -> Decided:
        assert call_id == "c1.1"  # the run's id for the call, not the server's "call_9"
        checkpoints.append(json.loads(json.dumps(checkpoint)))  # it must be plain JSON
        raise Died

    async def allows(call_id: str, name: str, arguments: Any, checkpoint: Any) -> Decided:
        assert (call_id, name, arguments) == ("c1.1", "calculator", {"expression": "2 + 3"})
        return Decided(Decision.ALLOW)

    first: list[Thought] = []
    try:
        with pytest.raises(Died):
            async with asyncio.timeout(seconds(30)):
                async for thought in agent.run(Turn("2 + 3?", approver=dies)):
                    first.append(thought)
        requests = len(llm.requests)
        turn = Turn("2 + 3?", resume=checkpoints[0], approver=allows)
        async with asyncio.timeout(seconds(30)):
            second = [t async for t in agent.run(turn)]
    finally:
        await client.close()
    assert [t.type for t in first][-1] == "action"
    assert [t.type for t in second] == ["observation", "answer", "answer", "done"]
    assert second[0].content == "5"
    assert second[0].extra is not None and second[0].extra["call_id"] == "c1.1"
    assert len(llm.requests) == requests + 1  # the answer's call only
    sent = llm.requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["id"] == sent[2]["tool_call_id"] == "call_9"
    # A checkpoint kept before calls had ids of their own goes on under the server's id,
    # the one its wait in Redis names.
    older = {**checkpoints[0], "calls": [{**checkpoints[0]["calls"][0]}]}
    del older["calls"][0]["call_id"]
    assert OpenAIAgent._begin(Turn("2 + 3?", resume=older))[3][0].call_id == "call_9"
    assert [m["role"] for m in turn.messages] == ["user", "assistant", "tool", "assistant"]


async def test_a_draining_worker_hands_a_waiting_run_over_and_it_goes_on_waiting(approving):
    a, b = approving.frontends
    async with connect(socket_url(a)) as ws:
        session = await greeting(ws)
        before = await prompt_until_approval(ws, "survive a deploy")
        run = before[-1]["run"]
        pid = run_owner_pid(approving, session, run)
        leaving = approving.worker_with_pid(pid)
        leaving.signal(signal.SIGTERM)  # drains for THOUGHTWIRE_DRAIN_TIMEOUT, then hands it back
        wait_until(lambda: not leaving.alive(), 20, "the draining worker to exit")
        approving.workers.remove(leaving)
        approving.add_worker()
        wait_until(
            lambda: run_owner_pid(approving, session, run) != pid,
            10,
            "another worker to take the handed-back run",
        )
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(
                f"{b.http}/v1/runs/{run}/approvals/call_1",
                json={"decision": "allow"},
                headers={"Authorization": f"Bearer {token()}"},
            )
            assert response.status_code == 200, response.text
        after = await rest_of_run(ws)
    assert_whole_run(before + after)
    assert "handed back" in leaving.output()


async def test_a_call_whose_arguments_do_not_fit_is_an_error_observation_nobody_is_asked(llm):
    llm.replies.extend(
        [
            Reply.tool_calls(
                ("call_1", "calculator", ['{"expr', '": "6 * 7"}']),  # no "expression"
                ("call_2", "calculator", ['"6 * 7"']),  # not a JSON object
                ("call_3", "calculator", ['{"expression": ', "[1, 2]}"]),  # not a string
            ),
            Reply.text("Let me try again."),
        ]
    )
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=llm.base_url, max_retries=0)
    agent = OpenAIAgent(client=client, model="m", tools=toolbox(None, "calculator"))
    assert agent.tools["calculator"].needs_approval
    asked: list[str] = []

    async def approver(call_id: str, name: str, arguments: Any, checkpoint: Any) -> Decided:
        asked.append(call_id)
        return Decided(Decision.ALLOW)

    try:
        async with asyncio.timeout(seconds(30)):
            thoughts = [t async for t in agent.run(Turn("6 * 7?", approver=approver))]
    finally:
        await client.close()
    assert asked == []
    observations = [t for t in thoughts if t.type == "observation"]
    assert [o.extra for o in observations] == [
        {"tool": "calculator", "call_id": c, "is_error": True} for c in ("c1.1", "c1.2", "c1.3")
    ]
    contents = [str(o.content) for o in observations]
    assert all(c.startswith("error: ") for c in contents), contents
    assert "expression" in contents[0] and "JSON object" in contents[1]
    assert [t.type for t in thoughts][-2:] == ["answer", "done"]
    sent = llm.requests[-1]["body"]["messages"]  # the model is told, and may call again
    assert [m["content"] for m in sent if m["role"] == "tool"] == contents
