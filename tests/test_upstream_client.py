"""What a provider receives from the gateway: its own key, the request as the client sent
it, and none of the SDK's telemetry headers (the gateway's OS, CPU, Python and SDK
versions are nothing a provider needs to know)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from routing.errors import InvalidRequest, UpstreamFailed
from routing.models import Provider
from routing.proxy import UPSTREAM_ERRORS
from routing.upstream import (
    chat_completion,
    chat_completion_stream,
    upstream_client,
    upstream_failure,
)

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


class _Recorder(BaseHTTPRequestHandler):
    """Answers chat completions (plain or a one-chunk stream) and keeps what it received."""

    protocol_version = "HTTP/1.1"
    received: list[tuple[dict[str, str], dict]]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        if "answer_status" in body:
            # An error that quotes the credential it was sent, as some providers' 400s do.
            message = f"Incorrect API key provided: {self.headers['Authorization']}"
            payload = json.dumps({"error": {"message": message, "code": "bad"}}).encode()
            self.send_response(body["answer_status"])
            if "retry_after" in body:
                self.send_header("Retry-After", str(body["retry_after"]))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if body.get("stream"):
            chunk = {**COMPLETION, "object": "chat.completion.chunk", "choices": []}
            payload = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
            content_type = "text/event-stream"
        else:
            payload = json.dumps(COMPLETION).encode()
            content_type = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def recorder():
    received: list[tuple[dict[str, str], dict]] = []
    handler = type("Recorder", (_Recorder,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", received
    server.shutdown()
    server.server_close()


@pytest.fixture
def provider(db, recorder, monkeypatch):
    monkeypatch.setenv("RECORDER_API_KEY", "sk-provider-secret")
    return Provider.objects.create(
        name="recorder", base_url=recorder[0], api_key_env="RECORDER_API_KEY"
    )


# What the SDK would send about the gateway's machine and its own state.
TELEMETRY = {
    "x-stainless-lang",
    "x-stainless-package-version",
    "x-stainless-os",
    "x-stainless-arch",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-async",
    "x-stainless-retry-count",
    "x-stainless-read-timeout",
}

BODY = {
    "model": "upstream-model",
    "messages": [{"role": "user", "content": "Hello"}],
    "enable_thinking": False,
}


def test_a_plain_call_carries_the_provider_key_and_no_sdk_telemetry(provider, recorder):
    content = chat_completion(upstream_client(provider), BODY, timeout=5.0)

    assert json.loads(content) == COMPLETION
    ((headers, body),) = recorder[1]
    assert headers["authorization"] == "Bearer sk-provider-secret"
    assert body == BODY
    assert TELEMETRY & set(headers) == set()
    assert [name for name in headers if name.startswith("x-stainless")] == []


def test_a_stream_carries_the_provider_key_and_no_sdk_telemetry(provider, recorder):
    stream = chat_completion_stream(upstream_client(provider), {**BODY, "stream": True})
    try:
        events = list(stream.events())
    finally:
        stream.close()

    assert events[-1] == "[DONE]"
    ((headers, body),) = recorder[1]
    assert headers["authorization"] == "Bearer sk-provider-secret"
    assert body["stream"] is True and body["enable_thinking"] is False
    # The SDK's streaming mode marks its own request (x-stainless-raw-response); nothing
    # about the machine goes out.
    assert TELEMETRY & set(headers) == set()


def _failure(provider, **answer):
    with pytest.raises(UPSTREAM_ERRORS) as caught:
        chat_completion(upstream_client(provider), {**BODY, **answer}, timeout=5.0)
    return upstream_failure(caught.value, provider)


def test_a_provider_400_reaches_the_client_in_its_words_but_without_the_gateways_key(
    provider,
):
    failure = _failure(provider, answer_status=400)
    assert isinstance(failure.error, InvalidRequest)
    assert failure.error.message == "Incorrect API key provided: Bearer [redacted]"
    assert "sk-provider-secret" not in json.dumps(failure.error.body())


@pytest.mark.parametrize(("status", "retry_after"), [(503, "3"), (500, None)])
def test_a_provider_5xx_keeps_its_retry_after_for_the_clients_backoff(
    provider, status, retry_after
):
    answer = {"answer_status": status}
    if retry_after:
        answer["retry_after"] = retry_after
    failure = _failure(provider, **answer)
    assert isinstance(failure.error, UpstreamFailed)
    assert failure.upstream_status == status
    assert failure.error.headers == ({"Retry-After": retry_after} if retry_after else {})
