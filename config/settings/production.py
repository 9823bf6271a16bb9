"""Production settings: every secret must come from the environment."""

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F403
from .base import INSECURE_SECRET_KEY, SECRET_KEY, env

DEBUG = False

if not SECRET_KEY or SECRET_KEY == INSECURE_SECRET_KEY or len(SECRET_KEY) < 32:
    raise ImproperlyConfigured(
        "Set DJANGO_SECRET_KEY to a random value of at least 32 characters for production."
    )
# Its own variable, not derived from SECRET_KEY: rotating Django's key must not
# invalidate every API key.
TOLLGATE_KEY_PEPPER = env("TOLLGATE_KEY_PEPPER", default="")
if len(TOLLGATE_KEY_PEPPER) < 32:
    raise ImproperlyConfigured(
        "Set TOLLGATE_KEY_PEPPER to a random value of at least 32 characters for production."
    )

SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=True)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
# /metrics shows traffic and cost per model: in production only with its bearer token.
TOLLGATE_METRICS_OPEN = False
