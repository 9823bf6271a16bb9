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
"""

from __future__ import annotations

import os

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


urlpatterns = [path("v1/chat/completions", chat_completions)]
application = get_wsgi_application()
