"""The embedded default needs no environment; production refuses to start without secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("DJANGO_", "DATABASE_", "TOLLGATE_", "CELERY_"))
}


def django_setup(settings_module: str, **env: str) -> subprocess.CompletedProcess:
    code = (
        "import django; django.setup(); from django.conf import settings; "
        "print(settings.DATABASES['default']['ENGINE'], settings.CELERY_TASK_ALWAYS_EAGER)"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**CLEAN_ENV, "DJANGO_SETTINGS_MODULE": settings_module, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_with_nothing_set_it_runs_on_sqlite_with_in_process_tasks():
    result = django_setup("config.settings.local")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["django.db.backends.sqlite3", "True"]


def test_database_and_broker_urls_switch_to_postgresql_and_redis():
    result = django_setup(
        "config.settings.local",
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/tollgate",
        CELERY_BROKER_URL="redis://127.0.0.1:6379/0",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["django.db.backends.postgresql", "False"]


def test_production_refuses_to_start_without_a_real_secret_key():
    result = django_setup("config.settings.production")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr


def test_production_refuses_a_missing_pepper():
    result = django_setup("config.settings.production", DJANGO_SECRET_KEY="s" * 50)
    assert result.returncode != 0
    assert "TOLLGATE_KEY_PEPPER" in result.stderr


def test_production_starts_with_its_secrets():
    result = django_setup(
        "config.settings.production", DJANGO_SECRET_KEY="s" * 50, TOLLGATE_KEY_PEPPER="p" * 50
    )
    assert result.returncode == 0, result.stderr
