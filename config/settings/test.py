"""Test settings: the embedded default unless DATABASE_URL points at PostgreSQL."""

import os

from .base import *  # noqa: F403
from .base import BASE_DIR, DATABASES

DEBUG = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
TOLLGATE_KEY_PEPPER = "test-pepper-0123456789abcdef0123456789abcdef"

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not :memory:, so the live server's threads each get their own connection;
    # one per test run, so that two runs in one checkout do not share (and break) it. The
    # servers and workers the tests start are told its path (tests/conftest.py).
    DATABASES["default"]["TEST"] = {"NAME": str(BASE_DIR / ".run" / f"test-{os.getpid()}.sqlite3")}
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True
STATIC_ROOT = None  # nothing collected outside production

(BASE_DIR / ".run").mkdir(exist_ok=True)
