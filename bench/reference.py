"""The yardstick the speed targets were set against: a plain Django view proxying with
httpx under gunicorn threads (the issue measured it adding about 1.7 ms on this kind of
machine). bench.gateway runs it beside the gateway and calls it in the same interleaved
rounds, so that what the gateway adds can be read against it in the same minute, whatever
the machine's speed that hour.

It does nothing the gateway does besides forwarding: no key, no database, no ledger, no
SDK. One view forwards the request body to REFERENCE_UPSTREAM_URL over a pooled httpx
client (httpx2, the fork the openai SDK installs) and returns the answer's bytes; Django
runs with its SecurityMiddleware and CommonMiddleware, nothing else.

    REFERENCE_UPSTREAM_URL=http://127.0.0.1:PORT/openai/v1/chat/completions \\
        gunicorn -k gthread -w 2 --threads 16 bench.reference:application

With REFERENCE_LEDGER_DSN set (a PostgreSQL URL that bench.stack prepares), a
second view, /ledger/v1/chat/completions, does the least the issue asks of every call
besides forwarding: it looks the bearer key's keyed digest up in a table (one indexed
SELECT) and, once the upstream has answered, commits one ledger row with the call's
tokens and Decimal cost (one INSERT, durable: synchronous_commit as configured) before it
answers. Each thread keeps its own connection, as Django's persistent connections do,
with psycopg's prepared statements. What this view adds over the plain one is what those
two round trips cost on the machine that hour: the floor under any gateway that
authenticates against the database and writes its ledger before it answers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import uuid
from decimal import Decimal

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="bench-reference-not-a-secret",  # noqa: S106 (a benchmark's throwaway server)
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[
        "django.middleware.security.SecurityMiddleware",
        "django.middleware.common.CommonMiddleware",
    ],
    INSTALLED_APPS=[],
    DATABASES={},
)
django.setup()

import httpx2  # noqa: E402  (after settings: the view module's imports need them)
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402

UPSTREAM_URL = os.environ.get("REFERENCE_UPSTREAM_URL", "")
_client = httpx2.Client(
    timeout=30, limits=httpx2.Limits(max_connections=100, max_keepalive_connections=100)
)


@csrf_exempt
def chat_completions(request: HttpRequest) -> HttpResponse:
    upstream = _client.post(
        UPSTREAM_URL,
        content=request.body,
        headers={"Content-Type": "application/json", "Authorization": "Bearer reference"},
    )
    return HttpResponse(
        upstream.content,
        status=upstream.status_code,
        content_type=upstream.headers.get("content-type", "application/json"),
    )


# --- the same, with a key lookup and a durable ledger row ------------------------------

LEDGER_DSN = os.environ.get("REFERENCE_LEDGER_DSN", "")
LEDGER_PEPPER = os.environ.get("REFERENCE_LEDGER_PEPPER", "").encode()
_OUTPUT_PRICE = Decimal("0.25")  # USD per 1M output tokens
_local = threading.local()


def _digest(secret: str) -> str:
    return hmac.new(LEDGER_PEPPER, secret.encode(), hashlib.sha256).hexdigest()


def _connection():
    conn = getattr(_local, "conn", None)
    if conn is None:
        import psycopg

        conn = _local.conn = psycopg.connect(LEDGER_DSN, autocommit=True)
    return conn


@csrf_exempt
def chat_completions_ledger(request: HttpRequest) -> HttpResponse:
    secret = request.headers.get("Authorization", "").removeprefix("Bearer ")
    conn = _connection()
    key = conn.execute(
        "SELECT id, tenant_id FROM yardstick_key WHERE digest = %s AND revoked_at IS NULL",
        (_digest(secret),),
    ).fetchone()
    if key is None:
        return HttpResponse(b'{"error": {"message": "bad key"}}', status=401)
    upstream = _client.post(
        UPSTREAM_URL,
        content=request.body,
        headers={"Content-Type": "application/json", "Authorization": "Bearer reference"},
    )
    answer = json.loads(upstream.content)
    usage = answer["usage"]
    conn.execute(
        "INSERT INTO yardstick_usage (request_id, key_id, tenant_id, model, prompt_tokens, "
        "completion_tokens, cost) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            uuid.uuid4(),
            key[0],
            key[1],
            answer["model"],
            usage["prompt_tokens"],
            usage["completion_tokens"],
            usage["completion_tokens"] * _OUTPUT_PRICE / 1_000_000,
        ),
    )
    return HttpResponse(
        upstream.content,
        status=upstream.status_code,
        content_type=upstream.headers.get("content-type", "application/json"),
    )


urlpatterns = [
    path("v1/chat/completions", chat_completions),
    path("ledger/v1/chat/completions", chat_completions_ledger),
]
application = get_wsgi_application()
