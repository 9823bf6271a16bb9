"""Start `manage.py mockupstream` in a subprocess on a free port, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parent.parent


def process_stop(process: subprocess.Popen, timeout: float = 15) -> None:
    """Terminate a child process, and kill it if it does not exit in time."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class MockUpstream:
    process: subprocess.Popen
    base: str  # http://127.0.0.1:PORT

    def url(self, style: str = "openai") -> str:
        """The OpenAI-compatible base URL for one usage style."""
        return f"{self.base}/{style}/v1"

    def stop(self) -> None:
        process_stop(self.process)

    def faults(self, **knobs) -> None:
        """Apply `mock` knobs to every chat request this process gets; none: clear them."""
        self._post("/_mock/faults", knobs)

    def stats(self) -> dict:
        return httpx2.get(f"{self.base}/_mock/stats", timeout=10).raise_for_status().json()

    def stats_reset(self) -> None:
        self._post("/_mock/stats/reset", {})

    def _post(self, path: str, payload: dict) -> dict:
        return httpx2.post(f"{self.base}{path}", json=payload, timeout=10).raise_for_status().json()


def mock_upstream_start(*args: str) -> MockUpstream:
    """Run the mock upstream with extra CLI arguments; return once it is listening."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "manage.py", "mockupstream", "--port", "0", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if "listening on " in line:
            base = line.split("listening on ", 1)[1].strip().rstrip("/")
            return MockUpstream(process=process, base=base)
    process.wait(timeout=10)
    raise RuntimeError(f"mockupstream exited with {process.returncode} before listening")


@dataclass
class GunicornGateway:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT/v1

    def stop(self) -> None:
        process_stop(self.process)


def free_port() -> int:
    """A local TCP port nothing listens on (for a server to take, or to stay dead)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gunicorn_gateway_start(
    database_url: str, *, output: Path | None = None, **env_overrides: str
) -> GunicornGateway:
    """The production server (platform/gunicorn.conf.py) on a free port, on a given
    database; its standard output and error (access and error log) into `output` if
    given, else this process's."""
    port = free_port()
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="config.settings.test",
        DATABASE_URL=database_url,
        GUNICORN_BIND=f"127.0.0.1:{port}",
        GUNICORN_WORKERS="2",
        GUNICORN_THREADS="20",
        GUNICORN_ACCESSLOG="",
        GUNICORN_LOGLEVEL="warning",
        # Each test builds its own catalog: no snapshot may outlive it.
        TOLLGATE_CONFIG_CACHE_SECONDS="0",
        # Several servers share one PostgreSQL (max_connections 100) during a run; grown
        # pools keep their connections for minutes.
        DATABASE_POOL_MAX="8",
    )
    env.update(env_overrides)
    log = None if output is None else output.open("ab")
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "platform/gunicorn.conf.py", "config.wsgi"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=None if log is None else subprocess.STDOUT,
        )
    finally:
        if log is not None:
            log.close()  # the child holds its own copy
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}")
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1)  # noqa: S310  (our own URL)
        except urllib.error.HTTPError:
            return GunicornGateway(process=process, url=url)  # 401: it answers
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("gunicorn did not answer within 30 s")


@dataclass
class CeleryWorker:
    process: subprocess.Popen

    def stop(self) -> None:
        process_stop(self.process)


def celery_worker_start(database_url: str, **broker_env: str) -> CeleryWorker:
    """A real Celery worker (solo pool) on a given database, on the broker its
    environment (`CELERY_BROKER_URL`, `CELERY_BROKER_KEY_PREFIX`) names."""
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="config.settings.test",
        DATABASE_URL=database_url,
        **broker_env,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "solo",
         "--loglevel", "warning", "--without-heartbeat", "--without-gossip", "--without-mingle"],
        cwd=ROOT,
        env=env,
    )  # fmt: skip
    return CeleryWorker(process=process)


class RawStreamProvider:
    """A provider whose streams are scripted to the byte: each chat completion is answered
    with `parts` (bytes, sent as they are in one chunk of HTTP chunked encoding each, or a
    float: seconds to wait), as `text/event-stream`. For what the mock cannot send: tool
    calls, several choices, exact line ends and TCP segments, pauses of keep-alives."""

    def __init__(self, parts: list[bytes | float]):
        self.requests: list[dict] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for part in parts:
                        if isinstance(part, float):
                            time.sleep(part)
                        elif part:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                            self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass  # the gateway hung up
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def sse_event(payload: dict) -> bytes:
    """One `data:` event of a chat completion chunk, its text as UTF-8 (not escaped)."""
    chunk = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, **payload}
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
