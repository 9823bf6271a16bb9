"""DRF authentication: a tenant's API key for /v1/, a staff token for /api/.

Neither ever puts the presented secret into an error message or a log line.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.utils import timezone
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header

from .models import ApiKey, StaffToken, Tenant
from .selectors import api_key_for_digest
from .services import key_digest, key_touch


def _bearer(request) -> str | None:
    header = get_authorization_header(request)
    if not header:
        return None
    scheme, _, credential = header.partition(b" ")
    if scheme.lower() != b"bearer" or not credential.strip():
        raise exceptions.AuthenticationFailed(
            "Expected 'Authorization: Bearer <API key>'.", code="invalid_api_key"
        )
    try:
        return credential.strip().decode("ascii")
    except UnicodeDecodeError:
        raise exceptions.AuthenticationFailed(
            "Incorrect API key provided.", code="invalid_api_key"
        ) from None


@dataclass(frozen=True)
class TenantPrincipal:
    """request.user for /v1/: the tenant acting through one key."""

    key: ApiKey

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False

    @property
    def tenant_is_active(self) -> bool:
        return self.key.tenant_status == Tenant.Status.ACTIVE


class ApiKeyAuthentication(BaseAuthentication):
    """`Authorization: Bearer tg-...` -> (TenantPrincipal, ApiKey).

    Unknown, revoked or expired keys are 401. A suspended tenant authenticates but is then
    refused with 403 by the `TenantActive` permission.
    """

    def authenticate(self, request):
        secret = _bearer(request)
        if secret is None:
            return None
        key = api_key_for_digest(key_digest(secret))
        if key is None:
            raise exceptions.AuthenticationFailed(
                "Incorrect API key provided. You can find your API key with your administrator.",
                code="invalid_api_key",
            )
        now = timezone.now()
        if key.revoked_at is not None:
            raise exceptions.AuthenticationFailed(
                "This API key has been revoked.", code="invalid_api_key"
            )
        if key.expires_at is not None and key.expires_at <= now:
            raise exceptions.AuthenticationFailed(
                "This API key has expired.", code="invalid_api_key"
            )
        key_touch(key, now=now)
        return TenantPrincipal(key=key), key

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="tollgate"'


class StaffTokenAuthentication(BaseAuthentication):
    """`Authorization: Bearer tgs-...` -> (Django user, StaffToken), for /api/."""

    def authenticate(self, request):
        secret = _bearer(request)
        if secret is None:
            return None
        token = StaffToken.objects.select_related("user").filter(digest=key_digest(secret)).first()
        now = timezone.now()
        if token is None or not token.is_usable(now) or not token.user.is_active:
            raise exceptions.AuthenticationFailed("Invalid or revoked staff token.")
        key_touch(token, now=now)
        return token.user, token

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="tollgate-api"'
