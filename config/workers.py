"""The gunicorn worker class the gateway runs on (platform/gunicorn.conf.py)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import threading
import time

from gunicorn import util
from gunicorn.http import wsgi
from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine
from gunicorn.workers.gthread import ThreadWorker

# What gunicorn refuses before the application sees the request, answered in OpenAI's
# error shape instead of gunicorn's HTML page: (status, reason, code, message).
_REFUSALS = (
    (
        LimitRequestLine,
        (
            414,
            "URI Too Long",
            "uri_too_long",
            "The request line (method and URL) is longer than this gateway accepts.",
        ),
    ),
    (
        LimitRequestHeaders,
        (
            431,
            "Request Header Fields Too Large",
            "headers_too_large",
            "The request's headers are larger, or more, than this gateway accepts.",
        ),
    ),
)


class OneWriteResponse(wsgi.Response):
    """gunicorn's HTTP/1 response, sending its headers in the same write as its body when
    the body's length is known (a plain completion, any error).

    gunicorn writes the headers, then the body: two TCP segments, and a client that
    wakes for each. One write saved about 0.21 ms per plain call at concurrency 1 in
    bench.compare. Streams (no length: chunked) and files (sendfile) are sent as
    gunicorn sends them, headers first.
    """

    def write(self, arg):
        if (
            self.headers_sent
            or self.chunked
            or self._omits_body
            or self.response_length is None
            or not isinstance(arg, bytes)
            or len(arg) > self.response_length
        ):
            super().write(arg)
            return
        # The head as gunicorn's send_headers builds it.
        head = self.default_headers()
        head.extend(f"{name}: {value}\r\n" for name, value in self.headers)
        self.headers_sent = True
        self.sent += len(arg)
        util.write(self.sock, ("".join(head) + "\r\n").encode("latin-1") + arg)


class GatewayThreadWorker(ThreadWorker):
    """gunicorn's threaded worker, heartbeating at most once a second, serving a
    kept-alive connection's next request in the thread that answered its last one when
    that request comes promptly, and writing a sized response in one write
    (OneWriteResponse).

    The stock worker tells the master it is alive on every turn of its event loop, a
    system call (utime on a temporary file) two or three times per request: 2% of the
    gateway's CPU in `bench.profile`. The master only needs to hear from it once per
    `timeout` (120 s here), which gunicorn's own docs leave to the worker to arrange.

    The stock worker hands every kept-alive connection back to its main loop after each
    answer: the thread wakes the main loop through a pipe, the main loop registers the
    socket with its poller, wakes on the next request and submits it to the thread pool,
    which wakes a thread again. On this machine those hand-offs cost about 0.35 ms per
    request (bench.compare, concurrency 1). Here the thread first waits up to
    GUNICORN_KEEPALIVE_LINGER_MS (25) for the connection's next request and serves it
    itself; a client that sends its calls one after another (a batch job, an agent's
    loop, a pooled client under load) skips the hand-offs. The wait holds a thread but
    no CPU; at most a quarter of the threads wait at once, so lingering never starves
    new connections of threads; 0 turns it off.
    """

    HEARTBEAT_SECONDS = 1.0
    _heartbeat_at = float("-inf")

    def init_process(self) -> None:
        # gthread builds each response with gunicorn.http.wsgi.create, which takes the
        # module's Response class; in this worker's process, that is OneWriteResponse.
        wsgi.Response = OneWriteResponse
        self.linger_ms = int(os.environ.get("GUNICORN_KEEPALIVE_LINGER_MS", "25"))
        self._lingering_max = max(1, self.cfg.threads // 4)
        self._lingering = 0
        self._lingering_lock = threading.Lock()
        super().init_process()

    def handle(self, conn):
        while True:
            keep = super().handle(conn)
            if keep is not True or not self.alive:
                return keep
            if conn.parser.unreader.buf.getvalue():
                continue  # the next request is already read (pipelined)
            if not self._next_request_arrives(conn.sock):
                return keep  # back to the main loop's poller, as gunicorn does

    def _next_request_arrives(self, sock) -> bool:
        """Whether `sock` becomes readable within the linger (a request, or the client
        closing: either is this thread's to handle)."""
        if self.linger_ms <= 0:
            return False
        with self._lingering_lock:
            if self._lingering >= self._lingering_max:
                return False
            self._lingering += 1
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(self.linger_ms))
        except (OSError, ValueError):
            return False
        finally:
            with self._lingering_lock:
                self._lingering -= 1

    def notify(self) -> None:
        now = time.monotonic()
        if now - self._heartbeat_at >= self.HEARTBEAT_SECONDS:
            self._heartbeat_at = now
            super().notify()

    def handle_error(self, req, client, addr, exc) -> None:
        """A request line or headers over gunicorn's limits: a JSON error with an
        x-request-id, like every other answer, and nothing of the request echoed (it
        may carry a key). Anything else as gunicorn answers it."""
        refusal = next((r for kind, r in _REFUSALS if isinstance(exc, kind)), None)
        if refusal is None:
            super().handle_error(req, client, addr, exc)
            return
        from routing.middleware import request_id_new

        status, reason, code, message = refusal
        self.log.warning("Refused a request from %s: %s", (addr or ("",))[0], reason)
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        body = json.dumps({"error": error}).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"x-request-id: {request_id_new()}\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            util.write_nonblock(client, head.encode() + body)
