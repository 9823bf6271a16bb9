"""Chat completions through the gateway with the official SDK, sync and async, on real
sockets: the answers, their shapes, and the one ledger row each call leaves."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx2
import openai
import pytest

from billing.models import UsageEvent

MESSAGES = [{"role": "user", "content": "hello there world"}]


def event_for(request_id: str) -> UsageEvent:
    return UsageEvent.objects.get(request_id=request_id)


def test_plain_chat_returns_the_upstream_answer_under_the_public_model_id(world):
    client = world.client()

    completion = client.chat.completions.create(model="m-openai", messages=MESSAGES)

    assert completion.object == "chat.completion"
    assert completion.model == "m-openai"
    assert completion.choices[0].message.content == "Mock reply: hello there world"
    assert completion.choices[0].finish_reason == "stop"
    # Mock usage: 3 words + 3 per message; one token per chunk (5 chunks by default).
    assert completion.usage.prompt_tokens == 6
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == 11
    assert completion._request_id.startswith("req_")


def test_plain_chat_is_metered_once_with_exact_cost(world):
    completion = world.client().chat.completions.create(model="m-openai", messages=MESSAGES)

    event = event_for(completion._request_id)
    assert UsageEvent.objects.count() == 1
    assert event.tenant == world.tenant
    assert event.requested_model == "m-openai"
    assert event.served_model == world.models["openai"]
    assert event.status == UsageEvent.Status.OK
    assert event.usage_source == UsageEvent.Source.PROVIDER
    assert not event.streamed
    assert (event.input_uncached_tokens, event.input_cached_tokens) == (6, 0)
    assert (event.output_tokens, event.reasoning_tokens) == (5, 0)
    # 6 x 0.27 + 5 x 1.10 per 1M
    assert event.cost == Decimal("0.000007120000")
    assert isinstance(event.cost, Decimal)
    assert event.price == world.models["openai"].prices.get()


def test_streamed_chat_relays_every_chunk_with_one_id_and_model(world):
    client = world.client()

    with client.chat.completions.create(
        model="m-openai", messages=MESSAGES, stream=True, extra_body={"mock": {"chunks": 4}}
    ) as stream:
        chunks = list(stream)
        request_id = stream.response.headers["x-request-id"]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Mock reply: hello there world"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.model for c in chunks} == {"m-openai"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    # Not asked for: no usage chunk reaches the client, yet the ledger has the usage.
    assert all(c.usage is None for c in chunks)
    event = event_for(request_id)
    assert event.streamed
    assert (event.input_uncached_tokens, event.output_tokens) == (6, 4)
    assert event.ttft_ms is not None and event.ttft_ms <= event.latency_ms


def test_stream_with_include_usage_ends_with_exactly_one_usage_chunk(world):
    with world.client().chat.completions.create(
        model="m-deepseek",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)

    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1
    assert with_usage[0] is chunks[-1]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 6
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.total_tokens == 11


def test_stream_wire_format_is_sse_ending_with_done(world):
    with (
        httpx2.Client() as http,
        http.stream(
            "POST",
            f"{world.url}/chat/completions",
            headers={"Authorization": f"Bearer {world.secret}", "Accept": "text/event-stream"},
            json={"model": "m-glm", "messages": MESSAGES, "stream": True},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"].startswith("req_")
        body = response.read().decode()

    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    # GLM omits "object"; the gateway fills it in.
    assert all('"object":"chat.completion.chunk"' in e for e in events[:-1])


def test_async_client_plain_and_stream(world):
    async def run():
        client = world.async_client()
        completion = await client.chat.completions.create(model="m-qwen", messages=MESSAGES)
        stream = await client.chat.completions.create(
            model="m-qwen",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        await client.close()
        return completion, chunks

    completion, chunks = asyncio.run(run())

    assert completion.choices[0].message.content == "Mock reply: hello there world"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Mock reply: hello there world"
    )
    assert chunks[-1].usage.total_tokens == 11
    assert UsageEvent.objects.filter(streamed=True).count() == 1
    assert UsageEvent.objects.filter(streamed=False).count() == 1


def test_unknown_fields_pass_through_both_ways(world):
    completion = world.client().chat.completions.create(
        model="m-qwen",
        messages=MESSAGES,
        extra_body={"enable_thinking": True, "mock": {"echo_request": True, "reasoning": 2}},
    )

    forwarded = completion.model_extra["mock_request"]
    assert forwarded["enable_thinking"] is True
    # The provider sees its own model id, not the public one.
    assert forwarded["model"] == "upstream-m-qwen"
    assert completion.choices[0].message.model_extra["reasoning_content"].startswith("Thinking")


def test_reasoning_content_streams_through(world):
    with world.client().chat.completions.create(
        model="m-deepseek",
        messages=MESSAGES,
        stream=True,
        extra_body={"mock": {"reasoning": 3}},
    ) as stream:
        chunks = list(stream)
        request_id = stream.response.headers["x-request-id"]

    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
        for c in chunks
        if c.choices
    )
    assert reasoning == "Thinking step 1. Thinking step 2. Thinking step 3. "
    event = event_for(request_id)
    assert (event.output_tokens, event.reasoning_tokens) == (5, 3)


def test_every_response_has_its_own_request_id(world):
    client = world.client()
    ids = {
        client.chat.completions.create(model="m-openai", messages=MESSAGES)._request_id
        for _ in range(3)
    }
    assert len(ids) == 3
    assert set(UsageEvent.objects.values_list("request_id", flat=True)) == ids


@pytest.mark.parametrize("accept", ["application/json", "text/event-stream", "*/*", "text/html"])
def test_any_accept_header_gets_an_answer(world, accept):
    response = httpx2.post(
        f"{world.url}/chat/completions",
        headers={"Authorization": f"Bearer {world.secret}", "Accept": accept},
        json={"model": "m-openai", "messages": MESSAGES},
    )
    assert response.status_code == 200
    assert response.json()["object"] == "chat.completion"


def test_the_production_server_serves_plain_and_streamed_chat(world, gunicorn_gateway):
    client = openai.OpenAI(base_url=gunicorn_gateway.url, api_key=world.secret, max_retries=0)

    completion = client.chat.completions.create(model="m-kimi", messages=MESSAGES)
    with client.chat.completions.create(
        model="m-kimi", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
        stream_id = stream.response.headers["x-request-id"]

    assert completion.choices[0].message.content == "Mock reply: hello there world"
    assert chunks[-1].usage.total_tokens == 11
    assert event_for(completion._request_id).status == UsageEvent.Status.OK
    assert event_for(stream_id).output_tokens == 5
