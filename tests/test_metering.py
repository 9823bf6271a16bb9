"""Usage normalisation and pricing: disjoint buckets, exact Decimal costs, idempotent
ledger writes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from hypothesis import given
from hypothesis import strategies as st

from billing.metering import TokenBuckets, usage_charge, usage_normalize, usage_reported
from billing.models import UsageEvent
from billing.services import UsageConflictError, UsageFacts, usage_record
from routing.models import Provider
from tenants.services import api_key_issue, tenant_create

from .conftest import model_create, usage_facts


def test_billing_guide_example_splits_into_disjoint_buckets():
    # 1000 prompt tokens with 800 cached, 500 completion tokens with 300 reasoning.
    buckets = usage_normalize(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 500,
            "prompt_tokens_details": {"cached_tokens": 800},
            "completion_tokens_details": {"reasoning_tokens": 300},
        }
    )
    assert buckets == TokenBuckets(input_uncached=200, input_cached=800, output=200, reasoning=300)
    # Billed: 200 uncached input, 800 cached input, 500 output.
    assert (buckets.input_uncached, buckets.input_cached, buckets.completion) == (200, 800, 500)


@pytest.mark.parametrize(
    "usage",
    [
        # DeepSeek: hit/miss counts, sometimes without the OpenAI details.
        {"prompt_tokens": 1000, "completion_tokens": 500, "prompt_cache_hit_tokens": 800,
         "prompt_cache_miss_tokens": 200},
        # DeepSeek with no prompt_tokens at all.
        {"completion_tokens": 500, "prompt_cache_hit_tokens": 800, "prompt_cache_miss_tokens": 200},
        # Kimi: a top-level cached_tokens.
        {"prompt_tokens": 1000, "completion_tokens": 500, "cached_tokens": 800},
        # Both spellings present must not count the cache twice.
        {"prompt_tokens": 1000, "completion_tokens": 500, "cached_tokens": 800,
         "prompt_tokens_details": {"cached_tokens": 800}},
    ],
)  # fmt: skip
def test_every_cache_spelling_gives_the_same_buckets(usage):
    buckets = usage_normalize(usage)
    assert (buckets.input_uncached, buckets.input_cached, buckets.output) == (200, 800, 500)


@pytest.mark.parametrize(
    "usage",
    [
        {},
        {"prompt_tokens": -5, "completion_tokens": "12"},
        {"prompt_tokens": True, "completion_tokens": None},
        {"prompt_tokens_details": "x", "completion_tokens_details": 3},
    ],
)
def test_garbage_usage_never_goes_negative_or_raises(usage):
    buckets = usage_normalize(usage)
    assert min(buckets.input_uncached, buckets.input_cached, buckets.output, buckets.reasoning) >= 0


@pytest.mark.parametrize(
    "usage",
    [
        # Beyond the ledger's 64-bit columns, and beyond Python's 4,300-digit int().
        {"prompt_tokens": 10**19, "completion_tokens": 1e19, "total_tokens": 2 * 10**19},
        {"prompt_tokens": "9" * 5000, "completion_tokens": float("inf")},
        # One count garbled beside readable ones: no output would be billed.
        {"prompt_tokens": 10, "completion_tokens": 10**20, "total_tokens": 10**20 + 10},
        {"prompt_tokens": 10, "completion_tokens": "many"},
    ],
)
def test_absurd_counts_are_unreadable_usage_not_an_error(usage):
    assert not usage_reported(usage)


def test_cached_count_above_prompt_is_capped():
    buckets = usage_normalize({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 50}})
    assert (buckets.input_uncached, buckets.input_cached) == (0, 10)


def test_missing_completion_count_is_derived_from_the_total():
    assert usage_normalize({"prompt_tokens": 10, "total_tokens": 25}).completion == 15


counts = st.integers(min_value=0, max_value=10**9)


@given(prompt=counts, cached=counts, completion=counts, reasoning=counts)
def test_buckets_always_add_back_up_to_the_reported_totals(prompt, cached, completion, reasoning):
    buckets = usage_normalize(
        {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }
    )
    assert buckets.prompt == prompt
    assert buckets.completion == completion
    assert buckets.input_cached == min(cached, prompt)
    assert buckets.reasoning == min(reasoning, completion)


PRICES = {
    "input_per_mtok": Decimal("0.27"),
    "cached_input_per_mtok": Decimal("0.07"),
    "output_per_mtok": Decimal("1.10"),
}


def test_charge_is_exact_decimal():
    charge = usage_charge(
        TokenBuckets(input_uncached=200, input_cached=800, output=200, reasoning=300), **PRICES
    )
    assert charge.cost == Decimal("0.000660")
    assert isinstance(charge.cost, Decimal)
    assert charge.unpriced_tokens == 0


def test_one_token_at_the_cheapest_catalog_price_is_not_rounded_away():
    charge = usage_charge(
        TokenBuckets(output=1),
        input_per_mtok=None,
        cached_input_per_mtok=None,
        output_per_mtok=Decimal("0.01"),
    )
    assert charge.cost == Decimal("0.00000001")


@given(st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=50))
def test_costs_of_parts_add_up_exactly_to_the_cost_of_the_whole(outputs):
    price = {
        "input_per_mtok": None,
        "cached_input_per_mtok": None,
        "output_per_mtok": Decimal("0.15"),
    }
    parts = sum(usage_charge(TokenBuckets(output=n), **price).cost for n in outputs)
    whole = usage_charge(TokenBuckets(output=sum(outputs)), **price).cost
    assert parts == whole


def test_cached_input_without_its_own_price_is_billed_at_the_input_price():
    charge = usage_charge(
        TokenBuckets(input_cached=1_000_000),
        input_per_mtok=Decimal("0.27"),
        cached_input_per_mtok=None,
        output_per_mtok=Decimal("1.10"),
    )
    assert charge.cost == Decimal("0.27")


def test_unset_prices_leave_tokens_unpriced_not_free():
    charge = usage_charge(
        TokenBuckets(input_uncached=300, input_cached=100, output=50),
        input_per_mtok=None,
        cached_input_per_mtok=None,
        output_per_mtok=Decimal("2.50"),
    )
    assert charge.unpriced_tokens == 400
    assert charge.cost == Decimal("0.000125")


@pytest.fixture
def facts():
    """UsageFacts for one tenant, key and model (the test marks which database it needs)."""
    provider = Provider.objects.create(name="p", base_url="http://127.0.0.1:9/v1")
    model = model_create("m", provider=provider)
    tenant = tenant_create(slug="t", name="T", model_ids=["m"])
    key = api_key_issue(tenant=tenant).key
    occurred_at = timezone.now()

    def make(**overrides) -> UsageFacts:
        return usage_facts(
            key, model, **{"request_id": "req_1", "occurred_at": occurred_at, **overrides}
        )

    return make


@pytest.mark.django_db
def test_same_request_id_twice_bills_once(facts):
    first = usage_record(facts())
    again = usage_record(facts(latency_ms=99))  # timing differs; the facts do not
    assert again.pk == first.pk
    assert UsageEvent.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_inside_a_transaction_without_a_savepoint_a_duplicate_fails_it_whole(facts):
    usage_record(facts())
    with pytest.raises(IntegrityError), transaction.atomic():
        usage_record(facts(), savepoint=False)
    # With the savepoint (the default) the same call inside a transaction is a no-op.
    with transaction.atomic():
        assert usage_record(facts()).pk == UsageEvent.objects.get().pk
    assert UsageEvent.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    "other",
    [
        {"buckets": TokenBuckets(input_uncached=10, output=6)},
        {"requested_model": "auto"},
        {"usage_source": UsageEvent.Source.ESTIMATED},
        {"streamed": True},
        {"status": UsageEvent.Status.UPSTREAM_ERROR, "upstream_status": 500},
        {"occurred_at": timezone.now() - timedelta(days=40)},  # another month's invoice
    ],
    ids=["usage", "requested_model", "usage_source", "streamed", "status", "occurred_at"],
)
def test_same_request_id_with_other_facts_is_a_conflict(facts, other):
    usage_record(facts())
    with pytest.raises(UsageConflictError):
        usage_record(facts(**other))
    event = UsageEvent.objects.get()
    assert (event.output_tokens, event.requested_model, event.streamed) == (5, "m", False)


@pytest.mark.django_db(transaction=True)
def test_fifty_concurrent_posts_of_one_id_leave_one_row(facts):
    event_facts = facts()

    def post(_):
        try:
            return usage_record(event_facts).pk
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=50) as pool:
        ids = set(pool.map(post, range(50)))

    assert UsageEvent.objects.count() == 1
    assert ids == {UsageEvent.objects.get().pk}
