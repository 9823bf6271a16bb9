"""The per-process configuration snapshot: changes saved in this process apply at once;
changes made elsewhere (another gateway process) apply within its lifetime."""

from __future__ import annotations

import time

import pytest

from routing.models import CatalogModel, Provider
from routing.selectors import catalog_cache_clear, catalog_entry
from tenants.models import Tenant
from tenants.selectors import allowlist_cache_clear, model_for_key
from tenants.services import api_key_issue, tenant_create

from .conftest import model_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def short_lived_cache(settings):
    settings.TOLLGATE_CONFIG_CACHE_SECONDS = 0.3
    catalog_cache_clear()
    allowlist_cache_clear()
    yield 0.3
    catalog_cache_clear()
    allowlist_cache_clear()


@pytest.fixture
def key():
    provider = Provider.objects.create(name="p", base_url="http://127.0.0.1:9/v1")
    model_create("m-one", provider=provider)
    model_create("m-two", provider=provider)
    tenant = tenant_create(slug="acme", name="Acme", model_ids=["m-one"])
    return api_key_issue(tenant=tenant).key


def test_saves_in_this_process_apply_at_once(short_lived_cache, key):
    assert model_for_key(key=key, public_id="m-two") == (catalog_entry("m-two"), False)
    key.tenant.allowed_models.add(CatalogModel.objects.get(public_id="m-two"))
    assert model_for_key(key=key, public_id="m-two")[1] is True

    model = CatalogModel.objects.get(public_id="m-two")
    model.enabled = False
    model.save()
    assert catalog_entry("m-two") is None


def test_changes_from_another_process_apply_within_the_cache_lifetime(short_lived_cache, key):
    assert catalog_entry("m-one").model.upstream_model_id == "upstream-m-one"
    assert model_for_key(key=key, public_id="m-one")[1] is True

    # queryset.update() sends no signal: as if another process had made the change.
    CatalogModel.objects.filter(public_id="m-one").update(upstream_model_id="renamed")
    through = Tenant.allowed_models.through
    through.objects.filter(tenant_id=key.tenant_id).delete()
    assert catalog_entry("m-one").model.upstream_model_id == "upstream-m-one"
    assert model_for_key(key=key, public_id="m-one")[1] is True

    time.sleep(short_lived_cache + 0.1)
    assert catalog_entry("m-one").model.upstream_model_id == "renamed"
    assert model_for_key(key=key, public_id="m-one")[1] is False


def test_price_versions_in_the_snapshot_price_by_instant(short_lived_cache, key):
    from datetime import timedelta
    from decimal import Decimal

    from routing.services import model_price_set, price_change_earliest

    model = CatalogModel.objects.get(public_id="m-one")
    start = price_change_earliest()
    new = model_price_set(
        model=model, input_per_mtok=None, output_per_mtok=Decimal("9.99"), effective_from=start
    )
    entry = catalog_entry("m-one")
    assert entry.price_at(start - timedelta(microseconds=1)).output_per_mtok == Decimal("1.10")
    assert entry.price_at(start) == new
    assert entry.price_at(entry.prices[0].effective_from - timedelta(seconds=1)) is None


def test_a_budget_change_applies_on_the_next_request_whatever_the_cache(settings, key):
    from decimal import Decimal

    from tenants.budgets import budget_set, budgets_for_key
    from tenants.selectors import api_key_for_digest

    settings.TOLLGATE_CONFIG_CACHE_SECONDS = 3600
    catalog_cache_clear()

    def seen_by_next_request():
        fresh = api_key_for_digest(key.digest)  # what the next request's key lookup reads
        return budgets_for_key(
            tenant_id=fresh.tenant_id, key_id=fresh.pk, version=fresh.tenant_budget_version
        )

    assert seen_by_next_request() == ()
    budget_set(tenant=key.tenant, limit_usd=Decimal("5"))
    assert [b.limit_usd for b in seen_by_next_request()] == [Decimal("5")]
    budget_set(tenant=key.tenant, limit_usd=Decimal("7"), key=key)
    assert [b.limit_usd for b in seen_by_next_request()] == [Decimal("5"), Decimal("7")]
    key.tenant.budgets.get(api_key__isnull=True).delete()
    assert [b.limit_usd for b in seen_by_next_request()] == [Decimal("7")]
