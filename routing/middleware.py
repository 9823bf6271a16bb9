"""Give every request the id that names it everywhere: x-request-id and the ledger; refuse
a URL carrying a NUL character before any view queries the database with it; with DEBUG
on, refuse a Host header the gateway does not serve in OpenAI's shape, as with it off."""

from __future__ import annotations

import logging
import re
import time
import uuid

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.db import DatabaseError, connection
from django.http import JsonResponse
from django.utils import timezone

logger = logging.getLogger(__name__)

NUL_MESSAGE = "The URL contains a NUL character (%00), which no name or value here has."

# The paths whose errors are OpenAI's shape with DEBUG on too, where Django would show
# its HTML debug page: all but the admin's, the management API's and static files' (the
# catch-all 404 in config/urls.py, and DebugHostMiddleware). Matched without the leading /.
OPENAI_ERROR_PATHS = r"^(?!admin(?:/|$)|api(?:/|$)|static/)"
_openai_error_path = re.compile(OPENAI_ERROR_PATHS).match


def request_id_new() -> str:
    return f"req_{uuid.uuid4().hex}"


class RequestIdMiddleware:
    """Stamps request.request_id, request.received_at (UTC) and request.started (monotonic)
    on the way in, and x-request-id on every response on the way out."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.request_id = request_id_new()
        request.received_at = timezone.now()
        request.started = time.monotonic()
        if "\x00" in request.path or "%00" in request.META.get("QUERY_STRING", ""):
            # No id, slug or filter contains one, and PostgreSQL refuses it in a query.
            response = JsonResponse(_nul_error(request.path), status=400)
        else:
            response = self.get_response(request)
        response["x-request-id"] = request.request_id
        return response


def _nul_error(path: str) -> dict:
    if path.startswith("/v1/"):
        return {
            "error": {
                "message": NUL_MESSAGE,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
    return {"detail": NUL_MESSAGE}


class ProbeMiddleware:
    """`/healthz` (the process answers) and `/readyz` (it reaches its database) for load
    balancers and orchestrators: no key, and any Host header (a probe calls a container
    by its address, which ALLOWED_HOSTS does not list). Answered before the rest of the
    stack; `/readyz` says 503 when the database cannot be reached, naming nothing of it."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        path = request.path_info
        if path == "/healthz":
            return JsonResponse({"status": "ok"})
        if path == "/readyz":
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
            except DatabaseError:
                logger.warning("Readiness probe: the database cannot be reached", exc_info=True)
                return JsonResponse(
                    {"status": "unavailable", "database": "unreachable"}, status=503
                )
            return JsonResponse({"status": "ready", "database": "ok"})
        return self.get_response(request)


class DebugHostMiddleware:
    """With DEBUG on (make run), a Host header not in ALLOWED_HOSTS outside the admin and
    /api/ gets the 400 that handler400 gives with DEBUG off, in OpenAI's shape. Django
    would answer its HTML debug page, which lists the request's headers, the client's
    key among them. With DEBUG off it does nothing: handler400 answers."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if settings.DEBUG and _openai_error_path(request.path_info.removeprefix("/")):
            try:
                request.get_host()
            except DisallowedHost as exc:
                return _disallowed_host(request, exc)
        return self.get_response(request)


def _disallowed_host(request, exc: DisallowedHost):
    from django.utils.log import log_response

    from routing.api.views import bad_request

    response = bad_request(request, exc)
    # Logged as Django logs it ("Invalid HTTP_HOST header: ... add it to ALLOWED_HOSTS").
    log_response(
        str(exc),
        exception=exc,
        request=request,
        response=response,
        level="error",
        logger=logging.getLogger("django.security.DisallowedHost"),
    )
    return response
