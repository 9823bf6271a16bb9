"""Give every request the id that names it everywhere: x-request-id and the ledger; refuse
a URL carrying a NUL character before any view queries the database with it."""

from __future__ import annotations

import time
import uuid

from django.http import JsonResponse
from django.utils import timezone

NUL_MESSAGE = "The URL contains a NUL character (%00), which no name or value here has."


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
