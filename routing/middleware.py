"""Give every request the id that names it everywhere: x-request-id and the ledger."""

from __future__ import annotations

import time
import uuid

from django.utils import timezone


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
        response = self.get_response(request)
        response["x-request-id"] = request.request_id
        return response
