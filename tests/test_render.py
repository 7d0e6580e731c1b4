import orjson

from thoughtwire.api.render import agent_text, chat_text, echo_text
from thoughtwire.shared.protocol import error_reply


def event(type_, content=""):
    return orjson.dumps({"type": type_, "content": content, "seq": 1}).decode()


def test_chat_shows_answer_tokens_and_the_done_marker():
    frames = [event("thinking", "hm"), event("answer", "Hel"), event("answer", "lo"), event("done")]
    assert [chat_text(f) for f in frames] == [None, "Hel", "lo", "\n[DONE]"]


def test_agent_and_echo_markers():
    assert agent_text(event("done")) == "[DONE]"
    assert echo_text(event("done")) is None
    assert echo_text(event("answer", "HI")) == "HI"


def test_errors_are_prefixed():
    assert (
        chat_text(event("error", "the model provider failed"))
        == "[ERROR] the model provider failed"
    )
    assert agent_text(error_reply("empty_prompt", "prompt is empty")) == "[ERROR] prompt is empty"


def test_greetings_are_hidden():
    assert chat_text('{"type":"session","session":"s"}') is None
