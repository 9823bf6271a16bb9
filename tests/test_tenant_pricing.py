"""A tenant's own prices: negotiated per model or a markup on the list, winning from
their start, versioned like list prices."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import TenantPrice, UsageEvent
from billing.pricing import (
    tenant_price_cancel,
    tenant_price_in_force,
    tenant_price_set,
    unit_prices,
)
from routing.models import ModelPrice
from routing.services import PriceChangeError, price_change_earliest

from .conftest import model_create

MESSAGES = [{"role": "user", "content": "hello there world"}]
USAGE = {"prompt_tokens": 1000, "cached_tokens": 800, "completion_tokens": 500}


def test_markup_multiplies_each_list_price_rounded_to_six_places():
    price = ModelPrice(
        input_per_mtok=Decimal("0.27"),
        cached_input_per_mtok=None,
        output_per_mtok=Decimal("0.333333"),
    )
    units = unit_prices(price, TenantPrice(markup_percent=Decimal("12.5")))
    assert units.input == Decimal("0.303750")
    assert units.cached_input is None and units.cached_input_effective == Decimal("0.303750")
    assert units.output == Decimal("0.375000")  # 0.374999625 rounded half up


def test_negotiated_price_falls_back_to_the_list_for_fields_it_leaves_empty():
    price = ModelPrice(
        input_per_mtok=Decimal("0.27"),
        cached_input_per_mtok=Decimal("0.07"),
        output_per_mtok=Decimal("1.10"),
    )
    units = unit_prices(price, TenantPrice(output_per_mtok=Decimal("0.90")))
    assert (units.input, units.cached_input, units.output) == (
        Decimal("0.27"),
        Decimal("0.07"),
        Decimal("0.90"),
    )


def later(world, **kwargs) -> TenantPrice:
    return tenant_price_set(tenant=world.tenant, **kwargs)


def priced_call(world, model="m-openai") -> UsageEvent:
    completion = world.client().chat.completions.create(
        model=model, messages=MESSAGES, extra_body={"mock": {"usage": USAGE}}
    )
    return UsageEvent.objects.get(request_id=completion._request_id)


def start_now(version: TenantPrice) -> None:
    """Move a version's start into the past, as if its time had come."""
    version.effective_from = timezone.now() - timedelta(seconds=1)
    version.save(update_fields=["effective_from"])


def test_a_tenant_price_wins_from_its_start_and_not_before(world):
    markup = later(world, markup_percent=Decimal("20"))
    event = priced_call(world)
    assert event.tenant_price is None
    # List: 200 x 0.27 + 800 x 0.07 + 500 x 1.10 per 1M
    assert event.cost == Decimal("0.000660000000")

    start_now(markup)
    event = priced_call(world)
    assert event.tenant_price == markup
    assert event.cost == Decimal("0.000792000000")  # the same, plus 20 %


def test_a_models_negotiated_price_wins_over_an_every_model_markup(world):
    start_now(later(world, markup_percent=Decimal("20")))
    deal = later(world, model=world.models["qwen"], output_per_mtok=Decimal("0.50"))
    start_now(deal)

    assert priced_call(world, "m-qwen").cost == Decimal("0.000360000000")  # 54 + 56 + 250
    assert priced_call(world, "m-openai").cost == Decimal("0.000792000000")


def test_tenant_price_versions_close_and_refuse_to_rewrite_history(world):
    first = later(world, markup_percent=Decimal("10"))
    second = later(
        world,
        markup_percent=Decimal("15"),
        effective_from=first.effective_from + timedelta(hours=1),
    )
    first.refresh_from_db()
    assert first.effective_to == second.effective_from
    assert (
        tenant_price_in_force(
            tenant_id=world.tenant.pk, model_id=world.models["glm"].pk, at=second.effective_from
        )
        == second
    )
    with pytest.raises(PriceChangeError, match="at or after"):
        later(world, markup_percent=Decimal("5"), effective_from=timezone.now())
    with pytest.raises(PriceChangeError, match="not both"):
        later(
            world,
            model=world.models["glm"],
            markup_percent=Decimal("5"),
            output_per_mtok=Decimal("1"),
        )
    with pytest.raises(PriceChangeError, match="names a model"):
        later(world, output_per_mtok=Decimal("1"))


def test_a_markup_on_an_unpriced_model_leaves_it_unpriced(world):
    model = model_create("m-unpriced", provider=world.providers["openai"], priced=False)
    world.tenant.allowed_models.add(model)
    start_now(later(world, markup_percent=Decimal("20")))
    import openai

    with pytest.raises(openai.PermissionDeniedError, match="no price"):
        priced_call(world, "m-unpriced")
    assert price_change_earliest() > timezone.now()


def test_tenant_prices_are_added_in_the_admin(admin_client, world):
    from django.urls import reverse

    start = price_change_earliest() + timedelta(minutes=5)
    response = admin_client.post(
        reverse("admin:billing_tenantprice_add"),
        {
            "tenant": world.tenant.pk,
            "markup_percent": "7.5",
            "effective_from_0": start.strftime("%Y-%m-%d"),
            "effective_from_1": start.strftime("%H:%M:%S"),
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    assert TenantPrice.objects.get().markup_percent == Decimal("7.5")
    both = admin_client.post(
        reverse("admin:billing_tenantprice_add"),
        {
            "tenant": world.tenant.pk,
            "markup_percent": "5",
            "output_per_mtok": "1",
            "effective_from_0": start.strftime("%Y-%m-%d"),
            "effective_from_1": start.strftime("%H:%M:%S"),
        },
    )
    assert "not both" in both.content.decode()
    assert admin_client.get(reverse("admin:billing_tenantprice_changelist")).status_code == 200
    stored = TenantPrice.objects.get()
    page = admin_client.get(reverse("admin:billing_tenantprice_change", args=[stored.pk]))
    assert page.status_code == 200 and "7.5" in page.content.decode()


NEGATIVE = "A price is not negative: USD per 1M tokens, 0 or more."


@pytest.mark.django_db
@pytest.mark.parametrize(
    "prices, field, message",
    [
        ({"output_per_mtok": "-1"}, "output_per_mtok", NEGATIVE),
        ({"input_per_mtok": "-1", "output_per_mtok": "1"}, "input_per_mtok", NEGATIVE),
        (
            {"cached_input_per_mtok": "-0.5", "output_per_mtok": "1"},
            "cached_input_per_mtok",
            NEGATIVE,
        ),
        (
            {"markup_percent": "-100"},
            "markup_percent",
            "A markup is above -100 % (-100 % would bill nothing).",
        ),
    ],
)
def test_a_negative_tenant_price_is_refused_on_its_field_in_the_admin(
    admin_client, shop, prices, field, message
):
    from django.urls import reverse

    tenant, _, model = shop
    start = price_change_earliest() + timedelta(minutes=5)
    response = admin_client.post(
        reverse("admin:billing_tenantprice_add"),
        {
            "tenant": tenant.pk,
            "model": "" if "markup_percent" in prices else model.pk,
            **prices,
            "effective_from_0": start.strftime("%Y-%m-%d"),
            "effective_from_1": start.strftime("%H:%M:%S"),
        },
    )
    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {field: [message]}
    assert "Constraint" not in response.content.decode()
    assert not TenantPrice.objects.exists()


@pytest.mark.django_db
def test_a_tenant_price_that_would_rewrite_history_is_refused_in_the_admin_form(admin_client, shop):
    from django.urls import reverse

    from .conftest import record

    tenant, (key, _), model = shop
    current = tenant_price_set(
        tenant=tenant,
        markup_percent=Decimal("10"),
        effective_from=price_change_earliest() + timedelta(minutes=10),
    )
    # A call priced with the current version, 20 minutes from now (a clock ahead, say).
    record(
        key,
        model,
        current.effective_from + timedelta(minutes=10),
        tenant_price=current,
        output=10,
    )

    def add(start):
        return admin_client.post(
            reverse("admin:billing_tenantprice_add"),
            {
                "tenant": tenant.pk,
                "markup_percent": "5",
                "effective_from_0": start.strftime("%Y-%m-%d"),
                "effective_from_1": start.strftime("%H:%M:%S"),
            },
        )

    before = add(current.effective_from - timedelta(minutes=5))
    assert before.status_code == 200
    errors = before.context["adminform"].form.errors
    assert list(errors) == ["effective_from"]
    assert errors["effective_from"][0].startswith("The new price must start after the current one")
    over_usage = add(current.effective_from + timedelta(minutes=5))
    assert over_usage.status_code == 200
    assert over_usage.context["adminform"].form.errors == {
        "effective_from": [
            "Usage after that instant is already priced with the current version; "
            "choose a later start."
        ]
    }
    assert list(TenantPrice.objects.all()) == [current]
    assert add(current.effective_from + timedelta(minutes=15)).status_code == 302


def test_a_scheduled_tenant_price_is_withdrawn_in_the_admin_and_the_one_before_reopens(
    admin_client, world
):
    from django.urls import reverse

    first = later(world, markup_percent=Decimal("10"))
    typo = later(
        world,
        markup_percent=Decimal("1000"),
        effective_from=first.effective_from + timedelta(hours=1),
    )
    other_model = later(world, model=world.models["glm"], output_per_mtok=Decimal("1"))
    delete = "admin:billing_tenantprice_delete"
    # Not the one before it: the typo starts where it ends.
    assert admin_client.get(reverse(delete, args=[first.pk])).status_code == 403
    response = admin_client.post(reverse(delete, args=[typo.pk]), {"post": "yes"})
    assert response.status_code == 302
    first.refresh_from_db()
    assert first.effective_to is None  # the every-model markup reopens
    other_model.refresh_from_db()
    assert other_model.effective_to is None  # another sequence: untouched
    assert set(TenantPrice.objects.all()) == {first, other_model}
    at = first.effective_from + timedelta(hours=2)
    assert tenant_price_in_force(tenant_id=world.tenant.pk, model_id=None, at=at) == first


def test_a_tenant_price_in_force_cannot_be_withdrawn(world):
    current = later(world, markup_percent=Decimal("10"))
    start_now(current)
    current.refresh_from_db()
    with pytest.raises(PriceChangeError, match="Only the latest price version"):
        tenant_price_cancel(current)
    assert TenantPrice.objects.get() == current
