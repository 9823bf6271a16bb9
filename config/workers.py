"""The gunicorn worker class the gateway runs on (platform/gunicorn.conf.py)."""

from __future__ import annotations

import time

from gunicorn.workers.gthread import ThreadWorker


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
