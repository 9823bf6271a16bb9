"""Errors of the OpenAI-compatible endpoints, in OpenAI's shape, with the status the SDK
maps to the right exception class. One class per kind of failure."""

from __future__ import annotations

import logging

from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response

logger = logging.getLogger(__name__)


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class UnsupportedEncoding(InvalidRequest):
    status = 415
    code = "unsupported_content_encoding"


class UnprocessableRequest(InvalidRequest):
    status = 422


class ModelNotFound(InvalidRequest):
    status = 404
    code = "model_not_found"


class RouteNotFound(InvalidRequest):
    status = 404
    code = "not_found"


class ModelNotAllowed(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class ModelNotPriced(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_priced"


class TenantSuspended(GatewayError):
    status = 403
    type = "permission_error"
    code = "tenant_suspended"


class UpstreamRateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "upstream_rate_limited"


class RateLimitExceeded(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BudgetExhausted(GatewayError):
    """A hard budget the call may not fit. Waiting cannot fix it: the SDK must not retry."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, **kwargs):
        super().__init__(message, **kwargs)
        self.headers = {**self.headers, "x-should-retry": "false"}


class UpstreamFailed(GatewayError):
    """The provider failed, refused the gateway, or answered something unusable."""

    status = 502
    type = "api_error"
    code = "upstream_error"


class GatewayRestarting(GatewayError):
    """The gateway process is stopping (a deploy): send the request again, another process
    answers it. The SDK retries a 503 by itself."""

    status = 503
    type = "api_error"
    code = "gateway_restarting"


class NoTargetAvailable(GatewayError):
    """Every target of a route is skipped for now (breakers open): retry later."""

    status = 503
    type = "api_error"
    code = "no_target_available"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "api_error"
    code = "upstream_timeout"


# DRF's own exceptions, raised by authentication and routing, in OpenAI's vocabulary.
_DRF_TYPES: dict[type[exceptions.APIException], tuple[str, str | None]] = {
    exceptions.NotAuthenticated: ("invalid_request_error", "missing_api_key"),
    exceptions.AuthenticationFailed: ("invalid_request_error", "invalid_api_key"),
    exceptions.PermissionDenied: ("permission_error", None),
    exceptions.NotFound: ("invalid_request_error", "not_found"),
    exceptions.MethodNotAllowed: ("invalid_request_error", "method_not_allowed"),
    exceptions.ParseError: ("invalid_request_error", None),
    exceptions.UnsupportedMediaType: ("invalid_request_error", None),
    exceptions.Throttled: ("rate_limit_error", "rate_limit_exceeded"),
}


def openai_error_response(exc: GatewayError) -> Response:
    return Response(exc.body(), status=exc.status, headers=exc.headers)


def openai_exception_handler(exc: Exception, context) -> Response:
    """DRF exception handler for /v1/: everything leaves as {"error": {...}}."""
    if isinstance(exc, GatewayError):
        return openai_error_response(exc)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    if isinstance(exc, exceptions.APIException):
        error_type, code = "api_error", None
        for cls, mapped in _DRF_TYPES.items():
            if isinstance(exc, cls):
                error_type, code = mapped
                break
        if code is None and isinstance(exc.detail, str):
            code = getattr(exc.detail, "code", None)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if isinstance(exc, exceptions.NotAuthenticated):
            message = "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
        error = GatewayError(str(message), code=code)
        error.type = error_type
        error.status = exc.status_code
        headers = {}
        if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
            headers["WWW-Authenticate"] = 'Bearer realm="tollgate"'
            # No retry can fix a wrong key.
            headers["x-should-retry"] = "false"
        if getattr(exc, "wait", None):
            headers["Retry-After"] = str(int(exc.wait))
        error.headers = headers
        return openai_error_response(error)
    logger.exception("Unhandled error in the OpenAI-compatible API")
    return openai_error_response(GatewayError("The gateway failed to process the request."))
