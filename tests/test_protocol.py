import orjson
import pytest

from thoughtwire.shared.protocol import (
    Broadcast,
    Job,
    Personal,
    Pong,
    Prompt,
    ProtocolError,
    Thought,
    decode_event,
    encode_event_head,
    error_reply,
    parse_client_message,
    valid_id,
)


def parse(frame: str):
    return parse_client_message(frame, max_prompt_chars=100)


def test_plain_text_is_a_prompt():
    assert parse("What is machine learning?") == Prompt("What is machine learning?")


def test_json_messages():
    assert parse('{"type":"prompt","content":"hi"}') == Prompt("hi")
    assert parse('{"type":"personal","to":"bob","content":"yo"}') == Personal("bob", "yo")
    assert parse('{"type":"broadcast","content":"all"}') == Broadcast("all")
    assert parse('{"type":"pong"}') == Pong()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ('{"type":"launch"}', "unknown_type"),
        ('{"content":"x"}', "bad_message"),
        ('{"type":"prompt","content":5}', "bad_message"),
        ("   ", "empty_prompt"),
        ('{"type":"prompt","content":""}', "empty_prompt"),
        ("x" * 101, "too_long"),
        ('{"type":"personal","to":"a:b","content":"x"}', "bad_message"),
        # Characters str.isdigit() takes that int() does not: a ValueError, not a refusal.
        ('{"type":"resume","session":"s","after":"\u00b2"}', "bad_message"),
        ('{"type":"resume","session":"s","after":"\u2460"}', "bad_message"),
        # Half an emoji (JSON may escape it, no text may hold it), in a prompt or a key.
        ('{"type":"prompt","content":"hi \\ud83d"}', "bad_message"),
        ('{"type":"prompt","content":"hi","key":"\\udc00"}', "bad_message"),
        (
            '{"type":"approve","run":"r","call_id":"c","decision":"deny","reason":"\\ud800"}',
            "bad_message",
        ),
        ("{" + "[" * 5000, "bad_json"),
        ('{"type":"resume","session":"s","after":1e999}', "bad_json"),
    ],
)
def test_bad_frames_raise_a_code_and_a_safe_message(frame, code):
    with pytest.raises(ProtocolError) as info:
        parse(frame)
    assert info.value.code == code
    assert info.value.message


def test_a_whole_emoji_escaped_as_a_surrogate_pair_is_text():
    assert parse('{"type":"prompt","content":"hi \\ud83d\\ude00"}') == Prompt("hi \U0001f600")


def test_event_head_completed_by_the_log_decodes():
    head = encode_event_head(Thought("answer", 'tok "quoted"'), "s1", "r1", 1700000000000)
    payload = head + b'7,"epoch":"e1"}'
    event = decode_event(payload)
    assert (event.type, event.content, event.session, event.run) == (
        "answer",
        'tok "quoted"',
        "s1",
        "r1",
    )
    assert (event.seq, event.epoch, event.ts) == (7, "e1", 1700000000000)
    assert not event.terminal
    assert list(orjson.loads(payload)) == [
        "type",
        "content",
        "session",
        "run",
        "ts",
        "seq",
        "epoch",
    ]


def test_job_round_trip():
    job = Job(run="r", session="s", prompt="p", agent="echo")
    assert Job.decode(job.encode()) == job


def test_ids():
    assert valid_id("abc-DEF_1.2")
    for bad in ("", "a" * 65, "a{b}", "a:b", "a b", "é"):
        assert not valid_id(bad)


def test_error_reply():
    assert orjson.loads(error_reply("bad_json", "nope")) == {
        "type": "error",
        "code": "bad_json",
        "message": "nope",
    }
