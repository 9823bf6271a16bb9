"""The production server's worker class (config.workers): it heartbeats once a second
instead of on every turn of its loop, and gunicorn's master must still see it alive; what
gunicorn refuses before the application sees it is answered in OpenAI's error shape; a
kept-alive connection's next request is served by the thread that waits for it, without
that wait starving other connections of threads."""

from __future__ import annotations

import http.client
import json
import re
import secrets
import socket
import string
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import httpx2
from gunicorn.config import Config
from gunicorn.http import errors, wsgi

from config.workers import GatewayThreadWorker, OneWriteResponse, refusal_for
from tenants.services import api_key_issue, tenant_create

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


def _key_like() -> str:
    return "tg-" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(43))


def _leaks(text: str, *keys: str) -> list[str]:
    """Every 8 characters in a row of a key's random part that `text` holds."""
    return [
        key[i : i + 8] for key in keys for i in range(3, len(key) - 7) if key[i : i + 8] in text
    ]


def _exchange(url: str, raw: bytes) -> bytes:
    """`raw` sent on a connection of its own: all the server answers until it closes."""
    host = urllib.parse.urlsplit(url)
    with socket.create_connection((host.hostname, host.port), timeout=10) as sock:
        sock.sendall(raw)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _answer(received: bytes) -> tuple[int, dict[str, str], dict]:
    """Status, headers (names in lower case) and JSON body of the one answer received;
    nothing may follow it."""
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = (line.split(":", 1) for line in lines)
    headers = {name.strip().lower(): value.strip() for name, value in fields}
    assert headers["content-type"] == "application/json", received
    assert len(body) == int(headers["content-length"]), received  # one answer only
    return int(status_line.split()[1]), headers, json.loads(body)


def _gateway_with_logs(tmp_path: Path, level: str = "info"):
    """The production server with its access log on and its logs at `level`, written to
    a file: (gateway, log file)."""
    log = tmp_path / "gunicorn.log"
    gateway = gunicorn_gateway_start(
        conftest.test_database_url(),
        output=log,
        GUNICORN_WORKERS="1",
        GUNICORN_ACCESSLOG="-",
        GUNICORN_LOGLEVEL=level,
        LOG_LEVEL=level.upper(),
    )
    return gateway, log


def test_a_request_the_server_cannot_parse_gets_an_openai_error_quoting_nothing_of_it(
    django_db_setup, transactional_db, tmp_path
):
    # gunicorn's own page and log line quote what they could not parse: the rest of a
    # key after a line break, a whole header line, the request line, a chunk's size line.
    key = _key_like()  # what a client sent, in the wrong place
    valid = api_key_issue(tenant=tenant_create(slug="acme", name="Acme"), name="k").secret
    host = "Host: 127.0.0.1\r\n"
    chunked = (
        f"POST /v1/chat/completions HTTP/1.1\r\n{host}Authorization: Bearer {valid}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    get = f"GET /v1/models HTTP/1.1\r\n{host}"
    # name: (request, status, code, kind of error logged; None: the application answered)
    cases = {
        "line break in a key": (
            f"{get}Authorization: Bearer {key[:20]}\r\n{key[20:]}\r\n\r\n",
            400,
            "invalid_header",
            "InvalidHeader",
        ),
        "header line without a name": (
            f"{get}Bearer {key}\r\n\r\n",
            400,
            "invalid_header",
            "InvalidHeader",
        ),
        "invalid header name": (
            f"{get}Authorization Bearer {key}: x\r\n\r\n",
            400,
            "invalid_header",
            "InvalidHeaderName",
        ),
        "header folded onto the next line": (
            f"{get}Authorization: Bearer {key[:20]}\r\n {key[20:]}\r\n\r\n",
            400,
            "invalid_header",
            "ObsoleteFolding",
        ),
        "invalid request line": (
            f"GET /v1/models?api_key={key}\r\n{host}\r\n",
            400,
            "invalid_request_line",
            "InvalidRequestLine",
        ),
        "invalid method": (
            f"{key} /v1/models HTTP/1.1\r\n{host}\r\n",
            400,
            "invalid_method",
            "InvalidRequestMethod",
        ),
        "invalid HTTP version": (
            f"GET /v1/models HTTP/1.1 {key}\r\n{host}\r\n",
            400,
            "invalid_http_version",
            "InvalidHTTPVersion",
        ),
        "unsupported transfer coding": (
            f"POST /v1/chat/completions HTTP/1.1\r\n{host}Transfer-Encoding: {key}\r\n\r\n",
            501,
            "unsupported_transfer_coding",
            "UnsupportedTransferCoding",
        ),
        "unmet expectation": (
            f"{get}Expect: {key}\r\n\r\n",
            417,
            "expectation_failed",
            "ExpectationFailed",
        ),
        # Read by the application: its 400, and no unhandled error logged with the chunk.
        "invalid chunk size": (f"{chunked}{key}\r\n", 400, "invalid_chunked_body", None),
        "chunk without its line end": (
            f"{chunked}5\r\nhello{key}\r\n0\r\n\r\n",
            400,
            "invalid_chunked_body",
            None,
        ),
        # Left unread by the application (no key: 401), then read by gunicorn to keep the
        # connection: its answer stands alone (no second one), and the connection closes.
        "invalid chunk size after the answer": (
            chunked.replace(f"Authorization: Bearer {valid}\r\n", "") + f"{key}\r\n",
            401,
            "missing_api_key",
            None,
        ),
    }
    gateway, log = _gateway_with_logs(tmp_path)
    try:
        for name, (request, status, code, kind) in cases.items():
            received = _exchange(gateway.url, request.encode())
            answered, headers, body = _answer(received)
            assert answered == status, name
            assert set(body["error"]) == {"message", "type", "param", "code"}, name
            assert body["error"]["code"] == code, name
            assert headers["x-request-id"].startswith("req_"), name
            assert not _leaks(received.decode("latin-1"), key, valid), name
            if kind is not None:  # the worker's answer (the application's cannot say it)
                assert headers["connection"] == "close", name
    finally:
        gateway.stop()

    logged = log.read_text()
    assert not _leaks(logged, key, valid), logged
    for name, (_, status, _, kind) in cases.items():
        if kind is not None:
            line = f"[WARNING] Refused a request from 127.0.0.1: {kind} (answered {status})"
            assert line in logged, name
    assert "InvalidChunkSize (after its answer; connection closed)" in logged
    assert "Unhandled error" not in logged and "Traceback" not in logged


def test_the_access_log_holds_no_query_string_and_a_path_as_sent(django_db_setup, tmp_path):
    key = _key_like()
    gateway, log = _gateway_with_logs(tmp_path)
    try:
        for target in (f"/v1/models?api_key={key}", "/v1/models%0A127.0.0.1%20forged"):
            request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            _answer(_exchange(gateway.url, request.encode()))
    finally:
        gateway.stop()

    logged = log.read_text()
    assert not _leaks(logged, key), logged
    assert '127.0.0.1 "GET /v1/models HTTP/1.1" 401 ' in logged
    # PATH_INFO, gunicorn's path, is decoded: its line break would start a line.
    assert '127.0.0.1 "GET /v1/models%0A127.0.0.1%20forged HTTP/1.1" 404 ' in logged
    assert "\n127.0.0.1 forged" not in logged


def test_a_client_hanging_up_mid_request_is_not_quoted_even_at_debug_level(
    django_db_setup, tmp_path
):
    key = _key_like()
    gateway, log = _gateway_with_logs(tmp_path, level="debug")
    try:
        host = urllib.parse.urlsplit(gateway.url)
        with socket.create_connection((host.hostname, host.port), timeout=10) as sock:
            # Headers cut short, then the client's side closed: nothing to answer.
            sock.sendall(f"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {key}\r\n".encode())
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(65536) == b""
        deadline = time.monotonic() + 10
        while "premature client disconnection" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        gateway.stop()

    logged = log.read_text()
    assert not _leaks(logged, key), logged
    assert re.search(r"No more data after \d+ bytes of a request \(not quoted\)", logged)


class _LogRecorder:
    def __init__(self):
        self.lines: list[str] = []

    def exception(self, msg, *args):
        self.lines.append(msg % args)

    error = warning = exception


def test_an_error_of_the_servers_own_is_a_500_in_openais_shape_naming_no_query():
    # What no client can cause (the application sending a header HTTP forbids, a fault
    # of the server's): OpenAI's 500, and the log names the path, never the query.
    key = _key_like()
    worker = GatewayThreadWorker.__new__(GatewayThreadWorker)
    worker.log = _LogRecorder()
    request = _Request()
    request.uri, request.path = f"/v1/models?api_key={key}", "/v1/models"
    ours, theirs = socket.socketpair()
    with ours, theirs:
        worker.handle_error(
            request, ours, ("127.0.0.1", 5000), errors.InvalidResponseHeader("X-Bad\n")
        )
        ours.close()
        received = theirs.recv(65536)

    status, headers, body = _answer(received)
    assert status == 500
    assert body["error"] == {
        "message": "The gateway failed to process the request.",
        "type": "api_error",
        "param": None,
        "code": None,
    }
    assert headers["x-request-id"].startswith("req_")
    assert worker.log.lines == ["Error handling request POST /v1/models"]


def test_every_parse_error_of_gunicorns_has_a_fixed_answer_with_gunicorns_status():
    statuses = {
        errors.LimitRequestLine: 414,
        errors.LimitRequestHeaders: 431,
        errors.UnsupportedTransferCoding: 501,
        errors.ExpectationFailed: 417,
        errors.ForbiddenProxyRequest: 403,
        errors.ConfigurationProblem: 500,
    }
    kinds = [
        kind
        for kind in vars(errors).values()
        if isinstance(kind, type) and issubclass(kind, errors.ParseException)
    ]
    assert len(kinds) > 15
    for kind in kinds:
        refusal = refusal_for(kind.__new__(kind))
        if kind in (errors.InvalidResponseHeader, errors.InvalidResponseHeaderName):
            assert refusal is None  # the application's fault: gunicorn's 500
            continue
        assert refusal is not None, kind
        assert refusal[0] == statuses.get(kind, 400), kind

    class Later(errors.ParseException):  # a kind a later gunicorn may add
        pass

    assert refusal_for(Later())[0] == 400
    assert refusal_for(ValueError("not a parse error")) is None


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
