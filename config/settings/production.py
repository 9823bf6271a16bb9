"""Production settings: every secret must come from the environment."""

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F403
from .base import INSECURE_SECRET_KEY, SECRET_KEY, env

DEBUG = False


def _secret_check(name: str, value: str) -> None:
    """A secret of 32 characters or more, not a placeholder: platform/env.example's
    values are long enough, and public (the pepper also derives every tenant's webhook
    signing secret)."""
    if (
        len(value) < 32
        or len(set(value)) < 8
        or "change-me" in value.lower()
        or value == INSECURE_SECRET_KEY
    ):
        raise ImproperlyConfigured(
            f"Set {name} to a random value of at least 32 characters for production "
            "(not a placeholder such as platform/env.example's): python -c "
            '"import secrets; print(secrets.token_urlsafe(48))"'
        )


_secret_check("DJANGO_SECRET_KEY", SECRET_KEY)
# Its own variable, not derived from SECRET_KEY: rotating Django's key must not
# invalidate every API key.
TOLLGATE_KEY_PEPPER = env("TOLLGATE_KEY_PEPPER", default="")
_secret_check("TOLLGATE_KEY_PEPPER", TOLLGATE_KEY_PEPPER)
# The hosts clients reach the gateway by: the default (loopback only) would answer every
# call through a load balancer with a 400.
if not env("DJANGO_ALLOWED_HOSTS", default=""):
    raise ImproperlyConfigured(
        "Set DJANGO_ALLOWED_HOSTS for production: the host names clients call the gateway "
        "by, comma-separated (e.g. gateway.example.com)."
    )

SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=True)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
# /metrics shows traffic and cost per model: in production only with its bearer token.
TOLLGATE_METRICS_OPEN = False
