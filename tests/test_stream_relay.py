"""How the relay reads a provider's stream: where its lines end, when it has waited too
long, when it is whole, and the shape of the chunks it passes on. The official SDK is the
client; the provider is the mock, or one scripted to the byte (tests/upstream.py)."""

from __future__ import annotations

import json

import httpx2
import openai
import pytest

from billing.models import UsageEvent
from routing.upstream import sse_lines

from .upstream import sse_event

MESSAGES = [{"role": "user", "content": "hello"}]
USAGE = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}

# Unicode line separators are legal raw inside a JSON string; an SSE line ends only at
# CR, LF or CRLF.
SEPARATORS = "one\u2028two\u2029three\x85four"


def test_unicode_line_separators_in_a_streamed_answer_reach_the_client_intact(world):
    client = world.client()
    messages = [{"role": "user", "content": SEPARATORS}]
    plain = client.chat.completions.create(
        model="m-qwen", messages=messages, extra_body={"mock": {"chunks": 2}}
    )

    with client.chat.completions.create(
        model="m-qwen", messages=messages, stream=True, extra_body={"mock": {"chunks": 2}}
    ) as stream:
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        request_id = stream.response.headers["x-request-id"]

    assert text == plain.choices[0].message.content == f"Mock reply: {SEPARATORS}"
    event = UsageEvent.objects.get(request_id=request_id)
    assert event.status == UsageEvent.Status.OK
    assert event.usage_source == UsageEvent.Source.PROVIDER
    assert event.output_tokens == 2


def _answer(content: str, *, finish_usage: bool = True) -> bytes:
    return (
        sse_event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        + sse_event({"choices": [{"index": 0, "delta": {"content": content}}]})
        + sse_event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        + (sse_event({"choices": [], "usage": USAGE}) if finish_usage else b"")
        + b"data: [DONE]\n\n"
    )


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
def test_a_stream_in_any_line_ends_and_any_segments_is_relayed_whole(world, raw_provider, line_end):
    # The provider's bytes one at a time: every line end, CRLF included, and every UTF-8
    # sequence falls across two reads somewhere.
    body = _answer(f"{SEPARATORS} é😀").replace(b"\n", line_end)
    raw_provider([body[i : i + 1] for i in range(len(body))])

    with world.client().chat.completions.create(
        model="m-raw", messages=MESSAGES, stream=True
    ) as stream:
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        request_id = stream.response.headers["x-request-id"]

    assert text == f"{SEPARATORS} é😀"
    event = UsageEvent.objects.get(request_id=request_id)
    assert (event.status, event.usage_source) == (UsageEvent.Status.OK, "provider")
    assert (event.prompt_tokens, event.output_tokens) == (10, 3)


@pytest.mark.parametrize(
    ("chunks", "lines"),
    [
        ([b"a\r", b"\n", b"b\n"], ["a", "b"]),  # CRLF across two reads: one line end
        ([b"a", b"\r\n", b"\n"], ["a", ""]),
        ([b"a\r", b"\r\n"], ["a", ""]),  # CR, then CRLF: two line ends
        ([b"a\r", b"", b"\nb"], ["a", "b"]),
        ([b"a\r"], ["a"]),  # a body ending in CR
        ([b"\xc3", b"\xa9\xe2\x80", b"\xa8\n"], ["\u00e9\u2028"]),  # UTF-8 across reads
        ([b"x\xc2\x85y\n"], ["x\x85y"]),  # U+0085 ends no SSE line
    ],
)
def test_sse_lines_end_where_the_sse_format_says_whatever_the_reads(chunks, lines):
    assert list(sse_lines(iter(chunks))) == lines


@pytest.mark.parametrize(
    "keep_alive",
    [b": keep-alive\n\n", b"event: ping\n\n", b"\n"],
    ids=["comment", "event-without-data", "blank-line"],
)
def test_a_provider_sending_only_keep_alives_times_out_at_its_timeout(
    world, raw_provider, keep_alive
):
    # Keep-alives every 0.2 s for 3 s, then the answer: each is a read, so the HTTP
    # client's read timeout alone would never fire.
    raw_provider([keep_alive, 0.2] * 15 + [_answer("late")], timeout=1)

    with (
        pytest.raises(openai.InternalServerError) as raised,
        world.client().chat.completions.create(
            model="m-raw", messages=MESSAGES, stream=True
        ) as stream,
    ):
        list(stream)

    assert raised.value.status_code == 504
    assert "within 1 s" in raised.value.message
    event = UsageEvent.objects.get()
    assert event.status == UsageEvent.Status.UPSTREAM_ERROR
    assert event.output_tokens == 0


def _two_choices(*, second_finishes: bool, second_index: object = 1) -> list[bytes]:
    second = {"index": second_index, "delta": {"content": " more"}}
    if second_finishes:
        second["finish_reason"] = "stop"
    return [
        sse_event(
            {
                "choices": [
                    {"index": 0, "delta": {"content": "A"}},
                    {"index": second_index, "delta": {"content": "B"}},
                ]
            }
        ),
        sse_event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        sse_event({"choices": [second], "usage": USAGE}),
        # The body then ends cleanly, without [DONE].
    ]


@pytest.mark.parametrize("second_index", [1, None, "1", [1]])
def test_a_stream_of_two_choices_with_one_cut_short_is_not_taken_for_whole(
    world, raw_provider, second_index
):
    raw_provider(_two_choices(second_finishes=False, second_index=second_index))

    with (
        pytest.raises(openai.APIError, match="before it finished"),
        world.client().chat.completions.create(
            model="m-raw", messages=MESSAGES, stream=True, n=2
        ) as stream,
    ):
        list(stream)

    event = UsageEvent.objects.get()
    assert event.status == UsageEvent.Status.UPSTREAM_ERROR


def test_a_stream_of_two_finished_choices_is_whole_without_done(world, raw_provider):
    raw_provider(_two_choices(second_finishes=True))

    with world.client().chat.completions.create(
        model="m-raw", messages=MESSAGES, stream=True, n=2
    ) as stream:
        chunks = list(stream)

    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: "A", 1: "B more"}
    assert UsageEvent.objects.get().status == UsageEvent.Status.OK


def test_stream_chunks_carry_finish_reason_and_logprobs_also_from_glm(world):
    # GLM's chunks have neither (nor `object`); OpenAI's carry both, null until set, and
    # strict clients validate them.
    response = httpx2.post(
        f"{world.url}/chat/completions",
        headers={"Authorization": f"Bearer {world.secret}"},
        json={"model": "m-glm", "messages": MESSAGES, "stream": True},
    )
    events = [
        json.loads(line.removeprefix("data: "))
        for line in response.text.split("\n\n")
        if line.startswith("data: {")
    ]
    choices = [choice for event in events for choice in event["choices"]]
    assert len(choices) >= 3
    assert all("finish_reason" in c and "logprobs" in c for c in choices)
    assert [c["finish_reason"] for c in choices][-1] == "stop"
    assert all(c["finish_reason"] is None for c in choices[:-1])
    assert all(e["object"] == "chat.completion.chunk" for e in events)
