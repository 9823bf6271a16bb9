"""Every class of error reaches the official SDK as the right exception, in OpenAI's shape,
and nothing a client sends produces a 500."""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2
import openai
import pytest
from django.test import override_settings
from django.utils import timezone

from billing.models import UsageEvent
from routing import proxy
from routing.mockupstream import error_body
from routing.models import CatalogModel
from routing.upstream import upstream_error_failure
from routing.validation import MAX_NESTING
from tenants.models import ApiKey, Tenant
from tenants.services import api_key_issue, key_revoke

from . import conftest
from .conftest import model_create
from .upstream import gunicorn_gateway_start

MESSAGES = [{"role": "user", "content": "hi"}]


def post(world, body=None, *, content=None, secret=None, path="chat/completions", headers=None):
    return httpx2.post(
        f"{world.url}/{path}",
        headers={"Authorization": f"Bearer {secret or world.secret}", **(headers or {})},
        json=body,
        content=content,
        timeout=30,
    )


def assert_openai_error(response, status: int, *, code=None, param=None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"].startswith("req_")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


# --- what the client sends ------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b"\xff\xfe\x00",
        b'"a string"',
        b"[1, 2]",
        b"null",
        b"12",
        b'{"model": "m-openai", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "m-openai", "messages": [], "temperature": NaN}',
        # Beyond a float's range: would be infinity, which no JSON can carry on.
        b'{"model": "m-openai", "messages": [{"role": "user", "content": "hi"}], '
        b'"temperature": 1e400}',
        b'{"model": "m-openai", "messages": [{"role": "user", "content": "hi"}], '
        b'"stream": true, "extra": {"x": -1e999}}',
        b'{"model": "m-openai", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        # Parsed, but too deep to be encoded again on the way to the provider: was a 500.
        b'{"model": "m-openai", "messages": [{"role": "user", "content": "hi"}], "x": '
        + b"[" * 910
        + b"]" * 910
        + b"}",
    ],
)
def test_malformed_body_is_a_400(world, content):
    response = post(world, content=content, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400, code="invalid_json")


def test_nesting_is_accepted_up_to_its_limit_and_refused_beyond(world):
    def nested(levels):  # the body is one level, "x" holds the rest
        return {
            "model": "m-openai",
            "messages": MESSAGES,
            "x": json.loads("[" * levels + "]" * levels),
        }

    assert post(world, nested(MAX_NESTING - 1)).status_code == 200
    error = assert_openai_error(post(world, nested(MAX_NESTING)), 400, code="invalid_json")
    assert f"At most {MAX_NESTING} levels" in error["message"]
    assert UsageEvent.objects.count() == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES}, "model"),
        ({"model": "m-openai"}, "messages"),
        ({"model": 42, "messages": MESSAGES}, "model"),
        ({"model": "", "messages": MESSAGES}, "model"),
        ({"model": "m-openai", "messages": "hi"}, "messages"),
        ({"model": "m-openai", "messages": []}, "messages"),
        ({"model": "m-openai", "messages": ["hi"]}, "messages[0]"),
        ({"model": "m-openai", "messages": [{"content": "hi"}]}, "messages[0].role"),
        (
            {"model": "m-openai", "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
        ),
        (
            {"model": "m-openai", "messages": [{"role": "user", "content": 7}]},
            "messages[0].content",
        ),
        ({"model": "m-openai", "messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"model": "m-openai", "messages": MESSAGES, "stream_options": []}, "stream_options"),
        ({"model": "m-openai", "messages": MESSAGES, "max_tokens": "10"}, "max_tokens"),
        ({"model": "m-openai", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": "m-openai", "messages": MESSAGES, "n": True}, "n"),
        ({"model": "m-openai", "messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ],
)
def test_missing_and_mistyped_fields_are_400_naming_the_param(world, body, param):
    assert_openai_error(post(world, body), 400, param=param)
    assert UsageEvent.objects.count() == 0


def test_sdk_raises_bad_request_for_an_invalid_request(world):
    with pytest.raises(openai.BadRequestError) as caught:
        world.client().chat.completions.create(model="m-openai", messages=[])
    assert caught.value.body["param"] == "messages"


def test_huge_body_is_a_413_and_nothing_is_metered(world):
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=10_000):
        response = post(
            world, {"model": "m-openai", "messages": [{"role": "user", "content": "x" * 20_000}]}
        )
    assert_openai_error(response, 413, code="request_too_large")
    assert UsageEvent.objects.count() == 0


def test_a_compressed_body_is_a_415_that_says_so(world):
    body = gzip.compress(json.dumps({"model": "m-openai", "messages": MESSAGES}).encode())
    response = post(
        world,
        content=body,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    error = assert_openai_error(response, 415, code="unsupported_content_encoding")
    assert error["message"].startswith("Content-Encoding 'gzip' is not supported")
    assert UsageEvent.objects.count() == 0


def test_wrong_method_and_unknown_path_answer_in_openai_shape(world):
    response = httpx2.get(
        f"{world.url}/chat/completions", headers={"Authorization": f"Bearer {world.secret}"}
    )
    assert_openai_error(response, 405)
    options = httpx2.options(
        f"{world.url}/chat/completions", headers={"Authorization": f"Bearer {world.secret}"}
    )
    assert_openai_error(options, 405)
    assert options.headers["Allow"] == "POST"
    assert_openai_error(httpx2.get(f"{world.url}/embeddingz"), 404)
    base = httpx2.get(world.url)  # /v1 itself: no redirect to an HTML page
    assert "Invalid URL (GET /v1)" in assert_openai_error(base, 404)["message"]
    with pytest.raises(openai.NotFoundError):
        world.client().embeddings.create(model="m-openai", input="hi")


def test_a_base_url_without_v1_gets_an_openai_error_that_says_so(world):
    root = world.url.removesuffix("/v1")
    client = openai.OpenAI(base_url=root, api_key=world.secret, max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="m-openai", messages=MESSAGES)
    assert caught.value.body["message"] == (
        "Invalid URL (POST /chat/completions). The API is under /v1/: an OpenAI client's "
        "base URL ends in /v1."
    )
    assert caught.value.response.headers["x-request-id"].startswith("req_")
    # The management API keeps its own shape.
    assert httpx2.get(f"{root}/api/nowhere/").json() == {"detail": "Not found."}


def test_a_host_the_gateway_does_not_serve_gets_an_openai_400(world):
    response = httpx2.get(f"{world.url}/models", headers={"Host": "gateway.example"})
    error = assert_openai_error(response, 400)
    assert "Host header" in error["message"] and "gateway.example" not in response.text


# --- keys -----------------------------------------------------------------------------


def test_missing_key_is_401(world):
    response = httpx2.post(
        f"{world.url}/chat/completions", json={"model": "m-openai", "messages": MESSAGES}
    )
    error = assert_openai_error(response, 401, code="missing_api_key")
    assert "API key" in error["message"]


def gateway_log(caplog) -> str:
    """What the gateway logged (the test's own SDK client logs its requests at DEBUG)."""
    client_side = ("openai", "httpx", "httpcore")
    return "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(client_side))


@pytest.mark.parametrize("secret", ["tg-wrong-key-0123456789", "sk-" + "a" * 40])
def test_wrong_key_is_401_and_never_echoed(world, secret, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(openai.AuthenticationError) as caught:
        world.client(secret).chat.completions.create(model="m-openai", messages=MESSAGES)
    assert secret not in str(caught.value)
    assert secret not in caught.value.response.text
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert "Unauthorized" in gateway_log(caplog)
    assert secret not in gateway_log(caplog)


def test_valid_key_never_reaches_the_logs(world, caplog):
    caplog.set_level(logging.DEBUG)
    world.client().chat.completions.create(model="m-openai", messages=MESSAGES)
    with pytest.raises(openai.InternalServerError):
        world.client().chat.completions.create(
            model="m-openai", messages=MESSAGES, extra_body={"mock": {"status": 500}}
        )
    assert "HTTP 500" in gateway_log(caplog)
    assert world.secret not in gateway_log(caplog)


def test_non_ascii_and_malformed_authorization_headers_are_401(world):
    for header in [b"Bearer \xe2\x82\xac", b"Basic abc", b"Bearer", b"Token abc def"]:
        response = httpx2.post(
            f"{world.url}/chat/completions",
            headers=[(b"Authorization", header)],
            json={"model": "m-openai", "messages": MESSAGES},
        )
        assert_openai_error(response, 401)


def test_revoked_key_is_refused_on_its_next_request(world):
    client = world.client()
    client.chat.completions.create(model="m-openai", messages=MESSAGES)

    key_revoke(key=ApiKey.objects.get(tenant=world.tenant))

    with pytest.raises(openai.AuthenticationError, match="revoked"):
        client.chat.completions.create(model="m-openai", messages=MESSAGES)


def test_expired_key_is_refused(world):
    # Issued for an hour (a key is never issued expired), then an hour has passed.
    issued = api_key_issue(tenant=world.tenant, expires_at=timezone.now() + timedelta(hours=1))
    ApiKey.objects.filter(pk=issued.key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(openai.AuthenticationError, match="expired"):
        world.client(issued.secret).models.list()


def test_key_that_has_not_expired_yet_works(world):
    issued = api_key_issue(tenant=world.tenant, expires_at=timezone.now() + timedelta(hours=1))
    assert world.client(issued.secret).models.list().data


# --- permissions ----------------------------------------------------------------------


def test_model_outside_the_allowlist_is_403(world):
    model_create("m-secret", provider=world.providers["openai"])
    with pytest.raises(openai.PermissionDeniedError) as caught:
        world.client().chat.completions.create(model="m-secret", messages=MESSAGES)
    assert caught.value.code == "model_not_allowed"
    assert UsageEvent.objects.count() == 0


def test_key_narrowed_to_one_model_cannot_call_another(world):
    narrow = api_key_issue(tenant=world.tenant, model_ids=["m-qwen"]).secret
    client = world.client(narrow)
    assert client.chat.completions.create(model="m-qwen", messages=MESSAGES).choices
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="m-openai", messages=MESSAGES)


def test_suspended_tenant_is_403_for_every_key(world):
    second = api_key_issue(tenant=world.tenant).secret
    Tenant.objects.filter(pk=world.tenant.pk).update(status=Tenant.Status.SUSPENDED)
    for secret in (world.secret, second):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            world.client(secret).chat.completions.create(model="m-openai", messages=MESSAGES)
        assert caught.value.code == "tenant_suspended"


def test_unpriced_model_is_listed_but_refused(world):
    model = model_create("m-unpriced", provider=world.providers["openai"], priced=False)
    world.tenant.allowed_models.add(model)
    client = world.client()

    assert "m-unpriced" in [m.id for m in client.models.list()]
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model="m-unpriced", messages=MESSAGES)
    assert caught.value.code == "model_not_priced"
    assert UsageEvent.objects.count() == 0


def test_unknown_and_disabled_models_are_404(world):
    glm = CatalogModel.objects.get(public_id="m-glm")
    glm.enabled = False
    glm.save()
    for name in ("no-such-model", "m-glm"):
        with pytest.raises(openai.NotFoundError) as caught:
            world.client().chat.completions.create(model=name, messages=MESSAGES)
        assert caught.value.code == "model_not_found"


# --- the upstream ---------------------------------------------------------------------


def call_with_mock(world, mock: dict, *, model="m-openai", stream=False):
    client = world.client()
    if stream:
        with client.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, extra_body={"mock": mock}
        ) as chunks:
            return list(chunks)
    return client.chat.completions.create(model=model, messages=MESSAGES, extra_body={"mock": mock})


def only_event() -> UsageEvent:
    assert UsageEvent.objects.count() == 1
    return UsageEvent.objects.get()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [500, 503])
def test_upstream_5xx_is_a_502_and_metered_as_an_upstream_error(world, status, stream):
    with pytest.raises(openai.InternalServerError) as caught:
        call_with_mock(world, {"status": status}, stream=stream)
    assert caught.value.status_code == 502
    event = only_event()
    assert event.status == UsageEvent.Status.UPSTREAM_ERROR
    assert event.upstream_status == status
    assert event.cost == 0 and event.prompt_tokens == 0


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_timeout_is_a_504(world, stream):
    world.providers["openai"].timeout_seconds = 0.3
    world.providers["openai"].save()
    with pytest.raises(openai.InternalServerError) as caught:
        call_with_mock(world, {"latency_ms": 1500}, stream=stream)
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    assert only_event().status == UsageEvent.Status.UPSTREAM_ERROR


def test_upstream_connection_cut_before_answering_is_a_502(world):
    with pytest.raises(openai.InternalServerError) as caught:
        call_with_mock(world, {"cut_after": 0})
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unavailable"


def test_unreachable_upstream_is_a_502(world):
    provider = world.providers["openai"]
    provider.base_url = "http://127.0.0.1:9/v1"  # discard port: nothing listens
    provider.save()
    with pytest.raises(openai.InternalServerError) as caught:
        call_with_mock(world, {})
    assert caught.value.status_code == 502


def test_upstream_rate_limit_is_a_429_with_retry_after(world):
    with pytest.raises(openai.RateLimitError) as caught:
        call_with_mock(world, {"status": 429, "retry_after": 7})
    assert caught.value.response.headers["retry-after"] == "7"


def test_upstream_rate_limit_without_a_hint_still_says_when_to_retry(world):
    with pytest.raises(openai.RateLimitError) as caught:
        call_with_mock(world, {"status": 429})
    assert caught.value.response.headers["retry-after"] == "1"


def test_upstream_quota_spent_is_a_502_the_sdk_does_not_retry(world):
    # OpenAI's own "insufficient_quota" 429: the account's balance, not a rate.
    sent = []
    client = openai.OpenAI(
        base_url=world.url,
        api_key=world.secret,
        max_retries=2,
        http_client=httpx2.Client(event_hooks={"request": [sent.append]}),
    )
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model="m-openai",
            messages=MESSAGES,
            extra_body={"mock": {"status": 429, "error_code": "insufficient_quota"}},
        )
    assert caught.value.code == "upstream_account_error"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(sent) == 1
    assert only_event().upstream_status == 429


@pytest.mark.parametrize(("model", "status"), [("m-deepseek", 402), ("m-glm", 429)])
def test_empty_provider_balance_is_a_502_the_sdk_does_not_retry(world, model, status):
    with pytest.raises(openai.InternalServerError) as caught:
        call_with_mock(world, {"status": status}, model=model)
    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert only_event().upstream_status == status


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("status", "exception"),
    [
        (400, openai.BadRequestError),
        (413, openai.APIStatusError),
        (422, openai.UnprocessableEntityError),
    ],
)
def test_upstream_rejecting_the_request_passes_on_its_status_reason_and_param(
    world, status, exception, stream
):
    mock = {"status": status, "error_code": "context_length_exceeded", "error_param": "messages"}
    with pytest.raises(exception) as caught:
        call_with_mock(world, mock, stream=stream)
    assert caught.value.status_code == status
    assert caught.value.type == "invalid_request_error"
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "messages"
    assert caught.value.body["message"] == error_body(status)["error"]["message"]
    event = only_event()
    assert event.upstream_status == status
    assert event.cost == 0


def test_upstream_refusing_the_gateways_credentials_is_not_the_clients_401(world):
    with pytest.raises(openai.InternalServerError) as caught:
        call_with_mock(world, {"status": 401})
    assert caught.value.status_code == 502


def test_provider_without_its_key_in_the_environment_is_a_502(world, monkeypatch):
    monkeypatch.delenv("TOLLGATE_TEST_PROVIDER_KEY", raising=False)
    provider = world.providers["openai"]
    provider.api_key_env = "TOLLGATE_TEST_PROVIDER_KEY"
    provider.save()
    with pytest.raises(openai.InternalServerError) as caught:
        call_with_mock(world, {})
    assert caught.value.code == "upstream_not_configured"
    assert "TOLLGATE_TEST_PROVIDER_KEY" not in str(caught.value)


PROVIDER_SECRET = "sk-7Qm2Zx9Lp4Wv8Rt6Yb3Nc5Hd1Jf0Kg7Ts2Ae9"


def _leaks(text: str) -> bool:
    """Whether any 8 characters of the provider's key appear in `text`."""
    return any(PROVIDER_SECRET[i : i + 8] in text for i in range(len(PROVIDER_SECRET) - 7))


@pytest.mark.parametrize(
    ("mock", "stream"),
    [
        ({"status": 400}, False),
        ({"status": 400}, True),
        ({"status": 401}, False),
        ({"status": 403}, True),
    ],
)
def test_a_provider_error_quoting_the_gateways_key_gives_it_to_nobody(
    world, monkeypatch, caplog, mock, stream
):
    # The key as a mounted secret file leaves it, with a line end: still sent, trimmed.
    monkeypatch.setenv("TOLLGATE_TEST_PROVIDER_KEY", PROVIDER_SECRET + "\n")
    provider = world.providers["openai"]
    provider.api_key_env = "TOLLGATE_TEST_PROVIDER_KEY"
    provider.save()
    mock = {**mock, "error_code": PROVIDER_SECRET, "error_param": f"key {PROVIDER_SECRET}"}

    with caplog.at_level(logging.DEBUG), pytest.raises(openai.APIStatusError) as caught:
        call_with_mock(world, mock, stream=stream)

    error = caught.value
    assert error.status_code == (400 if mock["status"] == 400 else 502)
    assert not _leaks(json.dumps(error.body)), error.body
    assert not _leaks(only_event().error_code)
    assert not _leaks(caplog.text)


def test_a_provider_message_quoting_the_key_at_its_length_limit_keeps_none_of_it(
    world, monkeypatch
):
    monkeypatch.setenv("TOLLGATE_TEST_PROVIDER_KEY", PROVIDER_SECRET)
    provider = world.providers["openai"]
    provider.api_key_env = "TOLLGATE_TEST_PROVIDER_KEY"
    # A message cut at 2,000 characters inside the key, as it was before the redaction.
    for error in (
        {"message": "x" * 1990 + " Bearer " + PROVIDER_SECRET, "code": PROVIDER_SECRET},
        "x" * 1990 + " Bearer " + PROVIDER_SECRET,
    ):
        failure = upstream_error_failure(error, provider)
        assert not _leaks(json.dumps(failure.error.body()))


def test_error_mid_stream_reaches_the_sdk_as_an_api_error(world):
    with pytest.raises(openai.APIError, match="mid-stream"):
        call_with_mock(world, {"error_after": 2, "chunks": 5}, stream=True)
    event = only_event()
    assert event.status == UsageEvent.Status.UPSTREAM_ERROR
    # What was relayed is billed as an estimate; no provider usage ever came.
    assert event.usage_source == UsageEvent.Source.ESTIMATED
    assert event.output_tokens == 2


def test_connection_cut_mid_stream_reaches_the_sdk_as_an_api_error(world):
    with pytest.raises(openai.APIError):
        call_with_mock(world, {"cut_after": 3, "chunks": 5}, stream=True)
    event = only_event()
    assert event.status == UsageEvent.Status.UPSTREAM_ERROR
    assert event.output_tokens == 3


def test_stream_the_provider_ends_early_without_saying_so_is_an_error_not_an_answer(world):
    # The body ends cleanly after two chunks: no finish_reason, no usage, no [DONE].
    received = []
    stream = world.client().chat.completions.create(
        model="m-openai",
        messages=MESSAGES,
        stream=True,
        extra_body={"mock": {"end_after": 2, "chunks": 5}},
    )
    with pytest.raises(openai.APIError, match="ended the stream before it finished"):
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert len(received) == 2
    event = only_event()
    assert event.status == UsageEvent.Status.UPSTREAM_ERROR
    assert event.usage_source == UsageEvent.Source.ESTIMATED
    assert event.output_tokens == 2


def test_stream_that_finished_but_had_no_done_is_a_whole_answer(world):
    # Past the content, end_after closes after the finishing and usage chunks, before
    # [DONE]: the provider said why it stopped and what it used, so the answer is whole.
    chunks = call_with_mock(world, {"end_after": 6, "chunks": 5}, stream=True)
    assert chunks[-1].choices[0].finish_reason == "stop"
    event = only_event()
    assert event.status == UsageEvent.Status.OK
    assert event.usage_source == UsageEvent.Source.PROVIDER
    assert event.output_tokens == 5


def _chunked(body: bytes):
    # A generator body: httpx sends it with Transfer-Encoding: chunked, no Content-Length.
    yield body[:10]
    yield body[10:]


def test_a_chunked_request_body_is_read_like_any_other(world, gunicorn_gateway):
    body = json.dumps({"model": "m-openai", "messages": MESSAGES}).encode()
    response = httpx2.post(
        f"{gunicorn_gateway.url}/chat/completions",
        content=_chunked(body),
        headers={"Authorization": f"Bearer {world.secret}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].startswith("Mock reply")
    assert UsageEvent.objects.get().request_id == response.headers["x-request-id"]


def test_a_chunked_request_body_over_the_limit_is_a_413(world, django_db_setup):
    gateway = gunicorn_gateway_start(conftest.test_database_url(), TOLLGATE_MAX_BODY_BYTES="1000")
    try:
        content = json.dumps(
            {"model": "m-openai", "messages": [{"role": "user", "content": "x" * 2000}]}
        )
        response = httpx2.post(
            f"{gateway.url}/chat/completions",
            content=_chunked(content.encode()),
            headers={"Authorization": f"Bearer {world.secret}"},
            timeout=30,
        )
    finally:
        gateway.stop()
    assert_openai_error(response, 413, code="request_too_large")
    assert UsageEvent.objects.count() == 0


def test_a_gateway_fault_mid_stream_is_an_error_event_not_a_cut(world, monkeypatch):
    absorb = proxy._StreamState.absorb

    def fails_on_the_third_chunk(state, chunk):
        if state.pieces == 2:
            raise RuntimeError("a bug of the gateway's own")
        return absorb(state, chunk)

    monkeypatch.setattr(proxy._StreamState, "absorb", fails_on_the_third_chunk)
    with pytest.raises(openai.APIError, match="The relay failed"):
        call_with_mock(world, {"chunks": 5}, stream=True)
    event = only_event()
    assert event.status == UsageEvent.Status.UPSTREAM_ERROR
    assert event.error_code == "gateway_error"


@contextlib.contextmanager
def canned_upstream(world, payload: bytes, content_type: str = "text/event-stream"):
    """The world's provider pointed at a server that answers every call with `payload`."""

    class Canned(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        provider = world.providers["openai"]
        provider.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        provider.save()
        yield
    finally:
        server.shutdown()
        server.server_close()


def sse(*events: dict | str) -> bytes:
    return b"".join(
        (e if isinstance(e, str) else f"data: {json.dumps(e)}\n\n").encode() for e in events
    )


def test_a_malformed_first_stream_event_is_a_502_before_the_stream_begins(world):
    with (
        canned_upstream(world, b"data: oops\n\ndata: [DONE]\n\n"),
        pytest.raises(openai.InternalServerError) as caught,
    ):
        call_with_mock(world, {}, stream=True)
    assert caught.value.status_code == 502
    assert "malformed stream event" in caught.value.message
    assert only_event().status == UsageEvent.Status.UPSTREAM_ERROR


def chunk(content: str | None, **fields) -> dict:
    delta = {"content": content} if content is not None else {}
    return {
        "id": "c-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        **fields,
    }


ERROR_EVENT = 'event: error\ndata: {"type": "error", "message": "overloaded"}\n\n'


def test_an_sse_error_event_as_the_first_event_is_a_502_with_the_providers_message(world):
    with (
        canned_upstream(world, sse(ERROR_EVENT)),
        pytest.raises(openai.InternalServerError) as caught,
    ):
        call_with_mock(world, {}, stream=True)
    assert caught.value.status_code == 502
    assert "overloaded" in caught.value.message
    assert only_event().status == UsageEvent.Status.UPSTREAM_ERROR


def test_an_sse_error_event_mid_stream_ends_it_with_the_providers_message(world):
    received = []
    with canned_upstream(world, sse(chunk("Hel"), ERROR_EVENT, "data: [DONE]\n\n")):
        client = world.client()
        with pytest.raises(openai.APIError, match="overloaded"):
            for piece in client.chat.completions.create(
                model="m-openai", messages=MESSAGES, stream=True
            ):
                received.append(piece)
    # Only the real chunk reached the client, not the error's payload dressed as one.
    assert [p.choices[0].delta.content for p in received] == ["Hel"]
    assert only_event().status == UsageEvent.Status.UPSTREAM_ERROR


def test_a_stream_whose_first_chunk_has_empty_ids_still_has_one_id_and_time(world):
    # A content filter's first chunk, as some unified endpoints send it.
    prefilter = {**chunk(None), "id": "", "object": "", "created": 0, "choices": []}
    prefilter["prompt_filter_results"] = [{"prompt_index": 0}]
    finish = chunk(None)
    finish["choices"][0]["finish_reason"] = "stop"
    usage = {**chunk(None), "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    payload = sse(prefilter, chunk("Hi"), finish, usage, "data: [DONE]\n\n")
    with canned_upstream(world, payload):
        pieces = list(
            world.client().chat.completions.create(
                model="m-openai",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert len(pieces) == 4  # the filter chunk, the content, the finish, the usage
    assert len({p.id for p in pieces}) == 1 and pieces[0].id
    assert {p.object for p in pieces} == {"chat.completion.chunk"}
    assert len({p.created for p in pieces}) == 1 and pieces[0].created > 1_700_000_000
    assert pieces[-1].usage.completion_tokens == 1


def test_a_plain_answer_without_id_or_time_gets_the_gateways_own(world):
    answer = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    with canned_upstream(world, json.dumps(answer).encode(), "application/json"):
        completion = call_with_mock(world, {})
    assert completion.id == f"chatcmpl-{completion._request_id}"
    assert completion.created > 1_700_000_000
    assert completion.object == "chat.completion"


def test_an_error_in_a_200_answer_is_a_502_with_the_providers_message(world):
    answer = {"error": {"message": "model is overloaded", "code": "overloaded"}}
    with (
        canned_upstream(world, json.dumps(answer).encode(), "application/json"),
        pytest.raises(openai.InternalServerError) as caught,
    ):
        call_with_mock(world, {})
    assert caught.value.status_code == 502
    assert caught.value.body["message"] == "The upstream provider failed: model is overloaded"
    assert caught.value.code == "overloaded"
    assert only_event().upstream_status == 200


@pytest.mark.django_db
def test_a_wrong_path_is_an_openai_404_with_debug_on_too(client):
    with override_settings(DEBUG=True):
        response = client.post("/chat/completions", {}, content_type="application/json")
        admin = client.get("/admin")
    assert response.status_code == 404
    assert response.json()["error"]["message"].startswith("Invalid URL (POST /chat/completions)")
    assert admin.status_code == 301  # the admin's own redirect to /admin/ still works


@pytest.mark.django_db
def test_a_host_the_gateway_does_not_serve_is_an_openai_400_with_debug_on_too(client, caplog):
    secret = "tg-" + "k" * 43
    headers = {"HTTP_HOST": "gateway.example", "HTTP_AUTHORIZATION": f"Bearer {secret}"}
    with override_settings(DEBUG=True):
        chat = client.post("/v1/chat/completions", {}, content_type="application/json", **headers)
        models = client.get("/v1/models", **headers)
        no_v1 = client.get("/models", **headers)
        admin = client.get("/admin/", **headers)
        management = client.get("/api/tenants/", **headers)
    for response in (chat, models, no_v1):
        assert response.status_code == 400
        assert response.json() == {
            "error": {
                "message": "The Host header names no host this gateway serves (ALLOWED_HOSTS).",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
        assert response["x-request-id"].startswith("req_")
        assert secret not in response.content.decode()
        assert "gateway.example" not in response.content.decode()
    # The admin and /api/ keep Django's debug page, as for a 404; the console still says
    # what to allow, for every one.
    for response in (admin, management):
        assert response.status_code == 400 and response["Content-Type"].startswith("text/html")
    logged = [r for r in caplog.records if r.name == "django.security.DisallowedHost"]
    assert len(logged) == 5 and "add 'gateway.example' to ALLOWED_HOSTS" in logged[0].getMessage()
