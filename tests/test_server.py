"""The production server's worker class (config.workers): it heartbeats once a second
instead of on every turn of its loop, and gunicorn's master must still see it alive; what
gunicorn refuses before the application sees it is answered in OpenAI's error shape."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx2

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
