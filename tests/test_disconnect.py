"""A client that hangs up mid-stream still leaves exactly one correct ledger row, and the
upstream connection is not leaked (see the policy in routing/proxy.py and the README)."""

from __future__ import annotations

import time
from decimal import Decimal

import httpx2
import openai
import pytest
from django.db.models import Sum
from django.test import override_settings
from django.utils import timezone

from billing.models import UsageEvent
from routing.proxy import ChatCall, chat_admit, chat_stream, chat_targets
from tenants.budgets import budget_set, budget_status
from tenants.models import ApiKey, KeyLease, RateWindow
from tenants.selectors import api_key_for_digest
from tenants.services import key_digest

MESSAGES = [{"role": "user", "content": "tell me a long story"}]


def stream_open(http: httpx2.Client, url: str, world, mock: dict):
    """A streamed completion of m-deepseek with these mock knobs (a context manager)."""
    return http.stream(
        "POST",
        f"{url}/chat/completions",
        headers={"Authorization": f"Bearer {world.secret}"},
        json={"model": "m-deepseek", "messages": MESSAGES, "stream": True, "mock": mock},
    )


def stream_and_hang_up(url: str, world, mock: dict, *, events_to_read: int) -> str:
    """Start a stream, read a few events, close the socket; return the request id."""
    with (
        httpx2.Client(timeout=30) as http,
        stream_open(http, url, world, mock) as response,
    ):
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen == events_to_read:
                    break
    return request_id


def wait_for_event(request_id: str, timeout: float = 20.0) -> UsageEvent:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = UsageEvent.objects.filter(request_id=request_id).first()
        if event is not None:
            return event
        time.sleep(0.05)
    raise AssertionError(f"no usage event for {request_id} after {timeout} s")


def mock_stats(world) -> dict:
    return httpx2.get(f"{world.mock.base}/_mock/stats").json()


@pytest.mark.parametrize("server", ["live_server", "gunicorn"])
def test_disconnect_records_the_providers_usage_after_draining(world, server, request):
    url = request.getfixturevalue("gunicorn_gateway").url if server == "gunicorn" else world.url
    # 20 chunks, 50 ms apart: the client leaves after 3 events (role + 2 content).
    request_id = stream_and_hang_up(
        url,
        world,
        {"chunks": 20, "interval_ms": 50, "usage": {"prompt_tokens": 40, "cached_tokens": 8}},
        events_to_read=3,
    )

    event = wait_for_event(request_id)
    assert event.status == UsageEvent.Status.CLIENT_CANCELLED
    # The gateway read on to the end: the provider's own figures, all 20 output tokens.
    assert event.usage_source == UsageEvent.Source.PROVIDER
    assert (event.input_uncached_tokens, event.input_cached_tokens) == (32, 8)
    assert event.output_tokens == 20
    assert event.cost > 0
    assert UsageEvent.objects.filter(request_id=request_id).count() == 1


def test_disconnect_past_the_drain_limit_records_an_estimate_and_closes_upstream(world):
    httpx2.post(f"{world.mock.base}/_mock/stats/reset")
    with override_settings(TOLLGATE_DISCONNECT_DRAIN_SECONDS=0):
        request_id = stream_and_hang_up(
            world.url, world, {"chunks": 200, "interval_ms": 50}, events_to_read=4
        )
        event = wait_for_event(request_id)

    assert event.status == UsageEvent.Status.CLIENT_CANCELLED
    assert event.usage_source == UsageEvent.Source.ESTIMATED
    # Three content chunks reached the client before it left; the gateway notices on
    # its next write, so one or two more may have been relayed by then.
    assert 3 <= event.output_tokens <= 6
    assert event.input_uncached_tokens > 0
    assert event.cost > 0
    # The gateway hung up on the provider instead of reading 200 chunks.
    deadline = time.monotonic() + 10
    while mock_stats(world)["streams_open"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = mock_stats(world)
    assert stats["streams_open"] == 0
    assert stats["streams_aborted"] == 1
    assert stats["streams_completed"] == 0


def test_a_stream_response_closed_before_it_sent_anything_is_still_metered(world):
    """The server may close a streaming response before asking for its first chunk (the
    client left while the upstream was opening): the call is metered and released all
    the same, and the upstream connection closed."""
    key = api_key_for_digest(key_digest(world.secret))
    now = timezone.now()
    body = {"model": "m-openai", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    _, targets = chat_targets(key=key, name="m-openai", body=body, at=now, split_key="r")
    call = ChatCall(
        request_id="req_closed_early",
        received_at=now,
        started=time.monotonic(),
        key=key,
        body=body,
        model=targets[0].model,
        units=targets[0].units,
        targets=targets,
    )
    chat_admit(call)

    chat_stream(call).close()

    event = UsageEvent.objects.get(request_id="req_closed_early")
    assert event.status == UsageEvent.Status.CLIENT_CANCELLED
    assert event.output_tokens == 5  # drained: the provider's own usage
    assert call.released


@pytest.mark.parametrize("server", ["live_server", "gunicorn"])
def test_a_hung_up_stream_no_longer_counts_against_the_concurrency_limit(world, server, request):
    """A key limited to one call at a time: once its client has hung up on a stream, the
    key calls again at once, while the gateway still drains the provider for the first
    call's usage. That call's event, tokens and budget hold settle when the drain ends."""
    url = request.getfixturevalue("gunicorn_gateway").url if server == "gunicorn" else world.url
    ApiKey.objects.filter(tenant=world.tenant).update(concurrency_limit=1, tpm_limit=100_000)
    budget = budget_set(tenant=world.tenant, limit_usd=Decimal("10"))
    client = openai.OpenAI(base_url=url, api_key=world.secret, max_retries=0)

    # 200 chunks, 40 ms apart: the provider goes on for about 8 s after the client leaves.
    stream = client.chat.completions.create(
        model="m-deepseek",
        messages=MESSAGES,
        stream=True,
        extra_body={"mock": {"chunks": 200, "interval_ms": 40}},
    )
    first_id = stream.response.headers["x-request-id"]
    for _ in zip(range(3), stream, strict=False):  # role + 2 content chunks
        pass
    stream.close()

    # The gateway notices the hang-up on its next write to the client, one or two chunks
    # later; from then on the key's one slot is free.
    deadline = time.monotonic() + 4
    while True:
        try:
            second = client.chat.completions.create(model="m-openai", messages=MESSAGES)
            break
        except openai.RateLimitError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert second.choices[0].message.content
    # ...while the first call is still draining: no event yet, its budget hold still held.
    assert not UsageEvent.objects.filter(request_id=first_id).exists()
    assert budget_status(budget).reserved > 0

    first = wait_for_event(first_id)
    assert first.status == UsageEvent.Status.CLIENT_CANCELLED
    assert first.usage_source == UsageEvent.Source.PROVIDER  # drained to the end
    assert first.output_tokens == 200
    assert UsageEvent.objects.filter(request_id=first_id).count() == 1
    second_event = UsageEvent.objects.get(request_id=second._request_id)
    # Each call's real tokens counted once in the key's windows, each cost settled once,
    # nothing held, and no lease left live.
    counted = RateWindow.objects.aggregate(tokens=Sum("tokens"))["tokens"]
    assert counted == sum(e.prompt_tokens + e.completion_tokens for e in (first, second_event))
    status = budget_status(budget)
    assert (status.spent, status.reserved) == (first.cost + second_event.cost, 0)
    assert not KeyLease.objects.filter(expires_at__gt=timezone.now()).exists()


def test_a_stream_under_way_when_the_server_stops_ends_with_an_error_and_its_ledger_row(
    world, tmp_path
):
    """A deploy's SIGTERM gives requests under way gunicorn's graceful timeout, then the
    process exits: a longer stream was cut mid-body (the SDK saw a network fault), with
    no ledger row for what the provider bills and its budget hold left behind."""
    import json
    import signal

    from tenants.models import BudgetReservation

    from . import conftest
    from .upstream import gunicorn_gateway_start

    budget = budget_set(tenant=world.tenant, limit_usd=Decimal("5"))
    gateway = gunicorn_gateway_start(
        conftest.test_database_url(),
        output=tmp_path / "gunicorn.log",
        GUNICORN_WORKERS="1",
        GUNICORN_GRACEFUL_TIMEOUT="6",  # streams end 3 s after the signal
    )
    try:
        with (
            httpx2.Client(timeout=30) as http,
            # 20 s
            stream_open(http, gateway.url, world, {"chunks": 100, "interval_ms": 200}) as response,
        ):
            request_id = response.headers["x-request-id"]
            lines = response.iter_lines()
            payloads: list[str] = []
            for line in lines:
                if line.startswith("data: "):
                    payloads.append(line[6:])
                    if len(payloads) == 3:
                        gateway.process.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
        assert gateway.process.wait(timeout=15) == 0
    finally:
        gateway.stop()

    assert "[DONE]" not in payloads
    error = json.loads(payloads[-1])["error"]
    assert error["code"] == "gateway_restarting"
    assert error["message"].startswith("The gateway is restarting")
    relayed = len(payloads) - 1
    assert 5 < relayed < 100
    event = UsageEvent.objects.get(request_id=request_id)
    assert (event.status, event.error_code) == (
        UsageEvent.Status.UPSTREAM_ERROR,
        "gateway_restarting",
    )
    assert event.output_tokens >= relayed - 1  # the mock's chunks are a token each
    assert not BudgetReservation.objects.filter(request_id=request_id).exists()
    assert budget_status(budget).reserved == 0
    assert time.monotonic() - stopped < 10


def test_a_stream_waiting_on_a_silent_provider_when_the_server_stops_ends_in_time(world, tmp_path):
    """The stop was only seen when the provider sent something: a stream whose provider
    was silent (thinking), or had not answered yet, was still cut at the deadline."""
    import json
    import signal
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from . import conftest
    from .upstream import gunicorn_gateway_start

    gateway = gunicorn_gateway_start(
        conftest.test_database_url(),
        output=tmp_path / "gunicorn.log",
        GUNICORN_WORKERS="1",
        GUNICORN_GRACEFUL_TIMEOUT="6",  # calls end 3 s after the signal
    )
    opened = threading.Event()

    def stream(mock: dict) -> tuple[int, str, list[str]]:
        with (
            httpx2.Client(timeout=30) as http,
            stream_open(http, gateway.url, world, mock) as response,
        ):
            if response.status_code != 200:
                return response.status_code, response.headers["x-request-id"], [response.read()]
            opened.set()
            data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            return 200, response.headers["x-request-id"], data

    try:
        with ThreadPoolExecutor(2) as pool:
            # The role chunk at once, then 20 s of silence; and no answer for 20 s.
            silent = pool.submit(stream, {"chunks": 2, "interval_ms": 20_000})
            unanswered = pool.submit(stream, {"latency_ms": 20_000})
            assert opened.wait(10)
            time.sleep(0.5)  # the second call is waiting on its provider too
            gateway.process.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            (status, silent_id, data), (refused, unanswered_id, body) = (
                silent.result(20),
                unanswered.result(20),
            )
            ended = time.monotonic() - stopped
        assert gateway.process.wait(timeout=15) == 0
    finally:
        gateway.stop()

    assert ended < 6  # before gunicorn's deadline, not at it
    assert status == 200 and json.loads(data[-1])["error"]["code"] == "gateway_restarting"
    assert refused == 503
    assert json.loads(body[0])["error"]["code"] == "gateway_restarting"
    for request_id in (silent_id, unanswered_id):
        event = UsageEvent.objects.get(request_id=request_id)
        assert event.error_code == "gateway_restarting"
