"""The production server's worker class (config.workers): it heartbeats once a second
instead of on every turn of its loop, and gunicorn's master must still see it alive."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

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
