"""Per-key rate limits as the official SDK sees them: RateLimitError, Retry-After and
OpenAI's x-ratelimit-* headers."""

from __future__ import annotations

import time
from datetime import timedelta

import httpx2
import openai
import pytest
from django.db import DatabaseError
from django.utils import timezone

from billing.models import UsageEvent
from routing import proxy
from tenants.models import ApiKey, KeyLease, RateWindow

MESSAGES = [{"role": "user", "content": "hello there world"}]  # 6 prompt tokens at the mock


def limited(world, **limits) -> openai.OpenAI:
    ApiKey.objects.filter(tenant=world.tenant).update(**limits)
    if timezone.now().second >= 50:  # keep the test inside one minute window
        time.sleep(61 - timezone.now().second)
    return world.client()


def create(client, **kwargs):
    return client.chat.completions.with_raw_response.create(
        model="m-openai", messages=MESSAGES, extra_body={"mock": {"chunks": 10}}, **kwargs
    )


def test_requests_per_minute_and_their_headers(world):
    client = limited(world, rpm_limit=2)

    first, second = create(client), create(client)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-ratelimit-limit-tokens" not in first.headers

    with pytest.raises(openai.RateLimitError) as caught:
        create(client)
    assert caught.value.code == "rate_limit_exceeded"
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 60
    assert "2 requests per minute" in caught.value.message


def test_tokens_per_minute_count_real_usage(world):
    client = limited(world, tpm_limit=30)

    # 6 + 10 tokens a call, counted when it ends; a plain answer's headers count its own.
    first = create(client)
    assert first.headers["x-ratelimit-remaining-tokens"] == "14"
    second = create(client)  # admitted (16 of 30 used), and then over
    assert second.headers["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(openai.RateLimitError, match="30 tokens per minute") as caught:
        create(client)
    assert caught.value.response.headers["x-ratelimit-remaining-tokens"] == "0"


def test_streams_carry_the_headers_too(world):
    client = limited(world, rpm_limit=10, tpm_limit=1000)
    with client.chat.completions.with_streaming_response.create(
        model="m-openai", messages=MESSAGES, stream=True
    ) as response:
        assert response.headers["x-ratelimit-remaining-requests"] == "9"
        assert response.headers["x-ratelimit-limit-tokens"] == "1000"
        list(response.iter_lines())


def test_unlimited_keys_get_no_rate_headers(world):
    response = create(world.client())
    assert not [h for h in response.headers if h.startswith("x-ratelimit")]


def test_the_sdk_retries_a_rate_limit_after_retry_after(world):
    limited(world, concurrency_limit=1)
    # Another call holds the key's only slot for 0.8 s more. The refusal says
    # "retry after 1 s", and the SDK's own retry then gets through.
    KeyLease.objects.create(
        api_key=ApiKey.objects.get(tenant=world.tenant),
        request_id="req_other",
        expires_at=timezone.now() + timedelta(seconds=0.8),
    )
    sent = []
    client = world.client(
        max_retries=2, http_client=httpx2.Client(event_hooks={"request": [sent.append]})
    )
    completion = client.chat.completions.create(model="m-openai", messages=MESSAGES)
    assert completion.choices[0].message.content
    assert len(sent) == 2


def test_a_failed_ledger_write_still_gives_the_lease_back_and_counts_tokens_once(
    world, monkeypatch
):
    # The usage event and the key's release commit together. When the event cannot be
    # written, neither half of that transaction stays; the release then runs on its own.
    client = limited(world, concurrency_limit=1, tpm_limit=1000)
    key = ApiKey.objects.get(tenant=world.tenant)
    real = proxy.usage_write

    def written_then_failed(facts, **options):
        real(facts, **options)  # the event and the release, in the proxy's transaction
        raise DatabaseError("could not extend file: No space left on device")

    monkeypatch.setattr("routing.proxy.usage_write", written_then_failed)
    with pytest.raises(openai.InternalServerError) as caught:
        create(client)
    assert "Traceback" not in str(caught.value.body)
    assert not UsageEvent.objects.exists()
    window = RateWindow.objects.get(api_key=key)
    assert (window.requests, window.tokens) == (1, 16)  # 6 + 10, counted once
    assert not KeyLease.objects.filter(expires_at__gt=timezone.now()).exists()

    monkeypatch.setattr("routing.proxy.usage_write", real)
    # The lease is back: a key limited to one call at a time calls again at once.
    second = create(client)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - 16 - 16)
    assert UsageEvent.objects.count() == 1
