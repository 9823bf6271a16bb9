"""The gunicorn worker and logger classes the gateway runs on (platform/gunicorn.conf.py)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import ssl
import threading
import time

from gunicorn import glogging, util
from gunicorn.http import errors, wsgi
from gunicorn.workers.gthread import ThreadWorker

from config import lifecycle

# What a stream cut at a stop keeps of gunicorn's graceful timeout to write its ledger
# row, send its error event and let its thread end.
STOP_MARGIN_SECONDS = 5

# What gunicorn refuses while reading a request (its gunicorn.http.errors), answered in
# OpenAI's error shape instead of gunicorn's HTML page, which quotes the offending part
# of the request (a header line, the request line, a chunk's size line: a key, if the
# client put one there): (status, reason, code, message), the message fixed per kind.
# The first match wins: a subclass before its base. gunicorn's statuses, 400 otherwise.
_BAD_BODY = (
    400,
    "Bad Request",
    "invalid_chunked_body",
    "The request body's chunked encoding is malformed.",
)
_FAILED = (500, "Internal Server Error", None, "The gateway failed to process the request.")
_BAD_PROXY = (
    400,
    "Bad Request",
    "invalid_proxy_protocol",
    "The PROXY protocol header is malformed.",
)
_REFUSALS: tuple[tuple[type[Exception], tuple[int, str, str | None, str]], ...] = (
    (
        errors.LimitRequestLine,
        (
            414,
            "URI Too Long",
            "uri_too_long",
            "The request line (method and URL) is longer than this gateway accepts.",
        ),
    ),
    (
        errors.LimitRequestHeaders,
        (
            431,
            "Request Header Fields Too Large",
            "headers_too_large",
            "The request's headers are larger, or more, than this gateway accepts.",
        ),
    ),
    (
        errors.InvalidRequestLine,
        (
            400,
            "Bad Request",
            "invalid_request_line",
            "The request line is malformed: send 'METHOD /path HTTP/1.1'.",
        ),
    ),
    (
        errors.InvalidRequestMethod,
        (400, "Bad Request", "invalid_method", "The request's HTTP method is not valid."),
    ),
    (
        errors.InvalidHTTPVersion,
        (
            400,
            "Bad Request",
            "invalid_http_version",
            "The request's HTTP version is not valid or not supported: send HTTP/1.1.",
        ),
    ),
    (
        errors.InvalidHeaderName,
        (400, "Bad Request", "invalid_header", "A request header's name is not valid."),
    ),
    (
        errors.InvalidHeader,
        (
            400,
            "Bad Request",
            "invalid_header",
            "A request header is malformed: a line without a name, a line break or another "
            "control character in a value, or a Content-Length or Transfer-Encoding that "
            "is not valid.",
        ),
    ),
    (
        errors.ObsoleteFolding,
        (
            400,
            "Bad Request",
            "invalid_header",
            "A request header continues on the next line (obsolete line folding).",
        ),
    ),
    (
        errors.UnsupportedTransferCoding,
        (
            501,
            "Not Implemented",
            "unsupported_transfer_coding",
            "The request's Transfer-Encoding is not supported: send the body as it is, or chunked.",
        ),
    ),
    (
        errors.ExpectationFailed,
        (
            417,
            "Expectation Failed",
            "expectation_failed",
            "The request's Expect header asks for something this gateway does not do.",
        ),
    ),
    (
        errors.InvalidSchemeHeaders,
        (
            400,
            "Bad Request",
            "invalid_scheme_headers",
            "The request's headers name contradictory schemes (http and https).",
        ),
    ),
    (errors.InvalidChunkSize, _BAD_BODY),
    (errors.ChunkMissingTerminator, _BAD_BODY),
    (errors.InvalidChunkExtension, _BAD_BODY),
    (errors.InvalidProxyLine, _BAD_PROXY),
    (errors.InvalidProxyHeader, _BAD_PROXY),
    (
        errors.ForbiddenProxyRequest,
        (
            403,
            "Forbidden",
            "proxy_request_forbidden",
            "PROXY protocol requests are not accepted from this address.",
        ),
    ),
    (
        errors.InvalidH2CPreface,
        (
            400,
            "Bad Request",
            "invalid_http2_preface",
            "The connection did not begin with HTTP/2's connection preface.",
        ),
    ),
    # The request's path against SCRIPT_NAME: the server's setup is at fault.
    (errors.ConfigurationProblem, _FAILED),
    # Any other error of gunicorn's parser (a later gunicorn's, say).
    (
        errors.ParseException,
        (400, "Bad Request", "invalid_request", "The request is not valid HTTP/1.1."),
    ),
)
# Errors of the application's response, which gunicorn's errors module also holds (as
# subclasses of InvalidHeader and InvalidHeaderName): the server's fault, not the client's.
_NOT_REFUSALS = (errors.InvalidResponseHeader, errors.InvalidResponseHeaderName)


def refusal_for(exc: BaseException) -> tuple[int, str, str | None, str] | None:
    """How the worker answers `exc`, raised while gunicorn read a request: (status,
    reason, code, message); None for any other error."""
    if isinstance(exc, _NOT_REFUSALS):
        return None
    return next((r for kind, r in _REFUSALS if isinstance(exc, kind)), None)


class GatewayLogger(glogging.Logger):
    """gunicorn's logger, its access log's `U` atom (the path) as the client sent it,
    percent-encoded, where gunicorn's is PATH_INFO, decoded: a `%0A` in the path would
    end the line there and start one of the client's making."""

    def debug(self, msg, *args, **kwargs):
        # gunicorn's line for a client that hung up mid-request (NoMoreData) quotes what
        # it had read of it: a key in a header, say. Its size instead.
        args = tuple(
            f"No more data after {len(a.buf or b'')} bytes of a request (not quoted)"
            if isinstance(a, errors.NoMoreData)
            else a
            for a in args
        )
        super().debug(msg, *args, **kwargs)

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        raw = environ.get("RAW_URI")
        if raw:
            atoms["U"] = raw.split("?", 1)[0].split("#", 1)[0]
        return atoms


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

    def handle_exit(self, sig, frame) -> None:
        # SIGTERM (a deploy, a restart): gunicorn stops taking requests and gives those
        # under way graceful_timeout to finish, then the process exits, cutting what is
        # left. Streams end themselves before that, each with an error event its client
        # can act on and its ledger row written (routing.proxy: gateway_restarting).
        grace = self.cfg.graceful_timeout
        lifecycle.stop_requested(within=max(grace - STOP_MARGIN_SECONDS, grace / 2))
        super().handle_exit(sig, frame)

    def notify(self) -> None:
        now = time.monotonic()
        if now - self._heartbeat_at >= self.HEARTBEAT_SECONDS:
            self._heartbeat_at = now
            super().notify()

    def _keepalive_after(self, conn, keepalive):
        # gthread (gunicorn 27) drains what the application left of a body before keeping
        # the connection; a malformed chunk there comes after the answer was sent, and
        # gunicorn would answer it again (handle_error): another answer on a connection
        # the client may reuse, taken for its next request's. Logged, and closed.
        try:
            return super()._keepalive_after(conn, keepalive)
        except errors.ParseException as exc:
            if refusal_for(exc) is None:
                raise
            self._refusal_log(exc, conn.client, "after its answer; connection closed")
            return False

    def _refusal_log(self, exc: BaseException, addr, answer: str, *, error: bool = False) -> None:
        """A WARNING (an ERROR for the server's own fault) naming the kind of error and
        the client, never the error's text: gunicorn's quotes the request."""
        client = addr[0] if isinstance(addr, tuple | list) and addr else (addr or "-")
        (self.log.error if error else self.log.warning)(
            "Refused a request from %s: %s (%s)", client, type(exc).__name__, answer
        )

    def handle_error(self, req, client, addr, exc) -> None:
        """An error gunicorn raised while reading the request (gunicorn.http.errors: a
        request line, header or chunk it cannot parse, a request line or headers over its
        limits, ...): a JSON error with a fixed message per kind (_REFUSALS), an
        x-request-id like every other answer, and nothing of the request echoed in the
        answer or the log (it may carry a key). Any other error before the answer began
        (the server's own, or a response header the application may not send): a 500 in
        the same shape, logged with its traceback, the method and the path, without the
        query string gunicorn's line quotes (`?api_key=`)."""
        refusal = refusal_for(exc)
        if refusal is None:
            if isinstance(exc, ssl.SSLError):  # a TLS handshake: gunicorn's 403
                super().handle_error(req, client, addr, exc)
                return
            self.log.exception(
                "Error handling request %s %s",
                getattr(req, "method", None) or "-",
                getattr(req, "path", None) or "(no path read)",
            )
            refusal = _FAILED
        else:
            status = refusal[0]
            self._refusal_log(exc, addr, f"answered {status}", error=status == 500)
        from routing.middleware import request_id_new

        status, reason, code, message = refusal
        error = {
            "message": message,
            "type": "api_error" if status == 500 else "invalid_request_error",
            "param": None,
            "code": code,
        }
        body = json.dumps({"error": error}).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"x-request-id: {request_id_new()}\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            util.write_nonblock(client, head.encode() + body)
