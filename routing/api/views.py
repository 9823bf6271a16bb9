"""The OpenAI-compatible endpoints under /v1/. Thin: the work is in routing.proxy."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import DisallowedHost, RequestDataTooBig
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt
from gunicorn.http.errors import ParseException
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.permissions import BasePermission
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from tenants.auth import ApiKeyAuthentication
from tenants.budgets import budget_status, budgets_for_key, usd_str
from tenants.selectors import model_for_key, models_for_key, routes_for_key

from ..errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    RouteNotFound,
    TenantSuspended,
    UnsupportedEncoding,
    openai_exception_handler,
)
from ..models import CatalogModel
from ..proxy import ChatCall, chat_admit, chat_complete, chat_stream, chat_targets
from ..routes import RouteSpec
from ..validation import chat_request_parse


class TenantActive(BasePermission):
    """Authenticated with a key whose tenant is not suspended."""

    def has_permission(self, request, view) -> bool:
        if request.auth is None:
            return False
        if not request.user.tenant_is_active:
            raise TenantSuspended("This tenant is suspended; its API keys are blocked.")
        return True


class AnyAcceptNegotiation(BaseContentNegotiation):
    """Answer JSON whatever Accept says: SSE clients send Accept: text/event-stream."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class OpenAIView(APIView):
    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [TenantActive]
    renderer_classes = [JSONRenderer]
    parser_classes = []
    content_negotiation_class = AnyAcceptNegotiation
    throttle_classes = []
    schema = None  # not part of the management API's OpenAPI document
    # No OPTIONS: a 405 like any other method, not DRF's description of the view.
    http_method_names = ["get", "post", "head"]

    def get_exception_handler(self):
        return openai_exception_handler


def _model_object(model: CatalogModel) -> dict:
    return {
        "id": model.public_id,
        "object": "model",
        "created": int(model.created_at.timestamp()),
        "owned_by": model.developer,
    }


def _route_object(spec: RouteSpec) -> dict:
    return {"id": spec.name, "object": "model", "created": spec.created, "owned_by": "tollgate"}


class ModelListView(OpenAIView):
    """The models the key may call, then the routes that reach one of them."""

    def get(self, request):
        models = [_model_object(m) for m in models_for_key(key=request.auth)]
        routes = [_route_object(r) for r in routes_for_key(key=request.auth)]
        return Response({"object": "list", "data": models + routes})


class ModelDetailView(OpenAIView):
    def get(self, request, model_id: str):
        entry, allowed = model_for_key(key=request.auth, public_id=model_id)
        if entry is None:
            for spec in routes_for_key(key=request.auth):
                if spec.name == model_id:
                    return Response(_route_object(spec))
        if entry is None or not allowed:
            raise ModelNotFound(
                f"The model '{model_id}' does not exist or you do not have access to it.",
                param="model",
            )
        return Response(_model_object(entry.model))


def request_body(request) -> bytes:
    """The request's body, also when the client sent it chunked (Transfer-Encoding:
    chunked, no Content-Length): Django reads such a body as empty, while gunicorn hands
    it over de-chunked and ended (`wsgi.input_terminated`). 413 over the upload limit,
    415 for a compressed body (which would otherwise read as malformed JSON), 400 for
    chunks gunicorn cannot parse."""
    encoding = request.META.get("HTTP_CONTENT_ENCODING", "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedEncoding(
            f"Content-Encoding '{encoding[:40]}' is not supported: send the JSON body uncompressed."
        )
    try:
        raw = request.body
    except RequestDataTooBig:
        raise _too_large() from None
    meta = request.META
    if raw or "chunked" not in meta.get("HTTP_TRANSFER_ENCODING", "").lower():
        return raw
    if not meta.get("wsgi.input_terminated"):
        return raw  # a server that does not de-chunk: nothing safe to read
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    try:
        raw = meta["wsgi.input"].read() if limit is None else meta["wsgi.input"].read(limit + 1)
    except ParseException:
        # A chunk gunicorn cannot parse. Its error quotes the body (a key, a prompt): an
        # unhandled error would log it; the worker closes the connection after this.
        raise InvalidRequest(
            "The request body's chunked encoding is malformed.", code="invalid_chunked_body"
        ) from None
    if limit is not None and len(raw) > limit:
        raise _too_large()
    return raw


def _too_large() -> PayloadTooLarge:
    return PayloadTooLarge("The request body is larger than this gateway accepts.")


class ChatCompletionsView(OpenAIView):
    def post(self, request):
        django_request = request._request
        body = chat_request_parse(request_body(django_request))
        route, targets = chat_targets(
            key=request.auth,
            name=body["model"],
            body=body,
            at=django_request.received_at,
            split_key=split_key(django_request),
        )
        call = ChatCall(
            request_id=django_request.request_id,
            received_at=django_request.received_at,
            started=django_request.started,
            key=request.auth,
            body=body,
            model=targets[0].model,
            units=targets[0].units,
            route=route,
            targets=targets,
        )
        chat_admit(call)
        if body.get("stream"):
            response = StreamingHttpResponse(chat_stream(call), content_type="text/event-stream")
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"  # nginx: relay each event as it comes
        else:
            response = HttpResponse(chat_complete(call), content_type="application/json")
        if call.rate is not None:
            for name, value in call.rate.headers(timezone.now()).items():
                response[name] = value
        for name, value in call.headers().items():
            response[name] = value
        return response


def split_key(request) -> str:
    """What a weighted split hashes: the client's own id for the request when it sends
    one (Idempotency-Key, X-Client-Request-Id), so that its retries land on the same
    target, else the gateway's request id."""
    for header in ("HTTP_IDEMPOTENCY_KEY", "HTTP_X_CLIENT_REQUEST_ID"):
        value = request.META.get(header, "").strip()
        if value:
            return value[:200]
    return request.request_id


class BudgetView(OpenAIView):
    """GET /v1/budget: what the key and its tenant have left this month."""

    def get(self, request):
        key = request.auth
        statuses = {"tenant": None, "key": None}
        for budget in budgets_for_key(
            tenant_id=key.tenant_id, key_id=key.pk, version=key.tenant_budget_version
        ):
            status = budget_status(budget, tz_name=key.tenant_timezone)
            statuses[budget.scope] = {
                "limit_usd": usd_str(budget.limit_usd),
                "spent_usd": usd_str(status.spent),
                "reserved_usd": usd_str(status.reserved),
                "remaining_usd": usd_str(status.remaining),
                "hard": budget.hard,
                "period_start": status.period_start.isoformat(),
                "period_end": status.period_end.isoformat(),
            }
        return Response({"object": "budget", **statuses})


@csrf_exempt
def unknown_endpoint(request, path: str = ""):
    """Any other /v1/ path: a 404 in OpenAI's shape, not Django's HTML page."""
    error = RouteNotFound(f"Invalid URL ({request.method} {request.path}).")
    return JsonResponse(error.body(), status=error.status)


# Django's own error pages (config/urls.py handler400/404/500), reached outside the views
# above: a client whose base URL lacks /v1, a Host header the gateway does not serve. The
# admin keeps Django's HTML pages, the management API DRF's {"detail": ...}; every other
# path answers in OpenAI's shape, which the SDK reads into its exception's message.


def _error_page(request, status: int, openai_error: GatewayError, detail: str, html_view):
    if request.path.startswith("/admin/"):
        return html_view()
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": detail}, status=status)
    return JsonResponse(openai_error.body(), status=status)


def bad_request(request, exception):
    if isinstance(exception, DisallowedHost):
        message = "The Host header names no host this gateway serves (ALLOWED_HOSTS)."
    else:
        message = "The request could not be read."
    return _error_page(
        request,
        400,
        InvalidRequest(message),
        message,
        lambda: defaults.bad_request(request, exception),
    )


def page_not_found(request, exception=None):
    message = f"Invalid URL ({request.method} {request.path})."
    if not request.path.startswith(("/v1/", "/api/")):
        message += " The API is under /v1/: an OpenAI client's base URL ends in /v1."
    return _error_page(
        request,
        404,
        RouteNotFound(message),
        "Not found.",
        lambda: defaults.page_not_found(request, exception),
    )


def server_error(request):
    message = "The gateway failed to process the request."
    return _error_page(
        request, 500, GatewayError(message), message, lambda: defaults.server_error(request)
    )
