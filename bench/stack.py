"""The stack under test: a fresh PostgreSQL database, the mock upstream and the gateway.

Everything runs as it would in production: `config.settings.production`, gunicorn with
`platform/gunicorn.conf.py` (or uvicorn on `config.asgi`), real keys issued with the same
pepper the gateway uses, and the usage ledger in PostgreSQL.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx2
import psycopg
from psycopg import sql

from tests.upstream import MockUpstream, mock_upstream_start

from . import procs

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DB_NAME = "tollgate_bench"
SERVERS = ("gthread", "uvicorn")
GUNICORN_CONF = "platform/gunicorn.conf.py"


def _random_secret(length: int = 50) -> str:
    alphabet = string.ascii_letters + string.digits + "-_"
    return "".join(secrets.choice(alphabet) for _ in range(length))


def database_url() -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{DB_NAME}"


def database_recreate() -> None:
    """Drop and create the benchmark database (never any other)."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        name = sql.Identifier(DB_NAME)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(name))


def database_drop() -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        name = sql.Identifier(DB_NAME)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))


@dataclass(frozen=True)
class LedgerCounts:
    """Rows of billing_usageevent, by kind."""

    total: int
    plain_ok: int
    stream_ok: int
    stream_ok_full: int  # streamed, ok, and metered with the expected output tokens
    other: int  # any status other than ok


class Ledger:
    """Read-only look at the usage ledger, straight through psycopg."""

    def __init__(self, url: str) -> None:
        self.url = url

    def counts(self, expected_stream_tokens: int = 0) -> LedgerCounts:
        query = """
            SELECT count(*),
                   count(*) FILTER (WHERE status = 'ok' AND NOT streamed),
                   count(*) FILTER (WHERE status = 'ok' AND streamed),
                   count(*) FILTER (WHERE status = 'ok' AND streamed AND output_tokens = %s),
                   count(*) FILTER (WHERE status <> 'ok')
            FROM billing_usageevent
        """
        with psycopg.connect(self.url) as conn:
            row = conn.execute(query, (expected_stream_tokens,)).fetchone()
        assert row is not None
        return LedgerCounts(*(int(v) for v in row))


@dataclass
class BenchEnv:
    """The environment shared by migrate, seed and the gateway (same secret and pepper)."""

    values: dict[str, str]

    @classmethod
    def create(cls) -> BenchEnv:
        values = dict(os.environ)
        values.update(
            DJANGO_SETTINGS_MODULE="config.settings.production",
            DJANGO_SECRET_KEY=_random_secret(),
            TOLLGATE_KEY_PEPPER=_random_secret(),
            DATABASE_URL=database_url(),
            DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
            LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        return cls(values)

    def run(self, *args: str) -> str:
        """Run a Python module or script of the project to completion; its stdout."""
        result = subprocess.run(  # noqa: S603 (fixed arguments, no shell)
            [sys.executable, *args],
            cwd=ROOT,
            env=self.values,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout


def database_prepare(
    env: BenchEnv, mock_url: str, *, limits: bool = False, keys: int = 1
) -> list[str]:
    """Recreate, migrate and seed the database; the bench tenant's bearer keys."""
    database_recreate()
    env.run("manage.py", "migrate", "--noinput", "-v", "0")
    args = ["-m", "bench.seed", "--mock-url", mock_url, "--keys", str(keys)]
    seeded = json.loads(env.run(*args, *(["--limits"] if limits else [])).splitlines()[-1])
    return [str(secret) for secret in seeded["secrets"]]


def mock_start() -> MockUpstream:
    return mock_upstream_start()


@dataclass
class Gateway:
    """One running gateway server (gunicorn gthread or uvicorn) and its process tree."""

    server: str
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log_path: Path

    @property
    def master_pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        return procs.tree_pids(self.process.pid)

    def worker_pids(self) -> list[int]:
        return [pid for pid in self.pids() if pid != self.process.pid]

    def rss_kib(self) -> int:
        """Sum of the resident memory of the master and its workers."""
        return sum(procs.rss_kib(pid) for pid in self.pids())

    def stop(self) -> None:
        if self.process.poll() is None:
            # uvicorn and gunicorn both stop on SIGTERM; open streams are cut after the
            # graceful timeout, which the benchmark never relies on.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=35)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def uvicorn_available() -> bool:
    return shutil.which("uvicorn", path=str(VENV_BIN)) is not None


def _server_start(
    server: str, command: list[str], *, port: int, env: dict, cwd: Path, log_path: Path
) -> Gateway:
    """Start a server process in its own session, its output in `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(  # noqa: S603 (fixed arguments, no shell)
            command,
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the benchmark, which stops it in order
        )
    return Gateway(
        server=server, process=process, url=f"http://127.0.0.1:{port}", log_path=log_path
    )


def gateway_start(
    env: BenchEnv,
    *,
    key: str,
    server: str = "gthread",
    workers: int = 2,
    threads: int | None = None,
    log_dir: Path,
    gunicorn_conf: str = GUNICORN_CONF,
    extra_env: dict[str, str] | None = None,
    root: Path = ROOT,
) -> Gateway:
    """Start the gateway on a free port and return once /v1/models answers 200. `root`:
    the checkout whose code it runs (bench.compare runs an older commit beside this one)."""
    port = procs.free_port()
    values = dict(env.values)
    values.update(
        GUNICORN_BIND=f"127.0.0.1:{port}",
        GUNICORN_WORKERS=str(workers),
        GUNICORN_ACCESSLOG="",  # off
        GUNICORN_LOGLEVEL="warning",
    )
    if threads is not None:
        values["GUNICORN_THREADS"] = str(threads)
    values.update(extra_env or {})
    if server == "gthread":
        command = [
            str(VENV_BIN / "gunicorn"),
            "-c",
            gunicorn_conf,
            "config.wsgi",
        ]
    elif server == "uvicorn":
        command = [
            str(VENV_BIN / "uvicorn"),
            "config.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--no-access-log",
            "--log-level",
            "warning",
            "--backlog",
            "2048",
        ]
    else:
        raise ValueError(f"unknown server {server!r}")
    gateway = _server_start(
        server,
        command,
        port=port,
        env=values,
        cwd=root,
        log_path=log_dir / f"gateway-{server}-{port}.log",
    )
    try:
        headers = {"Authorization": f"Bearer {key}"}
        _wait_ready(
            gateway, lambda: httpx2.get(f"{gateway.url}/v1/models", headers=headers, timeout=2.0)
        )
    except BaseException:
        gateway.stop()
        raise
    return gateway


# The key the yardstick's ledger view (bench.reference) knows, by its keyed digest.
REFERENCE_LEDGER_KEY = "bench-reference"


def reference_ledger_prepare(dsn: str) -> str:
    """(Re)create the tables of the yardstick's ledger view in `dsn`, holding one key
    (REFERENCE_LEDGER_KEY); return the pepper its digest was made with."""
    pepper = _random_secret()
    digest = hmac.new(pepper.encode(), REFERENCE_LEDGER_KEY.encode(), hashlib.sha256)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS yardstick_usage, yardstick_key")
        conn.execute(
            "CREATE TABLE yardstick_key (id bigserial PRIMARY KEY, digest char(64) UNIQUE "
            "NOT NULL, tenant_id integer NOT NULL, revoked_at timestamptz)"
        )
        conn.execute(
            "CREATE TABLE yardstick_usage (id bigserial PRIMARY KEY, request_id uuid UNIQUE "
            "NOT NULL, key_id bigint NOT NULL REFERENCES yardstick_key, tenant_id integer "
            "NOT NULL, model text NOT NULL, prompt_tokens integer NOT NULL, "
            "completion_tokens integer NOT NULL, cost numeric(24, 12) NOT NULL, "
            "occurred_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            "INSERT INTO yardstick_key (digest, tenant_id) VALUES (%s, 1)", (digest.hexdigest(),)
        )
    return pepper


def reference_ledger_rows(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM yardstick_usage").fetchone()
    assert row is not None
    return int(row[0])


def reference_start(
    *, mock_url: str, log_dir: Path, workers: int = 2, ledger_dsn: str | None = None
) -> Gateway:
    """The yardstick (bench.reference: a plain Django view proxying to the mock with
    httpx) under stock gunicorn gthread workers, on a free port; returns once it answers.
    With `ledger_dsn`, its ledger view is ready too (see reference_ledger_prepare)."""
    port = procs.free_port()
    command = [
        str(VENV_BIN / "gunicorn"),
        "--worker-class=gthread",
        f"--workers={workers}",
        "--threads=16",
        "--keep-alive=75",
        f"--bind=127.0.0.1:{port}",
        "--log-level=warning",
        "bench.reference:application",
    ]
    env = dict(os.environ, REFERENCE_UPSTREAM_URL=f"{mock_url}/chat/completions")
    env.pop("DJANGO_SETTINGS_MODULE", None)
    if ledger_dsn:
        env["REFERENCE_LEDGER_DSN"] = ledger_dsn
        env["REFERENCE_LEDGER_PEPPER"] = reference_ledger_prepare(ledger_dsn)
    reference = _server_start(
        "reference",
        command,
        port=port,
        env=env,
        cwd=ROOT,
        log_path=log_dir / f"reference-{port}.log",
    )
    body = {"model": "reference", "messages": [{"role": "user", "content": "ready?"}]}
    try:
        _wait_ready(
            reference,
            lambda: httpx2.post(f"{reference.url}/v1/chat/completions", json=body, timeout=2.0),
        )
    except BaseException:
        reference.stop()
        raise
    return reference


def _wait_ready(
    server: Gateway, probe: Callable[[], httpx2.Response], timeout: float = 60.0
) -> None:
    """Return once `probe()` (a request to the server) is answered 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the {server.server} server exited with {server.process.returncode}; see "
                f"{server.log_path}:\n" + server.log_path.read_text()[-3000:]
            )
        try:
            response = probe()
        except httpx2.TransportError:
            time.sleep(0.2)
            continue
        if response.status_code == 200:
            return
        raise RuntimeError(
            f"the {server.server} server answered {response.status_code}: {response.text[:500]}"
        )
    raise RuntimeError(
        f"the {server.server} server did not answer within {timeout:.0f} s; see {server.log_path}"
    )


def gateway_warm(gateway: Gateway, key: str, body: bytes, stream_body: bytes) -> None:
    """A few plain and streamed calls on several connections, so that both workers have
    imported what they import lazily (the SDK's types, DRF, the pool's connections) and
    the first measured requests do not pay for it."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    url = f"{gateway.url}/v1/chat/completions"

    def calls() -> None:
        with httpx2.Client(timeout=30) as client:
            for _ in range(10):
                client.post(url, content=body, headers=headers).raise_for_status()
            client.post(url, content=stream_body, headers=headers).raise_for_status()

    with ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(calls) for _ in range(8)]:
            future.result()
