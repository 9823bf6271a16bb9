"""Laptop settings: the embedded default (SQLite, in-process tasks) with DEBUG on."""

from .base import *  # noqa: F403
from .base import env

DEBUG = env.bool("DJANGO_DEBUG", default=True)
# A laptop has no mail server: budget alerts' emails are printed, unless EMAIL_URL says.
vars().update(env.email_url("EMAIL_URL", default="consolemail://"))

# Serve static files straight from the apps, without collectstatic.
WHITENOISE_USE_FINDERS = True
STATIC_ROOT = None  # nothing collected outside production
WHITENOISE_AUTOREFRESH = DEBUG
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
