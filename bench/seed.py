"""Seed a freshly migrated benchmark database; print the tenant's bearer key as JSON.

Run by bench.stack in a subprocess with the gateway's own environment (settings, database
URL, key pepper), so that the key digest matches what the gateway computes:

    python -m bench.seed --mock-url http://127.0.0.1:PORT/openai/v1
"""

from __future__ import annotations

import argparse
import json
import os
from decimal import Decimal

MODEL_ID = "bench-model"
ROUTE_ID = "bench-route"
TENANT_SLUG = "bench"
PROVIDER_NAME = "bench-mock"


def seed(mock_url: str, *, limits: bool = False, keys: int = 1) -> dict[str, object]:
    """Provider, priced catalog model, tenant allowed to use it, and `keys` API keys.

    With `limits`, the tenant and every key get hard budgets and the keys rate limits,
    all far above what the benchmark uses: every call then pays for the checks, none is
    refused.
    """
    from django.utils import timezone

    from routing.models import CatalogModel, ModelPrice, Route, RouteTarget
    from routing.services import provider_set
    from tenants.services import api_key_issue, tenant_create

    provider, _created = provider_set(name=PROVIDER_NAME, base_url=mock_url, api_key_env="")
    model = CatalogModel.objects.create(
        public_id=MODEL_ID,
        display_name="Bench model",
        family="Bench",
        developer="Bench Lab",
        provider=provider,
        upstream_model_id=MODEL_ID,
    )
    ModelPrice.objects.create(
        model=model,
        input_per_mtok=Decimal("0.27"),
        cached_input_per_mtok=Decimal("0.07"),
        output_per_mtok=Decimal("1.10"),
        effective_from=timezone.now() - timezone.timedelta(days=1),
    )
    tenant = tenant_create(slug=TENANT_SLUG, name="Bench", model_ids=[MODEL_ID])
    issued = [
        api_key_issue(tenant=tenant, name="bench" if n == 0 else f"bench-{n + 1}")
        for n in range(keys)
    ]
    # A route to the same model: what a route costs over calling the model by its id.
    route = Route.objects.create(name=ROUTE_ID, strategy=Route.Strategy.FALLBACK)
    RouteTarget.objects.create(route=route, model=model, timeout_seconds=10)
    if limits:
        from tenants.budgets import budget_set

        budget_set(tenant=tenant, limit_usd=Decimal("1000000"))
        for one in issued:
            one.key.rpm_limit = 1_000_000
            one.key.tpm_limit = 1_000_000_000
            one.key.concurrency_limit = 10_000
            one.key.save()
            budget_set(tenant=tenant, key=one.key, limit_usd=Decimal("1000000"))
    return {
        "secret": issued[0].secret,
        "secrets": [one.secret for one in issued],
        "model": MODEL_ID,
        "tenant_id": str(tenant.pk),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mock-url", required=True, help="the provider base URL, ending in /v1")
    parser.add_argument("--limits", action="store_true", help="budgets and rate limits on")
    parser.add_argument("--keys", type=int, default=1, help="how many API keys to issue")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")
    import django

    django.setup()
    print(json.dumps(seed(args.mock_url, limits=args.limits, keys=args.keys)))


if __name__ == "__main__":
    main()
