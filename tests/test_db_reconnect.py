"""Dead pooled database connections: the pool does not check each connection it hands
out, so the per-call statements (key lookup, usage event) run again once on a fresh one
when theirs is dead (config.db). A database restart, or connections killed by an
operator, must cost no call and lose no usage event.

PostgreSQL only has such connections, so this module always runs on it (every machine
and CI have one on 127.0.0.1:5432): a scratch database of its own, migrated and seeded,
and the production server (gunicorn, two workers, each with its pool) on it. It runs the
same in the SQLite and the PostgreSQL passes of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import openai
import psycopg
import pytest
from psycopg import sql

from .upstream import ROOT, gunicorn_gateway_start

ADMIN_URL = os.environ.get(
    "TOLLGATE_TEST_PG_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres"
)
# One scratch database per test process: two suites running at once on one machine
# (a SQLite run beside a PostgreSQL run) must not drop each other's. The processes a test
# starts import this module too: they get the name from the environment.
NAME = os.environ.get("TOLLGATE_TEST_RECONNECT_DB") or f"tollgate_test_reconnect_{os.getpid()}"
URL = f"{ADMIN_URL.rsplit('/', 1)[0]}/{NAME}"
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "DJANGO_"))},
    "DJANGO_SETTINGS_MODULE": "config.settings.test",
    "DATABASE_URL": URL,
    "TOLLGATE_TEST_RECONNECT_DB": NAME,
}


def _run(*args: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**ENV, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _database(action: str) -> None:
    name = sql.Identifier(NAME)
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        if action == "create":
            admin.execute(sql.SQL("CREATE DATABASE {}").format(name))


def connections_kill() -> int:
    """Terminate every server connection to the scratch database; how many there were."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [NAME],
        ).fetchall()
    return len(rows)


def ledger_ok_rows() -> int:
    with psycopg.connect(URL) as conn:
        row = conn.execute("SELECT count(*) FROM billing_usageevent WHERE status = 'ok'").fetchone()
    return row[0]


@pytest.fixture(scope="module")
def scratch_database():
    _database("create")
    _run("manage.py", "migrate", "--noinput", "-v", "0")
    yield URL
    _database("drop")


# Run in a process of its own, on the scratch database, with Django's pool.
STATEMENTS = """
import django, psycopg
django.setup()
from django.db import OperationalError, transaction
from config.db import fetch_one
from tests.test_db_reconnect import connections_kill

first = fetch_one("SELECT pg_backend_pid()", [])[0]
assert connections_kill() >= 1
second = fetch_one("SELECT pg_backend_pid()", [])[0]
print("outside a transaction:", "a fresh connection" if second != first else "the same")
connections_kill()
try:
    with transaction.atomic():
        fetch_one("SELECT 1", [])
except OperationalError:
    print("inside a transaction: raised")
else:
    print("inside a transaction: ran")
"""


def test_a_statement_whose_connection_died_runs_again_outside_a_transaction_only(
    scratch_database,
):
    out = _run("-c", STATEMENTS).splitlines()
    assert out == ["outside a transaction: a fresh connection", "inside a transaction: raised"]


PREPARED = """
import django
django.setup()
from config.db import fetch_one
fetch_one("SELECT count(*) FROM tenants_apikey WHERE digest = %s", ["x"])
print(fetch_one("SELECT count(*) FROM pg_prepared_statements", [])[0] > 0)
"""


def test_per_call_statements_are_prepared_unless_turned_off(scratch_database):
    assert _run("-c", PREPARED).split() == ["True"]
    assert _run("-c", PREPARED, TOLLGATE_DATABASE_PREPARE="false").split() == ["False"]


# Three connections idle in the pool, then four statements one after another.
MOST_RECENT = """
import django
django.setup()
from django.db import connection
from config.db import fetch_one
fetch_one("SELECT 1", [])
held = [connection.pool.getconn() for _ in range(3)]
for conn in held:
    connection.pool.putconn(conn)
pids = [fetch_one("SELECT pg_backend_pid()", [])[0] for _ in range(4)]
print(len(set(pids)), pids[0] == held[-1].info.backend_pid)
"""


def test_statements_one_after_another_reuse_the_most_recently_used_connection(
    scratch_database,
):
    # The warm backend that served the last statement serves the next, instead of the
    # pool's connections in turn (config.db._most_recent_first).
    assert _run("-c", MOST_RECENT).split() == ["1", "True"]


@pytest.fixture(scope="module")
def gateway_on_scratch(scratch_database, mock_upstream):
    seeded = json.loads(
        _run("-m", "bench.seed", "--mock-url", mock_upstream.url("openai")).splitlines()[-1]
    )
    # Small pools: the suite's other servers hold many connections of the same server.
    gateway = gunicorn_gateway_start(scratch_database, DATABASE_POOL_MIN="1", DATABASE_POOL_MAX="3")
    client = openai.OpenAI(base_url=gateway.url, api_key=seeded["secret"], max_retries=0)
    yield client, seeded["model"]
    gateway.stop()


def _chat(client: openai.OpenAI, model: str, **mock) -> str:
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hello"}],
        extra_body={"mock": mock} if mock else None,
    )
    return completion.choices[0].message.content


def test_calls_survive_killed_database_connections_and_are_all_metered(gateway_on_scratch):
    client, model = gateway_on_scratch
    for _ in range(4):  # both workers have pooled connections
        assert _chat(client, model)
    before = ledger_ok_rows()

    assert connections_kill() >= 2
    # Each worker's pool holds only dead connections now; no call may fail for it
    # (max_retries=0: the client does not retry behind the test's back).
    for _ in range(6):
        assert _chat(client, model)
    assert ledger_ok_rows() == before + 6


def test_a_call_whose_connection_dies_while_the_provider_answers_is_still_metered(
    gateway_on_scratch,
):
    client, model = gateway_on_scratch
    before = ledger_ok_rows()
    answers: list[str] = []
    call = threading.Thread(target=lambda: answers.append(_chat(client, model, latency_ms=1500)))
    call.start()
    time.sleep(0.7)  # authenticated, admitted, waiting on the provider
    assert connections_kill() >= 1
    call.join(timeout=30)
    assert len(answers) == 1 and answers[0]
    assert ledger_ok_rows() == before + 1
