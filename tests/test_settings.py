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


SECRETS = {
    "DJANGO_SECRET_KEY": "Jx8b2Qm7vT0cLr4WnZp9s1KfHd6YgAe3uBt5oNiXq",
    "TOLLGATE_KEY_PEPPER": "p2Lq9Zx4Vn7Bc1Mk8Rt5Wy3Hs6Gd0Fa2Je9Ku4Ob7",
    "DJANGO_ALLOWED_HOSTS": "gateway.example.com",
}


def test_production_refuses_a_missing_pepper():
    result = django_setup(
        "config.settings.production", DJANGO_SECRET_KEY=SECRETS["DJANGO_SECRET_KEY"]
    )
    assert result.returncode != 0
    assert "TOLLGATE_KEY_PEPPER" in result.stderr


def test_production_starts_with_its_secrets():
    result = django_setup("config.settings.production", **SECRETS)
    assert result.returncode == 0, result.stderr


def test_production_refuses_the_examples_placeholders_and_no_allowed_hosts():
    example = dict(
        line.split("=", 1)
        for line in (ROOT / "platform" / "env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name in ("DJANGO_SECRET_KEY", "TOLLGATE_KEY_PEPPER"):
        for placeholder in (example[name], "s" * 50, "change-me-" * 5):
            result = django_setup("config.settings.production", **{**SECRETS, name: placeholder})
            assert result.returncode != 0, (name, placeholder)
            assert f"Set {name} to a random value" in result.stderr
    result = django_setup("config.settings.production", **{**SECRETS, "DJANGO_ALLOWED_HOSTS": ""})
    assert result.returncode != 0
    assert "Set DJANGO_ALLOWED_HOSTS for production" in result.stderr
