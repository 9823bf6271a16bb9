"""Exact usage in the ledger for each provider's way of reporting it, plain and streamed.

The mock reports 1000 prompt tokens of which 800 cached, and 500 completion tokens of
which 300 reasoning, each style in its own spelling and place (see the conformance guide).
The ledger must hold 200 uncached input, 800 cached input, 200 output and 300 reasoning
tokens, priced at 0.27 / 0.07 / 1.10 per 1M: 54 + 56 + 550 = $0.000660.
"""

from __future__ import annotations

import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2
import pytest

from billing.models import UsageEvent
from routing.models import Provider

from .conftest import STYLES, model_create

MESSAGES = [{"role": "user", "content": "Explain quantum computing in 100 words"}]
USAGE = {
    "prompt_tokens": 1000,
    "cached_tokens": 800,
    "completion_tokens": 500,
    "reasoning_tokens": 300,
}
EXPECTED_COST = Decimal("0.000660000000")


def assert_exact(event: UsageEvent) -> None:
    assert event.status == UsageEvent.Status.OK
    assert event.usage_source == UsageEvent.Source.PROVIDER
    assert event.input_uncached_tokens == 200
    assert event.input_cached_tokens == 800
    assert event.output_tokens == 200
    assert event.reasoning_tokens == 300
    assert event.unpriced_tokens == 0
    assert event.cost == EXPECTED_COST
    assert event.raw_usage  # the provider's own fields are kept


@pytest.mark.parametrize("style", STYLES)
def test_plain_usage_is_exact_in_every_style(world, style):
    completion = world.client().chat.completions.create(
        model=f"m-{style}", messages=MESSAGES, extra_body={"mock": {"usage": USAGE}}
    )

    assert completion.usage.prompt_tokens == 1000
    assert completion.usage.prompt_tokens_details.cached_tokens == 800
    assert completion.usage.completion_tokens == 500
    assert completion.usage.completion_tokens_details.reasoning_tokens == 300
    assert_exact(UsageEvent.objects.get(request_id=completion._request_id))


@pytest.mark.parametrize(
    "absurd",
    [
        {"prompt_tokens": 10**19, "completion_tokens": 10**19},
        {"prompt_tokens": 10, "completion_tokens": 10**20},  # output billed as 0 before
    ],
)
def test_absurd_provider_counts_are_estimated_not_a_500(world, absurd):
    # 10^19 tokens: beyond the ledger's 64-bit columns. The client still gets its answer,
    # and the call its row, with an estimate instead of the provider's garbage.
    completion = world.client().chat.completions.create(
        model="m-openai", messages=MESSAGES, extra_body={"mock": {"usage": absurd}}
    )
    event = UsageEvent.objects.get(request_id=completion._request_id)
    assert event.status == UsageEvent.Status.OK
    assert event.usage_source == UsageEvent.Source.ESTIMATED
    assert 0 < event.input_uncached_tokens < 100 and event.output_tokens > 0
    assert completion.usage.prompt_tokens == event.input_uncached_tokens


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("style", STYLES)
def test_streamed_usage_is_exact_in_every_style(world, style, include_usage):
    with world.client().chat.completions.create(
        model=f"m-{style}",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": include_usage},
        extra_body={"mock": {"usage": USAGE, "chunks": 3}},
    ) as stream:
        chunks = list(stream)
        request_id = stream.response.headers["x-request-id"]

    assert_exact(UsageEvent.objects.get(request_id=request_id))
    usage_chunks = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage_chunks) == 1 and chunks[-1].choices == []
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 800
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 300
    else:
        assert usage_chunks == []
    # Kimi's usage inside a choice never reaches the client either.
    assert all("usage" not in (c.choices[0].model_extra or {}) for c in chunks if c.choices)


def test_deepseek_cache_fields_are_kept_on_the_ledger_row(world):
    completion = world.client().chat.completions.create(
        model="m-deepseek", messages=MESSAGES, extra_body={"mock": {"usage": USAGE}}
    )

    raw = UsageEvent.objects.get(request_id=completion._request_id).raw_usage
    assert raw["prompt_cache_hit_tokens"] == 800
    assert raw["prompt_cache_miss_tokens"] == 200


def test_model_without_input_price_meters_input_as_unpriced(world):
    model = world.models["openai"]
    price = model.prices.get()
    price.input_per_mtok = price.cached_input_per_mtok = None
    price.save()

    completion = world.client().chat.completions.create(
        model="m-openai", messages=MESSAGES, extra_body={"mock": {"usage": USAGE}}
    )

    event = UsageEvent.objects.get(request_id=completion._request_id)
    assert event.unpriced_tokens == 1000
    assert event.cost == Decimal("0.000550000000")  # the output alone


class ScriptedProvider:
    """An OpenAI-compatible provider that answers every chat completion with one fixed
    usage object, plain or as a two-chunk stream, whatever its values; `choice` adds to
    the answer's choice (and to the stream's content chunk)."""

    def __init__(self, usage: dict, choice: dict | None = None):
        choice = choice or {}
        completion = {
            "id": "chatcmpl-scripted",
            "object": "chat.completion",
            "created": 1,
            "model": "upstream",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "four words of answer"},
                    "finish_reason": "stop",
                    **choice,
                }
            ],
            "usage": usage,
        }
        chunk = {**completion, "object": "chat.completion.chunk"}
        events = [
            {
                **chunk,
                "choices": [{"index": 0, "delta": {"content": "four words of answer"}, **choice}],
            },
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**chunk, "choices": [], "usage": usage},
        ]
        plain = json.dumps(completion).encode()
        stream = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)
        stream += b"data: [DONE]\n\n"

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                streamed = body.get("stream")
                payload = stream if streamed else plain
                self.send_response(200)
                self.send_header(
                    "Content-Type", "text/event-stream" if streamed else "application/json"
                )
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def scripted(world):
    """world's tenant may call m-scripted, served by a ScriptedProvider made by the test."""

    servers = []

    def make(usage: dict, choice: dict | None = None) -> None:
        provider = ScriptedProvider(usage, choice)
        servers.append(provider.server)
        model = model_create(
            "m-scripted", provider=Provider.objects.create(name="scripted", base_url=provider.url)
        )
        world.tenant.allowed_models.add(model)

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def _call(world, stream: bool) -> UsageEvent:
    client = world.client()
    if stream:
        with client.chat.completions.create(
            model="m-scripted", messages=MESSAGES, stream=True
        ) as chunks:
            list(chunks)
            request_id = chunks.response.headers["x-request-id"]
    else:
        completion = client.chat.completions.create(model="m-scripted", messages=MESSAGES)
        request_id = completion._request_id
    return UsageEvent.objects.get(request_id=request_id)


@pytest.mark.parametrize("stream", [False, True])
def test_usage_with_no_readable_count_is_estimated_not_metered_as_free(world, scripted, stream):
    scripted({"prompt_tokens": None, "completion_tokens": None, "total_tokens": None})
    event = _call(world, stream)
    assert event.usage_source == UsageEvent.Source.ESTIMATED
    assert event.prompt_tokens > 0 and event.output_tokens > 0
    assert event.cost > 0
    assert event.raw_usage["prompt_tokens"] is None  # what the provider said, kept


USAGE_SENT = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}


@pytest.mark.parametrize("stream", [False, True])
def test_counts_sent_as_digit_strings_are_read(world, scripted, stream):
    scripted({"prompt_tokens": "1000", "completion_tokens": "500", "total_tokens": "1500"})
    event = _call(world, stream)
    assert event.usage_source == UsageEvent.Source.PROVIDER
    assert (event.prompt_tokens, event.output_tokens) == (1000, 500)


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_infinity_from_the_provider_reach_the_client_as_null(world, scripted):
    # json.dumps writes these as the bare words NaN and -Infinity, which are not JSON.
    logprobs = {"content": [{"token": "four", "logprob": float("-inf"), "bytes": None}]}
    scripted(USAGE_SENT, {"logprobs": logprobs, "score": float("nan")})
    headers = {"Authorization": f"Bearer {world.secret}"}
    body = {"model": "m-scripted", "messages": MESSAGES}

    plain = httpx2.post(f"{world.url}/chat/completions", json=body, headers=headers)
    choice = _strict_json(plain.text)["choices"][0]
    assert choice["logprobs"]["content"][0]["logprob"] is None
    assert choice["score"] is None

    streamed = httpx2.post(
        f"{world.url}/chat/completions", json={**body, "stream": True}, headers=headers
    )
    events = [e.removeprefix("data: ") for e in streamed.text.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    first = _strict_json(events[0])["choices"][0]
    assert first["logprobs"]["content"][0]["logprob"] is None
    assert all(_strict_json(e) for e in events[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_a_lone_surrogate_from_the_provider_reaches_the_client_escaped(world, scripted, stream):
    # "\ud83d" alone is valid JSON but no UTF-8: it was a 500 after the call was metered
    # (plain, so the SDK's retries billed it three times) or a cut stream.
    scripted(USAGE_SENT, {"note": "\ud83d"})
    response = httpx2.post(
        f"{world.url}/chat/completions",
        json={"model": "m-scripted", "messages": MESSAGES, "stream": stream},
        headers={"Authorization": f"Bearer {world.secret}"},
    )
    assert response.status_code == 200
    assert '"note":"\\ud83d"' in response.text
    if stream:
        assert response.text.endswith("data: [DONE]\n\n")
    else:
        assert response.json()["choices"][0]["message"]["content"] == "four words of answer"
    event = UsageEvent.objects.get()
    assert event.status == UsageEvent.Status.OK
    assert (event.prompt_tokens, event.output_tokens) == (10, 4)
