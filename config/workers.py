"""The gunicorn worker class the gateway runs on (platform/gunicorn.conf.py)."""

from __future__ import annotations

import contextlib
import json
import time

from gunicorn import util
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


class GatewayThreadWorker(ThreadWorker):
    """gunicorn's threaded worker, heartbeating at most once a second.

    The stock worker tells the master it is alive on every turn of its event loop, a
    system call (utime on a temporary file) two or three times per request: 2% of the
    gateway's CPU in `bench.profile`. The master only needs to hear from it once per
    `timeout` (120 s here), which gunicorn's own docs leave to the worker to arrange.
    """

    HEARTBEAT_SECONDS = 1.0
    _heartbeat_at = float("-inf")

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
