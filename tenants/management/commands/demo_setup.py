"""`make run`'s setup: an admin login, a demo tenant with a key, the provider pointed at
the mock upstream unless a real key is configured, and a banner saying how to use it.

Safe to run again: the admin and tenant are reused, and so is the demo key while it is
valid. The two local secrets (admin password, demo key) live in files under .run/ with
owner-only permissions, for the laptop demo only; the database keeps only the digest.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model

from config.commands import ScriptedCommand
from routing.models import CatalogModel, ModelPrice, Route, RouteTarget
from routing.services import provider_set
from tenants.models import ApiKey, Tenant
from tenants.services import api_key_issue, key_digest, tenant_allowlist_set, tenant_create

DEFAULT_PROVIDER = "global-api"
REAL_BASE_URL = "https://global-apis.com/v1"
REAL_KEY_ENV = "GLOBAL_API_KEY"
DEMO_MODEL = "deepseek-v4-flash"


def _secret_file(name: str) -> Path:
    folder = Path(settings.BASE_DIR) / ".run"
    folder.mkdir(exist_ok=True)
    return folder / name


def _write_private(path: Path, value: str) -> None:
    path.write_text(value + "\n")
    path.chmod(0o600)


class Command(ScriptedCommand):
    help = "Prepare the local demo (admin, tenant, key, provider) and print how to use it."

    def add_arguments(self, parser):
        parser.add_argument("--gateway-url", default="http://127.0.0.1:8000")
        parser.add_argument("--mock-url", default="http://127.0.0.1:8001/v1")

    def handle(self, *args, gateway_url: str, mock_url: str, **options):
        password = self._admin()
        upstream = self._provider(mock_url)
        key = self._demo_key()
        self._routes()
        self.stdout.write(self._banner(gateway_url.rstrip("/"), password, key, upstream))

    def _admin(self) -> str | None:
        path = _secret_file("admin-password")
        users = get_user_model().objects
        user = users.filter(username="admin").first()
        if user is None:
            password = secrets.token_urlsafe(12)
            users.create_superuser("admin", email="admin@localhost", password=password)
            _write_private(path, password)
            return password
        if path.exists() and user.check_password(path.read_text().strip()):
            return path.read_text().strip()
        return None  # changed by its owner: not ours to reset

    def _provider(self, mock_url: str) -> str:
        if os.environ.get(REAL_KEY_ENV):
            provider_set(name=DEFAULT_PROVIDER, base_url=REAL_BASE_URL, api_key_env=REAL_KEY_ENV)
            return f"{REAL_BASE_URL} (key from ${REAL_KEY_ENV})"
        provider_set(name=DEFAULT_PROVIDER, base_url=mock_url, api_key_env="")
        return f"the mock upstream at {mock_url} (export {REAL_KEY_ENV}=... to use {REAL_BASE_URL})"

    def _demo_key(self) -> str:
        tenant = Tenant.objects.filter(slug="demo").first()
        priced = ModelPrice.objects.filter(
            effective_to__isnull=True, output_per_mtok__isnull=False
        ).values_list("model__public_id", flat=True)
        model_ids = list(
            CatalogModel.objects.filter(enabled=True, public_id__in=priced).values_list(
                "public_id", flat=True
            )
        )
        if tenant is None:
            tenant = tenant_create(slug="demo", name="Demo tenant", model_ids=model_ids)
        elif not tenant.allowed_models.exists():
            tenant_allowlist_set(tenant=tenant, model_ids=model_ids)

        path = _secret_file("demo-key")
        if path.exists():
            secret = path.read_text().strip()
            key = ApiKey.objects.filter(digest=key_digest(secret), tenant=tenant).first()
            if key is not None and key.is_usable():
                return secret
        secret = api_key_issue(tenant=tenant, name="demo (make run)").secret
        _write_private(path, secret)
        return secret

    def _routes(self) -> None:
        """The seeds' routing as two routes, unless an admin already has routes."""
        if Route.objects.exists():
            return
        models = {m.public_id: m for m in CatalogModel.objects.all()}

        def route(name: str, strategy: str, description: str, targets: list[dict]) -> None:
            created = Route.objects.create(name=name, strategy=strategy, description=description)
            for position, target in enumerate(targets):
                target["model"] = models[target["model"]]
                RouteTarget.objects.create(route=created, position=position, **target)

        route(
            "auto",
            Route.Strategy.RULES,
            "The seeds' router: vision, heavy reasoning, cheap and fast, general default.",
            [
                {"model": "Qwen/Qwen3-VL-32B", "when_image": True},
                {"model": "Qwen/Qwen3.5-397B", "when_reasoning": True, "min_prompt_tokens": 2000},
                {"model": "Qwen/Qwen3-8B", "max_prompt_chars": 200},
                {"model": "Qwen/Qwen3-32B"},
            ],
        )
        route(
            "tier-1",
            Route.Strategy.FALLBACK,
            "DeepSeek V4 Flash, failing fast to Qwen3-32B after 10 s.",
            [
                {"model": "deepseek-v4-flash", "timeout_seconds": 10},
                {"model": "Qwen/Qwen3-32B", "timeout_seconds": 10},
            ],
        )

    def _banner(self, url: str, password: str | None, key: str, upstream: str) -> str:
        login = f"admin / {password}" if password else "admin (password unchanged)"
        return f"""
  Tollgate is starting on {url}

    Admin       {url}/admin/   login {login}
    API docs    {url}/api/docs/
    Demo key    {key}
    Upstream    {upstream}
    Routes      auto (the seeds' router), tier-1 (flash, then Qwen3-32B after 10 s):
                call them as models; edit them in the admin under Routing > Routes

  Try it (the virtual environment has the openai SDK):

.venv/bin/python - <<'PY'
from openai import OpenAI

client = OpenAI(base_url="{url}/v1", api_key="{key}")
reply = client.chat.completions.create(
    model="{DEMO_MODEL}",
    messages=[{{"role": "user", "content": "Explain quantum computing in 100 words"}}],
)
print(reply.choices[0].message.content)
print(reply.usage)
PY
"""
