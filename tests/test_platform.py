"""The reference deployment in platform/: what the image may hold."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (or the directory holding it) out of the build
    context, for the pattern forms .dockerignore uses here (`name`, `**/name`, `a*`)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        for prefix in prefixes:
            if fnmatch(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch(prefix.rsplit("/", 1)[-1], pattern[3:]):
                return True
    return False


def test_the_image_holds_no_secret_and_nothing_local():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # platform/compose.yaml builds from the repository, and reads the secrets from
    # platform/.env (platform/env.example says so).
    for local in (
        "platform/.env",
        ".env",
        ".venv/bin/python",
        ".git/config",
        ".run/admin-password",
        "db.sqlite3",
        "bench-results/gateway.json",
        "billing/__pycache__/models.cpython-311.pyc",
    ):
        assert _ignored(local, patterns), local
    for needed in ("manage.py", "config/settings/production.py", "platform/gunicorn.conf.py"):
        assert not _ignored(needed, patterns), needed
    assert "env_file: .env" in (ROOT / "platform" / "compose.yaml").read_text()
