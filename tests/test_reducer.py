"""The reducer (shared/reducer.py, and ``reduce`` in clients/js/thoughtwire.js).

Both run every case of clients/conformance/reducer.json and must give its expected
state. Plain data in and out for Python; the JavaScript one runs in headless chromium
on a page whose origin is answered by the test itself (no frontend needed). Random
frames of every shape, sent to both as the same JSON text, fold to the same state.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from playwright.async_api import Page

from tests.browser import client_module_page
from thoughtwire.shared.protocol import EVENT_TYPES
from thoughtwire.shared.reducer import KINDS, fold, initial_state, reduce

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT / "clients" / "conformance" / "reducer.json"
CASES: list[dict[str, Any]] = json.loads(CONFORMANCE.read_text())["cases"]
NAMES = [case["name"] for case in CASES]


def case_named(words: str) -> dict[str, Any]:
    (case,) = [c for c in CASES if words in c["name"]]
    return case


def is_clean_log(frames: list[dict[str, Any]]) -> bool:
    """One epoch, seqs 1, 2, 3, ...: a log as the server keeps it."""
    return (
        bool(frames)
        and all(type(f.get("seq")) is int for f in frames)
        and [f.get("seq") for f in frames] == list(range(1, len(frames) + 1))
        and len({f["epoch"] for f in frames}) == 1
    )


CLEAN_LOGS = [c for c in CASES if is_clean_log(c["frames"])]


def resumed(frames: list[dict[str, Any]], got: int, back_to: int) -> list[dict[str, Any]]:
    """What a client that had the first ``got`` frames, then resumed after seq
    ``back_to`` (at most ``got``), receives: the prefix, then the log again from there."""
    return frames[:got] + frames[back_to:]


def with_retry(clean: list[dict[str, Any]], cut: int) -> list[dict[str, Any]]:
    """The first attempt's first ``cut`` events, a ``retry``, then the clean run, renumbered."""
    last = clean[-1]
    retry = {"type": "retry", "content": "starting over", "attempt": 2, "run": last["run"]}
    frames = [*clean[:cut], retry, *clean]
    return [{**f, "seq": i, "epoch": last["epoch"]} for i, f in enumerate(frames, 1)]


def run_outcome(state: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What a retried run must end with as its clean run does."""
    return [
        (r["blocks"], r["status"], r["usage"], r["error"], r["finish_reason"])
        for r in (state["runs"][run] for run in state["order"])
    ]


def retry_logs(case: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Every way of cutting the clean run's first attempt short (before its end)."""
    clean = case["frames"]
    return [with_retry(clean, cut) for cut in range(1, len(clean))]


# One v2 run's logs: their block ids do not depend on seq, which a retry renumbers.
RETRIED = [
    c
    for c in CLEAN_LOGS
    if all(f["type"] not in KINDS or "block" in f for f in c["frames"])
    and len({f["run"] for f in c["frames"]}) == 1
]


# --- Python ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=NAMES)
def test_python_gives_every_conformance_case_its_expected_state(case):
    assert fold(case["frames"]) == case["expected"]


@pytest.mark.parametrize("case", CASES, ids=NAMES)
def test_reduce_never_changes_its_input(case):
    state = initial_state()
    for frame in case["frames"]:
        before, frame_before = copy.deepcopy(state), copy.deepcopy(frame)
        state_after = reduce(state, frame)
        assert state == before and frame == frame_before
        state = state_after


def test_a_frame_that_changes_nothing_gives_back_the_same_state():
    log = case_named("to its done")["frames"]
    state = fold(log)
    for frame in [*log, {"type": "session", "session": "S"}, {"type": "ping"}, "not a frame"]:
        assert reduce(state, frame) is state


def test_the_conformance_file_covers_what_the_protocol_has():
    frames = [f for c in CASES for f in c["frames"]]
    types = {f["type"] for f in frames}
    assert types >= {*EVENT_TYPES, "gap", "snapshot"}
    assert any("block" not in f and f["type"] == "answer" for f in frames), "a v1 log"
    assert len({f["run"] for f in case_named("interleaved")["frames"]}) == 2
    assert len(CLEAN_LOGS) >= 6 and RETRIED


@pytest.mark.parametrize("case", CLEAN_LOGS, ids=[c["name"] for c in CLEAN_LOGS])
def test_a_log_replayed_or_resumed_from_any_earlier_seq_folds_to_the_same_state(case):
    """Replayed twice; and every prefix followed by the log again from any seq up to the
    prefix's end, as a reconnecting client receives it. Every state on the way is the
    state of the log read once up to the same seq."""
    frames = case["frames"]
    once = [fold(frames[:n]) for n in range(len(frames) + 1)]
    assert fold(frames + frames) == once[-1] == case["expected"]
    tried = 0
    for got in range(len(frames) + 1):
        for back_to in range(got + 1):
            state = fold(frames[:got])
            for frame in frames[back_to:]:
                state = reduce(state, frame)
                assert state == once[max(got, frame["seq"])]
                tried += 1
    print(f"{case['name']}: {len(frames)} frames, {tried} resumed states compared")


@pytest.mark.parametrize("case", RETRIED, ids=[c["name"] for c in RETRIED])
def test_a_run_retried_at_any_point_ends_as_its_clean_run(case):
    clean = run_outcome(fold(case["frames"]))
    for log in retry_logs(case):
        state = fold(log)
        assert run_outcome(state) == clean
        assert state["runs"][log[-1]["run"]]["attempt"] == 2


def broken(state: dict[str, Any]) -> list[dict[str, Any]]:
    """``state`` with one part taken away or of the wrong type, each way there is."""
    found: list[dict[str, Any]] = []

    def spoil(part: Any, rebuild: Any) -> None:
        if isinstance(part, dict):
            for key, value in part.items():
                found.append(rebuild({k: v for k, v in part.items() if k != key}))
                found.append(rebuild({**part, key: [] if value is None else 1.5}))
                spoil(value, lambda new, key=key: rebuild({**part, key: new}))
        elif isinstance(part, list):
            for i, value in enumerate(part):
                found.append(rebuild([*part[:i], *part[i + 1 :]]))
                spoil(value, lambda new, i=i: rebuild([*part[:i], new, *part[i + 1 :]]))

    spoil(state, lambda new: new)
    return found


BROKEN_STATES = [s for c in CASES for s in broken(c["expected"])]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
frames_strategy = st.fixed_dictionaries(
    {
        "type": st.sampled_from([*EVENT_TYPES, "gap", "snapshot", "session", "what"]),
        "seq": st.integers(-1, 12)
        | st.none()
        | st.text(max_size=2)
        | st.booleans()
        | st.sampled_from([1.0, 2.5, 3.0, 2**53 - 1, 2**53, 1e300]),
    },
    optional={
        "epoch": st.sampled_from(["e1", "e2", None, 1, True]),
        "run": st.sampled_from(["r1", "r2", "constructor", "__proto__"]) | st.integers(),
        "block": st.sampled_from(["b1", "b2"]) | st.integers() | st.booleans() | st.none(),
        "delta": st.booleans() | st.none(),
        "content": json_values,
        "call_id": st.sampled_from(["c1", "c2", "1"])
        | st.none()
        | st.booleans()
        | st.integers(0, 1),
        "tool": json_values,
        "arguments": json_values,
        "attempt": st.integers(0, 3) | st.text(max_size=2) | st.floats(0, 3),
        "from_seq": st.integers(-1, 12) | st.sampled_from([1.0, 1.5, True]),
        "lengths": st.lists(st.integers(-2, 4) | st.sampled_from([1.0, 0.5, True]), max_size=4),
        # A state the reducer made, or one that is not a state.
        "state": st.sampled_from([c["expected"] for c in CASES])
        | st.sampled_from(BROKEN_STATES)
        | json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(frames_strategy, max_size=25))
def test_any_frames_fold_without_an_exception_and_apply_once(frames):
    """Odd frames (wrong types, unknown types, missing fields) never raise, never change
    their input, and a frame applied twice in a row is applied once."""
    state = initial_state()
    for frame in frames:
        before = copy.deepcopy([state, frame])
        after = reduce(state, frame)
        assert [state, frame] == before
        assert reduce(after, frame) == after
        state = after


# --- JavaScript, in chromium --------------------------------------------------------

# Folds each list of frames with the page's reducer. Returns, per list, the final state
# as JSON text (so a missing field cannot pass for a null), whether any reduce changed
# its input, and whether a frame that changed nothing gave back the very same state.
FOLD_IN_JS = """(logs) => logs.map((frames) => {
  let state = window.tw.initialState(), mutated = false, copied = false;
  for (const frame of frames) {
    const before = JSON.stringify([state, frame]);
    const next = window.tw.reduce(state, frame);
    if (JSON.stringify([state, frame]) !== before) mutated = true;
    if (next !== state && JSON.stringify(next) === JSON.stringify(state)) copied = true;
    state = next;
  }
  const folded = window.tw.fold(frames);
  if (JSON.stringify(folded) !== JSON.stringify(state)) throw new Error("fold is not reduce");
  return {state: JSON.stringify(state), mutated, copied};
})"""


async def fold_in_js(page: Page, logs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = await page.evaluate(FOLD_IN_JS, logs)
    for result in results:
        assert not result["mutated"], "the JavaScript reduce changed its input"
        result["state"] = json.loads(result["state"])
    return results


@pytest.mark.browser
async def test_javascript_gives_every_conformance_case_the_state_python_gives():
    async with client_module_page() as page:
        results = await fold_in_js(page, [case["frames"] for case in CASES])
    for case, result in zip(CASES, results, strict=True):
        assert result["state"] == case["expected"], case["name"]
        assert result["state"] == fold(case["frames"]), case["name"]
    print(f"{len(CASES)} cases, the same state in JavaScript and Python")


@pytest.mark.browser
async def test_javascript_folds_replayed_resumed_and_retried_logs_as_python_does():
    replays = [
        (c, resumed(c["frames"], got, back_to))
        for c in CLEAN_LOGS
        for got in range(len(c["frames"]) + 1)
        for back_to in range(got + 1)
    ]
    replays += [(c, c["frames"] * 2) for c in CLEAN_LOGS]
    retried = [(c, log) for c in RETRIED for log in retry_logs(c)]
    async with client_module_page() as page:
        replay_results = await fold_in_js(page, [log for _, log in replays])
        retry_results = await fold_in_js(page, [log for _, log in retried])
    for (case, _), result in zip(replays, replay_results, strict=True):
        assert result["state"] == case["expected"], case["name"]
    for (case, log), result in zip(retried, retry_results, strict=True):
        assert run_outcome(result["state"]) == run_outcome(case["expected"]), case["name"]
        assert result["state"] == fold(log)
    # Unchanged states are the same object in JavaScript too (replays have duplicates).
    assert not any(r["copied"] for r in replay_results)
    print(f"{len(replays)} replayed or resumed logs and {len(retried)} retried ones agree")


# --- the same random frames through both reducers ------------------------------------

TEXTS = ["", "a", "Hé", "😀", "\ud800", "\udc00x", "\ud83d", "\ude00"]
SEQS: list[Any] = [1.0, 2.5, 3.0, True, False, None, "2", -1, 2**53 - 1, 2**53, 2**60 + 1, 1e300]
WEIRD: list[Any] = [None, True, 0, 1, 1.0, 1.5, 1e20, -0.0, "", "1", [], {}, [1.0], {"x": 1.0}]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value: strings (with lone surrogates), numbers JavaScript holds, arrays, objects."""
    pick = rng.randrange(6 if depth < 2 else 4)
    if pick == 0:
        return rng.choice(TEXTS) + rng.choice(TEXTS)
    if pick == 1:
        return rng.choice(WEIRD)
    if pick == 2:
        return rng.choice([rng.randint(-(2**53) + 1, 2**53 - 1), rng.uniform(-1e20, 1e20)])
    if pick == 3:
        return rng.choice(["c1", "c2", "b1", "r1"])
    if pick == 4:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    keys = ["x", "y", "\ud800", "__proto__", "1"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(3))}


def random_frame(rng: random.Random, seq: int) -> dict[str, Any]:
    """A frame that is mostly a plausible event at ``seq``, with odd fields now and then."""
    frame: dict[str, Any] = {
        "type": rng.choice([*EVENT_TYPES, *KINDS, "block_end", "gap", "snapshot", "what"]),
        "seq": seq if rng.random() < 0.8 else rng.choice(SEQS),
        "epoch": rng.choice(["e1"] * 8 + ["e2", None, 1, True]),
        "run": rng.choice(["r1", "r1", "r2", "__proto__", "constructor", 1]),
    }
    odd = {
        "block": ["b1", "b2", "b3", 1, True, None],
        "delta": [True, True, False, None, 1],
        "call_id": ["c1", "c2", "1", 1, True, None],
        "attempt": [1, 2, 2.0, 2.5, "2", True],
        "from_seq": [seq - 1, seq - 2, 1.0, 0.5, True],
        "decision": ["allow", "deny", 1],
    }
    for name, values in odd.items():
        if rng.random() < 0.5:
            frame[name] = rng.choice(values)
    for name in ("content", "tool", "arguments", "usage", "is_error", "reason", "by", "code"):
        if rng.random() < (0.9 if name == "content" else 0.2):
            frame[name] = random_value(rng)
    if "from_seq" in frame and rng.random() < 0.7:
        frame["lengths"] = [rng.choice([0, 1, 2, 1.0, -1]) for _ in range(rng.randrange(4))]
    if frame["type"] == "snapshot":
        frame["state"] = rng.choice(
            [*(c["expected"] for c in CASES), *BROKEN_STATES[::7], random_value(rng)]
        )
    return frame


def random_logs(seed: int, count: int) -> list[list[dict[str, Any]]]:
    rng = random.Random(seed)
    logs = []
    for _ in range(count):
        seq, frames = 0, []
        for _ in range(rng.randrange(1, 30)):
            seq += rng.choice([1, 1, 1, 0, 2, -3])
            frames.append(random_frame(rng, seq))
        logs.append(frames)
    return logs


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by value (1.0 is 1, true is not), strings as UTF-16."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)  # JavaScript writes 1e20 as 100000000000000000000
    if isinstance(a, str) and isinstance(b, str):
        return utf16(a) == utf16(b)
    if isinstance(a, dict) and isinstance(b, dict):
        keys = {utf16(k): k for k in b}
        return len(a) == len(b) and all(
            utf16(k) in keys and same(v, b[keys[utf16(k)]]) for k, v in a.items()
        )
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a is None and b is None


def utf16(text: str) -> bytes:
    # JavaScript strings are UTF-16 code units: two lone halves joined are one pair.
    return text.encode("utf-16-le", "surrogatepass")


# Folds each log of a JSON text, as a client parses frames, and gives the states as
# JSON text, or the exception a fold raised.
FOLD_TEXT_IN_JS = """(text) => JSON.stringify(JSON.parse(text).map((frames) => {
  try { return window.tw.fold(frames); } catch (e) { return "raised " + e; }
}))"""


@pytest.mark.browser
async def test_the_same_random_frames_fold_to_the_same_state_in_javascript_and_python():
    """Frames of every shape, sent as JSON text to both; neither raises, states equal."""
    text = json.dumps(random_logs(seed=20261201, count=3000))
    logs = json.loads(text)
    async with client_module_page() as page:
        in_js = json.loads(await page.evaluate(FOLD_TEXT_IN_JS, text))
    differ = [
        (frames, fold(frames), state)
        for frames, state in zip(logs, in_js, strict=True)
        if not same(fold(frames), state)
    ]
    assert not differ, differ[0]
    frames = sum(len(log) for log in logs)
    print(f"{len(logs)} random logs, {frames} frames: the same state in JavaScript and Python")
