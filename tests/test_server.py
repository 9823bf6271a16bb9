"""The production server's worker class (config.workers): it heartbeats once a second
instead of on every turn of its loop, and gunicorn's master must still see it alive; what
gunicorn refuses before the application sees it is answered in OpenAI's error shape; a
kept-alive connection's next request is served by the thread that waits for it, without
that wait starving other connections of threads."""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import httpx2
from gunicorn.config import Config
from gunicorn.http import wsgi

from config.workers import OneWriteResponse

from . import conftest
from .upstream import gunicorn_gateway_start


def _workers(master_pid: int) -> set[int]:
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process is gone
            continue
        if int(fields[1]) == master_pid:  # the parent's pid
            children.add(int(stat.parent.name))
    return children


def _answers(url: str) -> int:
    try:
        urllib.request.urlopen(f"{url}/models", timeout=5)  # noqa: S310  (our own URL)
    except urllib.error.HTTPError as refused:
        return refused.code
    return 200


def test_idle_workers_outlive_the_worker_timeout(django_db_setup):
    # A master that stopped hearing from its workers kills and replaces them after
    # `timeout` seconds: with a 2 s timeout, 5 s idle would see them replaced.
    gateway = gunicorn_gateway_start(conftest.test_database_url(), GUNICORN_TIMEOUT="2")
    try:
        workers = _workers(gateway.process.pid)
        assert len(workers) == 2
        time.sleep(5)
        assert _answers(gateway.url) == 401  # no key: it answers, and refuses
        assert _workers(gateway.process.pid) == workers
    finally:
        gateway.stop()


def test_a_url_or_headers_over_the_servers_limits_get_an_openai_error_not_html(
    gunicorn_gateway,
):
    too_long = httpx2.get(f"{gunicorn_gateway.url}/models/{'x' * 10_000}", timeout=10)
    too_big = httpx2.get(
        f"{gunicorn_gateway.url}/models",
        headers={"Authorization": "Bearer tg-not-a-key", "X-Padding": "y" * 9_000},
        timeout=10,
    )
    for response, status, code in (
        (too_long, 414, "uri_too_long"),
        (too_big, 431, "headers_too_large"),
    ):
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-request-id"].startswith("req_")
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == code
    assert "tg-not-a-key" not in too_big.text and "yyyy" not in too_big.text


def _connection(url: str) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)


def _models_status(connection: http.client.HTTPConnection) -> int:
    """GET /v1/models without a key on a kept-alive connection: its status (401)."""
    connection.request("GET", "/v1/models")
    response = connection.getresponse()
    response.read()
    assert response.getheader("content-type") == "application/json"
    return response.status


def test_a_kept_alive_connection_is_answered_whenever_its_next_request_comes(
    django_db_setup,
):
    gateway = gunicorn_gateway_start(
        conftest.test_database_url(), GUNICORN_WORKERS="1", GUNICORN_KEEPALIVE_LINGER_MS="200"
    )
    try:
        connection = _connection(gateway.url)
        sock_before = None
        # At once (the thread waiting for it serves it), after the wait (the main
        # loop's poller hands it to a thread), and at once again.
        for pause in (0, 0, 0.5, 0):
            time.sleep(pause)
            assert _models_status(connection) == 401
            sock_before = sock_before or connection.sock
            assert connection.sock is sock_before  # one connection throughout
        connection.close()  # closed while a thread waits on it

        # Two requests in one write (pipelined): two answers, in order.
        host = urllib.parse.urlsplit(gateway.url)
        with socket.create_connection((host.hostname, host.port), timeout=10) as raw:
            request = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            raw.sendall(request + request.replace(b"/v1/models", b"/v1/nowhere"))
            received = b""
            while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}"):
                chunk = raw.recv(65536)
                assert chunk, received
                received += chunk
        first, second = received.split(b"HTTP/1.1 ")[1:]
        assert first.startswith(b"401") and second.startswith(b"404")

        assert _models_status(_connection(gateway.url)) == 401  # still serving
    finally:
        gateway.stop()


def test_threads_waiting_on_idle_connections_never_leave_a_new_request_unserved(
    django_db_setup,
):
    # Two threads, a 5 s wait: one thread may wait on its connection, the other must go
    # back to serving, so a third connection is answered at once, not after 5 s.
    gateway = gunicorn_gateway_start(
        conftest.test_database_url(),
        GUNICORN_WORKERS="1",
        GUNICORN_THREADS="2",
        GUNICORN_KEEPALIVE_LINGER_MS="5000",
    )
    try:
        first, second, third = (_connection(gateway.url) for _ in range(3))
        assert _models_status(first) == 401
        assert _models_status(second) == 401
        started = time.monotonic()
        assert _models_status(third) == 401
        assert time.monotonic() - started < 2.5
        for connection in (first, second, third):
            connection.close()
    finally:
        gateway.stop()


class _Socket:
    """Records what a response writes, one entry per sendall."""

    def __init__(self):
        self.writes: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.writes.append(bytes(data))


class _Request:
    version = (1, 1)
    method = "POST"

    def should_close(self) -> bool:
        return False


def _respond(response_class, headers: list[tuple[str, str]], body: list[bytes]) -> list[bytes]:
    sock = _Socket()
    response = response_class(_Request(), sock, Config())
    response.start_response("200 OK", headers)
    for piece in body:
        response.write(piece)
    response.close()
    return sock.writes


def _undated(response: bytes) -> bytes:
    return b"\r\n".join(line for line in response.split(b"\r\n") if not line.startswith(b"Date:"))


def test_a_sized_answer_leaves_in_one_write_headers_and_body_together():
    sized = [("Content-Type", "application/json"), ("Content-Length", "11")]
    (write,) = _respond(OneWriteResponse, sized, [b'{"ok":true}'])
    head, body = write.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Length: 11" in head and body == b'{"ok":true}'
    # What gunicorn's own response sends, in two writes.
    stock = _respond(wsgi.Response, sized, [b'{"ok":true}'])
    assert len(stock) == 2 and _undated(b"".join(stock)) == _undated(write)

    # A stream (no length: chunked) goes as gunicorn sends it: headers at once.
    streamed = _respond(OneWriteResponse, [("Content-Type", "text/event-stream")], [b"data: 1"])
    assert b"Transfer-Encoding: chunked\r\n" in streamed[0]
    assert streamed[0].endswith(b"\r\n\r\n")
    assert streamed[1:] == [b"7\r\ndata: 1\r\n", b"0\r\n\r\n"]
