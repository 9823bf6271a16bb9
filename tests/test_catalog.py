"""The shipped catalog, its versioned prices, and the checks that keep unpriced models loud."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.utils import timezone

from routing.checks import catalog_prices_check
from routing.models import CatalogModel, ModelPrice, Provider
from routing.selectors import model_price_in_force
from routing.services import (
    PriceChangeError,
    model_price_cancel,
    model_price_set,
    price_change_earliest,
)

pytestmark = pytest.mark.django_db

SEED_OUTPUT_PRICES = {
    "deepseek-v4-flash": "0.25",
    "deepseek-v3.2": "0.38",
    "deepseek-v4-pro": "0.78",
    "deepseek-r1": "2.50",
    "deepseek-coder": "0.25",
    "Qwen/Qwen3-8B": "0.01",
    "Qwen/Qwen3-32B": "0.28",
    "Qwen/Qwen3-Coder-30B": "0.35",
    "Qwen/Qwen3-VL-32B": "0.52",
    "Qwen/Qwen3-Omni-30B": "0.52",
    "Qwen/Qwen3.5-397B": "2.34",
    "Qwen/Qwen3.6-35B": "1.00",
    "moonshotai/Kimi-K2.5": "3.00",
    "zai-org/GLM-4-9B": "0.01",
    "zai-org/GLM-5": "1.92",
}


def test_fresh_database_holds_the_default_provider_and_the_seed_catalog():
    provider = Provider.objects.get(name="global-api")
    assert provider.base_url == "https://global-apis.com/v1"
    assert provider.api_key_env == "GLOBAL_API_KEY"

    models = {m.public_id: m for m in CatalogModel.objects.all()}
    assert set(models) == {*SEED_OUTPUT_PRICES, "zai-org/GLM-4.6V"}
    for public_id, output in SEED_OUTPUT_PRICES.items():
        price = models[public_id].prices.get()
        assert price.output_per_mtok == Decimal(output), public_id
        # The seeds publish no input prices: none are invented.
        assert price.input_per_mtok is None and price.cached_input_per_mtok is None
    assert not models["zai-org/GLM-4.6V"].prices.exists()
    assert all(m.context_window == 128_000 and m.provider == provider for m in models.values())


def test_seed_families_developers_and_capabilities():
    flash = CatalogModel.objects.get(public_id="deepseek-v4-flash")
    assert (flash.family, flash.developer) == ("DeepSeek", "DeepSeek (幻方)")
    omni = CatalogModel.objects.get(public_id="Qwen/Qwen3-Omni-30B")
    assert set(omni.modalities) == {"text", "image", "audio", "video"}
    assert "vision" in CatalogModel.objects.get(public_id="zai-org/GLM-4.6V").capabilities
    assert "reasoning" in CatalogModel.objects.get(public_id="deepseek-r1").capabilities
    assert (
        CatalogModel.objects.get(public_id="moonshotai/Kimi-K2.5").developer
        == "Moonshot AI (月之暗面)"
    )
    assert CatalogModel.objects.get(public_id="zai-org/GLM-5").developer == "Zhipu AI (智谱)"
    assert CatalogModel.objects.get(public_id="Qwen/Qwen3-32B").developer == "Alibaba (阿里)"


def test_system_check_flags_unset_input_prices_and_unpriced_models():
    messages = {m.id: m.msg for m in catalog_prices_check()}
    assert "deepseek-v4-flash" in messages["routing.W001"]
    assert "zai-org/GLM-4.6V" in messages["routing.W002"]
    assert "zai-org/GLM-4.6V" not in messages["routing.W001"]


def test_system_check_is_quiet_once_everything_is_priced():
    for model in CatalogModel.objects.all():
        model_price_set(
            model=model, input_per_mtok=Decimal("0.10"), output_per_mtok=Decimal("0.20")
        )
    assert catalog_prices_check() == []


def test_check_command_reports_the_warnings(capsys):
    call_command("check")
    assert "routing.W001" in capsys.readouterr().err


def test_price_change_closes_the_current_version_and_opens_a_new_one():
    model = CatalogModel.objects.get(public_id="deepseek-v4-flash")
    old = model.prices.get()
    change_at = price_change_earliest()

    new = model_price_set(
        model=model,
        input_per_mtok=Decimal("0.07"),
        output_per_mtok=Decimal("0.30"),
        effective_from=change_at,
    )

    old.refresh_from_db()
    assert old.effective_to == change_at
    assert old.output_per_mtok == Decimal("0.25")  # history is not edited
    assert new.effective_to is None
    assert model_price_in_force(model_id=model.pk, at=change_at - timedelta(seconds=1)) == old
    assert model_price_in_force(model_id=model.pk, at=change_at) == new


def test_price_change_cannot_rewrite_history():
    model = CatalogModel.objects.get(public_id="deepseek-v4-flash")
    current = model.prices.get()
    with pytest.raises(PriceChangeError):
        model_price_set(
            model=model,
            input_per_mtok=None,
            output_per_mtok=Decimal("0.30"),
            effective_from=current.effective_from - timedelta(days=1),
        )
    with pytest.raises(PriceChangeError):
        model_price_set(
            model=model,
            input_per_mtok=None,
            output_per_mtok=0.3,
            effective_from=price_change_earliest(),
        )
    assert ModelPrice.objects.filter(model=model).count() == 1


def test_a_new_price_cannot_start_before_every_process_can_know_it(settings):
    settings.TOLLGATE_CONFIG_CACHE_SECONDS = 30
    model = CatalogModel.objects.get(public_id="deepseek-v4-flash")
    with pytest.raises(PriceChangeError, match="must start at or after"):
        model_price_set(
            model=model,
            input_per_mtok=None,
            output_per_mtok=Decimal("0.30"),
            effective_from=timezone.now() + timedelta(seconds=10),
        )
    # Without a start, it takes the earliest allowed one.
    price = model_price_set(model=model, input_per_mtok=None, output_per_mtok=Decimal("0.30"))
    assert price.effective_from >= timezone.now() + timedelta(seconds=30)


def test_a_price_change_never_moves_recorded_usage_to_another_version(settings):
    from billing.metering import TokenBuckets
    from billing.services import usage_record
    from tenants.services import api_key_issue, tenant_create

    from .conftest import usage_facts

    model = CatalogModel.objects.get(public_id="deepseek-v4-flash")
    tenant = tenant_create(slug="acme", name="Acme", model_ids=[model.public_id])
    # An event stamped ahead of this host's clock (another host's skew).
    ahead = timezone.now() + timedelta(hours=1)
    key = api_key_issue(tenant=tenant).key
    usage_record(usage_facts(key, model, buckets=TokenBuckets(output=10), occurred_at=ahead))
    with pytest.raises(PriceChangeError, match="already priced"):
        model_price_set(
            model=model,
            input_per_mtok=None,
            output_per_mtok=Decimal("0.30"),
            effective_from=ahead - timedelta(minutes=10),
        )


def test_a_scheduled_price_is_withdrawn_and_the_one_before_reopens():
    model = CatalogModel.objects.get(public_id="deepseek-v4-flash")
    current = model.prices.get()
    scheduled = model_price_set(
        model=model,
        input_per_mtok=None,
        output_per_mtok=Decimal("1000"),
        effective_from=price_change_earliest() + timedelta(hours=1),
    )
    assert model_price_cancel(scheduled) == current
    current.refresh_from_db()
    assert current.effective_to is None
    assert list(model.prices.all()) == [current]
    later = price_change_earliest() + timedelta(hours=2)
    assert model_price_in_force(model_id=model.pk, at=later) == current


def test_a_price_already_in_force_or_about_to_be_cannot_be_withdrawn(settings):
    settings.TOLLGATE_CONFIG_CACHE_SECONDS = 30
    model = CatalogModel.objects.get(public_id="deepseek-v4-flash")
    current = model.prices.get()
    with pytest.raises(PriceChangeError, match="Only the latest price version"):
        model_price_cancel(current)  # in force since the catalog was loaded
    soon = model_price_set(
        model=model, input_per_mtok=None, output_per_mtok=Decimal("0.30")
    )  # at the earliest start: processes may be pricing with it within 30 s
    settings.TOLLGATE_CONFIG_CACHE_SECONDS = 60
    with pytest.raises(PriceChangeError):
        model_price_cancel(soon)
    assert ModelPrice.objects.filter(model=model).count() == 2
