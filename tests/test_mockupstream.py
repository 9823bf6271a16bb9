"""The mock upstream (`manage.py mockupstream`), driven over real HTTP.

Mostly through the official `openai` SDK, as the gateway will use it; raw `httpx2` where
the exact wire shape (usage placement, missing fields, comments, [DONE]) is the point.
No database: the mock runs in its own process.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai import OpenAI

from routing.mockupstream import compute_usage, reply_pieces
from tests.upstream import MockUpstream, mock_upstream_start

AUTH = {"Authorization": "Bearer test-key"}
USER = [{"role": "user", "content": "hi"}]
STYLES = ["openai", "deepseek", "qwen", "kimi", "glm"]


@pytest.fixture(scope="module")
def mock() -> Iterator[MockUpstream]:
    upstream = mock_upstream_start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def keyed_mock() -> Iterator[MockUpstream]:
    """A second server with a required key and non-default CLI defaults."""
    upstream = mock_upstream_start("--api-key", "sekret", "--chunks", "3", "--style", "glm")
    yield upstream
    upstream.stop()


def client(mock: MockUpstream, style: str = "openai", api_key: str = "test-key") -> OpenAI:
    return OpenAI(base_url=mock.url(style), api_key=api_key, max_retries=0, timeout=20)


def post(mock: MockUpstream, style: str, body: Any, **kwargs: Any) -> httpx2.Response:
    kwargs.setdefault("headers", AUTH)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx2.post(f"{mock.url(style)}/chat/completions", content=content, **kwargs)


def sse(mock: MockUpstream, style: str, body: dict[str, Any]) -> list[Any]:
    """A stream's events: parsed JSON, the string "[DONE]", or ":" for a comment."""
    response = post(mock, style, {**body, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.text.endswith("\n\n")
    events: list[Any] = []
    for block in response.text.split("\n\n")[:-1]:
        if block.startswith(":"):
            events.append(":")
        else:
            assert block.startswith("data: ")
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stats(mock: MockUpstream) -> dict[str, int]:
    return httpx2.get(f"{mock.base}/_mock/stats").json()


def wait_for_stats(mock: MockUpstream, **expected: int) -> dict[str, int]:
    """Poll the counters until they reach `expected` (the server counts asynchronously)."""
    deadline = time.monotonic() + 5
    while True:
        current = stats(mock)
        if all(current[key] == value for key, value in expected.items()):
            return current
        if time.monotonic() > deadline:
            pytest.fail(f"stats {current} never reached {expected}")
        time.sleep(0.02)


# --- Deterministic content and usage, as functions ---------------------------------------


def test_reply_pieces_group_words_into_exactly_chunks() -> None:
    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "Say  hello\nto the world"},
    ]
    assert reply_pieces(messages, 4) == ["Mock reply:", " Say hello", " to the", " world"]
    assert reply_pieces(messages, 1) == ["Mock reply: Say hello to the world"]


def test_reply_pieces_pad_short_text_and_read_list_content() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert reply_pieces(messages, 5) == ["Mock", " reply:", " hi", " alpha", " bravo"]
    assert reply_pieces(messages, 5) == reply_pieces(messages, 5)


def test_compute_usage_formula_and_overrides() -> None:
    messages = [
        {"role": "system", "content": "You are terse."},  # 3 words + 3
        {"role": "user", "content": [{"type": "text", "text": "Say hello"}]},  # 2 + 3
        {"role": "assistant", "content": None},  # 0 + 3
    ]
    usage = compute_usage(messages, content_chunks=4, reasoning_chunks=2)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (14, 6, 20)
    assert (usage.cached_tokens, usage.reasoning_tokens) == (0, 2)
    overridden = compute_usage(messages, 4, 0, {"prompt_tokens": 100, "cached_tokens": 40})
    assert (overridden.prompt_tokens, overridden.cached_tokens, overridden.total_tokens) == (
        100,
        40,
        104,
    )


# --- Plain responses in each style -------------------------------------------------------


EXPECTED_PLAIN_USAGE: dict[str, dict[str, Any]] = {
    "openai": {
        "prompt_tokens": 4,
        "completion_tokens": 5,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    },
    "qwen": {
        "prompt_tokens": 4,
        "completion_tokens": 5,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 0},
    },
    "deepseek": {
        "prompt_tokens": 4,
        "completion_tokens": 5,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
        "prompt_cache_hit_tokens": 0,
        "prompt_cache_miss_tokens": 4,
    },
    "kimi": {
        "prompt_tokens": 4,
        "completion_tokens": 5,
        "total_tokens": 9,
        "cached_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 0},
    },
    "glm": {
        "prompt_tokens": 4,
        "completion_tokens": 5,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 0},
    },
}


@pytest.mark.parametrize("style", STYLES)
def test_plain_completion_shape_per_style(mock: MockUpstream, style: str) -> None:
    response = post(mock, style, {"model": "some/model", "messages": USER})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"].startswith("req-mock-")
    body = response.json()
    assert body["id"].startswith("chatcmpl-mock-")
    assert body["model"] == "some/model"
    assert abs(body["created"] - time.time()) < 60
    assert body["usage"] == EXPECTED_PLAIN_USAGE[style]
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Mock reply: hi alpha bravo"
    if style == "glm":
        assert "object" not in body
        assert "logprobs" not in choice
        assert "refusal" not in choice["message"]
    else:
        assert body["object"] == "chat.completion"
        assert choice["logprobs"] is None
        assert choice["message"]["refusal"] is None


@pytest.mark.parametrize("style", STYLES)
def test_plain_completion_through_the_sdk(mock: MockUpstream, style: str) -> None:
    completion = client(mock, style).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "one two three four five six"}]
    )
    assert completion.choices[0].message.content == "Mock reply: one two three four five six"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 9
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == 14
    assert completion._request_id is not None


def test_unprefixed_routes_use_the_style_option(keyed_mock: MockUpstream) -> None:
    headers = {"Authorization": "Bearer sekret"}
    body = json.dumps({"model": "m", "messages": USER})
    response = httpx2.post(f"{keyed_mock.base}/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 200
    assert "object" not in response.json()  # --style glm
    # --chunks 3 is the default piece count.
    assert response.json()["choices"][0]["message"]["content"] == "Mock reply: hi"
    assert response.json()["usage"]["completion_tokens"] == 3


# --- Streams in each style ---------------------------------------------------------------


def check_common_stream(events: list[Any], chunks: int, object_field: bool = True) -> None:
    assert events[-1] == "[DONE]"
    data = [e for e in events if isinstance(e, dict)]
    assert len({(c["id"], c["created"], c["model"]) for c in data}) == 1
    for chunk in data:
        if object_field:
            assert chunk["object"] == "chat.completion.chunk"
        else:
            assert "object" not in chunk
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"]["content"] for c in data[1 : 1 + chunks]]
    assert all(contents)
    assert "".join(contents) == "Mock reply: hi alpha bravo"
    finishing = data[1 + chunks]
    assert finishing["choices"][0]["delta"] == {}
    assert finishing["choices"][0]["finish_reason"] == "stop"


STREAM_USAGE = {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}


@pytest.mark.parametrize("style", ["openai", "qwen"])
def test_openai_like_stream_without_include_usage_has_no_usage(
    mock: MockUpstream, style: str
) -> None:
    events = sse(mock, style, {"model": "m", "messages": USER})
    check_common_stream(events, chunks=5)
    assert len(events) == 1 + 5 + 1 + 1  # role, content, finishing, [DONE]
    assert not any("usage" in e for e in events if isinstance(e, dict))


@pytest.mark.parametrize("style", ["openai", "qwen"])
def test_openai_like_stream_with_include_usage_adds_a_final_usage_chunk(
    mock: MockUpstream, style: str
) -> None:
    body = {"model": "m", "messages": USER, "stream_options": {"include_usage": True}}
    events = sse(mock, style, body)
    check_common_stream(events, chunks=5)
    assert len(events) == 1 + 5 + 1 + 1 + 1
    *others, usage_chunk, done = events
    assert done == "[DONE]"
    assert all(e["usage"] is None for e in others)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == EXPECTED_PLAIN_USAGE[style]


def test_deepseek_stream_puts_usage_on_the_finishing_chunk_always(mock: MockUpstream) -> None:
    events = sse(mock, "deepseek", {"model": "m", "messages": USER})
    check_common_stream(events, chunks=5)
    assert len(events) == 1 + 5 + 1 + 1
    finishing = events[-2]
    assert finishing["usage"] == EXPECTED_PLAIN_USAGE["deepseek"]
    assert not any("usage" in e for e in events[:-2])


def test_kimi_stream_puts_usage_inside_the_finishing_choice(mock: MockUpstream) -> None:
    events = sse(mock, "kimi", {"model": "m", "messages": USER})
    check_common_stream(events, chunks=5)
    finishing = events[-2]
    assert "usage" not in finishing
    assert finishing["choices"][0]["usage"] == {
        **STREAM_USAGE,
        "cached_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert not any("usage" in e or "usage" in e["choices"][0] for e in events[:-2])


def test_glm_stream_lacks_object_and_puts_usage_on_the_finishing_chunk(
    mock: MockUpstream,
) -> None:
    events = sse(mock, "glm", {"model": "m", "messages": USER})
    check_common_stream(events, chunks=5, object_field=False)
    assert len(events) == 1 + 5 + 1 + 1
    assert events[-2]["usage"] == EXPECTED_PLAIN_USAGE["glm"]


@pytest.mark.parametrize("style", STYLES)
def test_stream_through_the_sdk_yields_the_usage_somewhere(mock: MockUpstream, style: str) -> None:
    stream = client(mock, style).chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    content = ""
    usages: list[Any] = []
    for chunk in stream:
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            # Kimi: the usage rides inside the choice (an extra field for the SDK).
            if (inner := getattr(chunk.choices[0], "usage", None)) is not None:
                usages.append(inner)
        if chunk.usage is not None:
            usages.append(chunk.usage.model_dump(exclude_none=True))
    assert content == "Mock reply: hi alpha bravo"
    assert len(usages) == 1
    assert {key: usages[0][key] for key in STREAM_USAGE} == STREAM_USAGE


def test_same_request_same_answer(mock: MockUpstream) -> None:
    body = {"model": "m", "messages": USER, "mock": {"chunks": 7, "reasoning": 2}}
    first, second = post(mock, "deepseek", body).json(), post(mock, "deepseek", body).json()
    assert first["id"] != second["id"]
    assert first["choices"] == second["choices"]
    assert first["usage"] == second["usage"]


# --- Knobs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exception", "error_type"),
    [
        (400, openai.BadRequestError, "invalid_request_error"),
        (401, openai.AuthenticationError, "authentication_error"),
        (404, openai.NotFoundError, "not_found_error"),
        (429, openai.RateLimitError, "rate_limit_error"),
        (500, openai.InternalServerError, "server_error"),
        (503, openai.InternalServerError, "server_error"),
    ],
)
def test_status_knob_raises_the_matching_sdk_error(
    mock: MockUpstream, status: int, exception: type[openai.APIStatusError], error_type: str
) -> None:
    with pytest.raises(exception) as caught:
        client(mock).chat.completions.create(
            model="m", messages=USER, extra_body={"mock": {"status": status}}
        )
    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict)
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    assert caught.value.body["type"] == error_type


def test_status_knob_applies_to_streams_before_they_start(mock: MockUpstream) -> None:
    with pytest.raises(openai.RateLimitError):
        client(mock).chat.completions.create(
            model="m", messages=USER, stream=True, extra_body={"mock": {"status": 429}}
        )


def test_retry_after_header(mock: MockUpstream) -> None:
    body = {"model": "m", "messages": USER, "mock": {"status": 429, "retry_after": 7}}
    response = post(mock, "openai", body)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert "retry-after" not in post(mock, "openai", {**body, "mock": {"status": 429}}).headers


def test_deepseek_402_says_insufficient_balance(mock: MockUpstream) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client(mock, "deepseek").chat.completions.create(
            model="m", messages=USER, extra_body={"mock": {"status": 402}}
        )
    assert caught.value.status_code == 402
    assert caught.value.body["message"] == "Insufficient Balance"


def test_glm_429_is_code_1113(mock: MockUpstream) -> None:
    response = post(mock, "glm", {"model": "m", "messages": USER, "mock": {"status": 429}})
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "1113"
    assert "balance" in error["message"]
    # The same status in another style is an ordinary rate limit.
    other = post(mock, "openai", {"model": "m", "messages": USER, "mock": {"status": 429}})
    assert other.json()["error"]["code"] == "rate_limit_exceeded"


def test_cut_after_in_a_stream_breaks_the_sdk_and_is_counted(mock: MockUpstream) -> None:
    before = stats(mock)
    stream = client(mock, "deepseek").chat.completions.create(
        model="m", messages=USER, stream=True, extra_body={"mock": {"cut_after": 2}}
    )
    contents: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                contents.append(chunk.choices[0].delta.content)
    assert "".join(contents) == "Mock reply:"  # "Mock", " reply:": exactly two chunks
    wait_for_stats(
        mock,
        streams_cut=before["streams_cut"] + 1,
        streams_started=before["streams_started"] + 1,
        streams_open=0,
    )


@pytest.mark.parametrize("knob", ["cut_after", "error_after"])
def test_a_cut_or_error_beyond_the_content_comes_before_the_finishing_chunk(
    mock: MockUpstream, knob: str
) -> None:
    stream = client(mock, "openai").chat.completions.create(
        model="m", messages=USER, stream=True, extra_body={"mock": {"chunks": 3, knob: 99}}
    )
    received = []
    with pytest.raises(openai.APIError):
        received.extend(stream)
    assert len([c for c in received if c.choices and c.choices[0].delta.content]) == 3
    assert not any(c.choices and c.choices[0].finish_reason for c in received)


def test_cut_after_on_a_plain_request_sends_nothing(mock: MockUpstream) -> None:
    before = stats(mock)
    with pytest.raises(openai.APIConnectionError):
        client(mock).chat.completions.create(
            model="m", messages=USER, extra_body={"mock": {"cut_after": 0}}
        )
    assert stats(mock)["plain_cut"] == before["plain_cut"] + 1


def test_error_after_sends_an_error_event_and_no_done(mock: MockUpstream) -> None:
    before = stats(mock)
    events_text = post(
        mock,
        "openai",
        {"model": "m", "messages": USER, "stream": True, "mock": {"error_after": 3}},
    ).text
    assert "[DONE]" not in events_text
    last = json.loads(events_text.strip().split("\n\n")[-1].removeprefix("data: "))
    assert set(last["error"]) == {"message", "type", "param", "code"}

    stream = client(mock).chat.completions.create(
        model="m", messages=USER, stream=True, extra_body={"mock": {"error_after": 3}}
    )
    received = 0
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
    assert received == 3
    assert "failed after 3 chunks" in caught.value.message
    wait_for_stats(mock, streams_errored=before["streams_errored"] + 2)


def test_end_after_ends_the_body_cleanly_without_finish_usage_or_done(
    mock: MockUpstream,
) -> None:
    before = stats(mock)
    body = {
        "model": "m",
        "messages": USER,
        "stream": True,
        "stream_options": {"include_usage": True},
        "mock": {"end_after": 2, "chunks": 5},
    }
    response = post(mock, "openai", body)
    assert response.status_code == 200
    events = [e.removeprefix("data: ") for e in response.text.strip().split("\n\n")]
    assert "[DONE]" not in events
    chunks = [json.loads(e) for e in events]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert [c for c in contents if c] == contents[1:] and len(contents) == 3  # role + 2
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert all(c.get("usage") is None for c in chunks)
    wait_for_stats(mock, streams_ended=before["streams_ended"] + 1)


def test_client_disconnect_mid_stream_is_counted_as_aborted(mock: MockUpstream) -> None:
    before = stats(mock)
    body = {
        "model": "m",
        "messages": USER,
        "stream": True,
        "mock": {"chunks": 50, "interval_ms": 100},
    }
    with (
        httpx2.Client(timeout=10) as http,
        http.stream("POST", f"{mock.url()}/chat/completions", json=body, headers=AUTH) as response,
    ):
        # Keep the iterator referenced: a dropped generator would close the connection early.
        lines = response.iter_lines()
        assert '"content":""' in next(line for line in lines if line.startswith("data: "))
        assert '"content":"Mock"' in next(line for line in lines if line.startswith("data: "))
        wait_for_stats(mock, streams_open=1, streams_aborted=before["streams_aborted"])
    wait_for_stats(
        mock,
        streams_aborted=before["streams_aborted"] + 1,
        streams_completed=before["streams_completed"],
        streams_open=0,
    )


def test_usage_knob_overrides_numbers_in_every_style_field(mock: MockUpstream) -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 20, "cached_tokens": 40}
    body = {"model": "m", "messages": USER, "mock": {"usage": usage, "reasoning": 3}}
    deepseek = post(mock, "deepseek", body).json()["usage"]
    assert deepseek == {
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "prompt_tokens_details": {"cached_tokens": 40},
        "completion_tokens_details": {"reasoning_tokens": 3},
        "prompt_cache_hit_tokens": 40,
        "prompt_cache_miss_tokens": 60,
    }
    kimi = post(mock, "kimi", body).json()["usage"]
    assert kimi["cached_tokens"] == kimi["prompt_tokens_details"]["cached_tokens"] == 40


def test_reasoning_knob_in_plain_and_stream(mock: MockUpstream) -> None:
    body = {"model": "m", "messages": USER, "mock": {"reasoning": 2}}
    plain = post(mock, "deepseek", body).json()
    message = plain["choices"][0]["message"]
    assert message["reasoning_content"] == "Thinking step 1. Thinking step 2. "
    assert plain["usage"]["completion_tokens"] == 5 + 2
    assert plain["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}

    events = sse(mock, "deepseek", body)
    deltas = [e["choices"][0]["delta"] for e in events if isinstance(e, dict)]
    assert [d.get("reasoning_content") for d in deltas[1:3]] == [
        "Thinking step 1. ",
        "Thinking step 2. ",
    ]
    assert "".join(d.get("content", "") for d in deltas[3:]) == message["content"]
    assert events[-2]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}


def test_qwen_enable_thinking_streams_reasoning(mock: MockUpstream) -> None:
    stream = client(mock, "qwen").chat.completions.create(
        model="qwen-plus",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"enable_thinking": True},
    )
    reasoning = ""
    usage = None
    for chunk in stream:
        if chunk.choices:
            reasoning += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert reasoning.startswith("Thinking step 1. ")
    assert usage is not None
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == reasoning.count("Thinking")


def test_echo_request_returns_the_body_without_mock(mock: MockUpstream) -> None:
    completion = client(mock, "qwen").chat.completions.create(
        model="m",
        messages=USER,
        extra_body={"enable_thinking": False, "mock": {"echo_request": True}},
    )
    echoed = completion.model_extra["mock_request"]
    assert echoed["enable_thinking"] is False
    assert echoed["messages"] == USER
    assert "mock" not in echoed

    events = sse(
        mock,
        "openai",
        {"model": "m", "messages": USER, "x_custom": 1, "mock": {"echo_request": True}},
    )
    with_echo = [e for e in events if isinstance(e, dict) and "mock_request" in e]
    assert with_echo == [events[0]]
    assert events[0]["mock_request"] == {
        "model": "m",
        "messages": USER,
        "x_custom": 1,
        "stream": True,
    }


def test_mock_is_never_echoed_without_echo_request(mock: MockUpstream) -> None:
    response = post(mock, "openai", {"model": "m", "messages": USER, "mock": {"chunks": 2}})
    assert '"mock"' not in response.text
    assert '"chunks"' not in response.text
    assert "mock_request" not in response.json()


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_below_chunks_finishes_with_length(mock: MockUpstream, field: str) -> None:
    sdk = client(mock)
    completion = sdk.chat.completions.create(model="m", messages=USER, **{field: 2})
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "Mock reply:"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 2

    events = sse(mock, "deepseek", {"model": "m", "messages": USER, field: 3})
    assert len(events) == 1 + 3 + 1 + 1
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 3


def test_max_tokens_above_chunks_changes_nothing(mock: MockUpstream) -> None:
    completion = client(mock).chat.completions.create(model="m", messages=USER, max_tokens=500)
    assert completion.choices[0].finish_reason == "stop"


def test_keepalive_comment_comes_before_the_first_chunk(mock: MockUpstream) -> None:
    events = sse(mock, "glm", {"model": "m", "messages": USER, "mock": {"keepalive": True}})
    assert events[0] == ":"
    assert events.count(":") == 1
    # The SDK skips the comment.
    stream = client(mock, "glm").chat.completions.create(
        model="m", messages=USER, stream=True, extra_body={"mock": {"keepalive": True}}
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
        "Mock reply: hi alpha bravo"
    )


def test_latency_knob_delays_plain_answers_and_errors(mock: MockUpstream) -> None:
    started = time.monotonic()
    client(mock).chat.completions.create(
        model="m", messages=USER, extra_body={"mock": {"latency_ms": 300}}
    )
    assert time.monotonic() - started >= 0.3

    started = time.monotonic()
    with pytest.raises(openai.InternalServerError):
        client(mock).chat.completions.create(
            model="m", messages=USER, extra_body={"mock": {"latency_ms": 300, "status": 500}}
        )
    assert time.monotonic() - started >= 0.3


def test_latency_and_interval_knobs_pace_a_stream(mock: MockUpstream) -> None:
    started = time.monotonic()
    stream = client(mock).chat.completions.create(
        model="m",
        messages=USER,
        stream=True,
        extra_body={"mock": {"latency_ms": 300, "interval_ms": 100, "chunks": 3}},
    )
    arrivals = [time.monotonic() - started for _ in stream]
    assert len(arrivals) == 1 + 3 + 1
    assert arrivals[0] >= 0.3
    assert arrivals[-1] >= 0.3 + 3 * 0.1


def test_chunks_knob(mock: MockUpstream) -> None:
    events = sse(mock, "openai", {"model": "m", "messages": USER, "mock": {"chunks": 12}})
    contents = [e["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert len(contents) == 12
    assert all(contents)


def test_style_knob_wins_over_the_prefix(mock: MockUpstream) -> None:
    body = {"model": "m", "messages": USER, "mock": {"style": "glm"}}
    assert "object" not in post(mock, "deepseek", body).json()


# --- Models, auth, bad input, stats -----------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_models_list(mock: MockUpstream, style: str) -> None:
    models = list(client(mock, style).models.list())
    assert len(models) == 2
    assert all(m.object == "model" and m.owned_by == style for m in models)
    raw = httpx2.get(f"{mock.url(style)}/models", headers=AUTH).json()
    assert raw["object"] == "list"
    assert set(raw["data"][0]) == {"id", "object", "created", "owned_by"}


def test_missing_key_is_401(mock: MockUpstream) -> None:
    for response in (
        post(mock, "openai", {"model": "m", "messages": USER}, headers={}),
        post(
            mock,
            "openai",
            {"model": "m", "messages": USER},
            headers={"Authorization": "Basic dXNlcjpwYXNz"},
        ),
        httpx2.get(f"{mock.url()}/models"),
    ):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


def test_api_key_option_requires_that_key(keyed_mock: MockUpstream) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(keyed_mock, "openai", api_key="wrong").chat.completions.create(
            model="m", messages=USER
        )
    completion = client(keyed_mock, "openai", api_key="sekret").chat.completions.create(
        model="m", messages=USER
    )
    assert completion.choices[0].message.content == "Mock reply: hi"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"not json", None),
        (b"[1, 2]", None),
        ({"messages": USER}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": USER, "mock": {"nope": 1}}, "mock"),
        ({"model": "m", "messages": USER, "mock": []}, "mock"),
        ({"model": "m", "messages": USER, "mock": {"chunks": 0}}, "mock.chunks"),
        ({"model": "m", "messages": USER, "mock": {"chunks": True}}, "mock.chunks"),
        ({"model": "m", "messages": USER, "mock": {"status": 200}}, "mock.status"),
        ({"model": "m", "messages": USER, "mock": {"style": "x"}}, "mock.style"),
        ({"model": "m", "messages": USER, "mock": {"usage": {"x": 1}}}, "mock.usage"),
        ({"model": "m", "messages": USER, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_input_is_a_400_in_openai_shape(mock: MockUpstream, body: Any, param: str) -> None:
    response = post(mock, "openai", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_stats_count_and_reset(mock: MockUpstream) -> None:
    reset = httpx2.post(f"{mock.base}/_mock/stats/reset").json()
    assert reset == {
        "requests": 0,
        "streams_started": 0,
        "streams_completed": 0,
        "streams_aborted": 0,
        "streams_cut": 0,
        "streams_errored": 0,
        "streams_ended": 0,
        "streams_open": 0,
        "plain_cut": 0,
    }
    post(mock, "openai", {"model": "m", "messages": USER})
    sse(mock, "kimi", {"model": "m", "messages": USER})
    httpx2.get(f"{mock.url()}/models", headers=AUTH)
    wait_for_stats(mock, requests=3, streams_started=1, streams_completed=1, streams_open=0)


def test_the_command_says_in_one_line_why_it_cannot_start() -> None:
    from django.core.management import call_command
    from django.core.management.base import CommandError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CommandError, match=f"cannot listen on 127.0.0.1:{port}"):
            call_command("mockupstream", "--port", str(port))
    for options, message in [
        (["--port", "99999"], "--port must be from 0 to 65535"),
        (["--interval-ms", "nan"], "must be numbers >= 0"),
    ]:
        with pytest.raises(CommandError, match=message):
            call_command("mockupstream", *options)
