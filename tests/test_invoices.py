"""Monthly invoices: exactly right, never changing once issued (the checks at the end of
the billing guide, and the lifecycle around them)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
import redis
from celery import Celery
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.invoicing import (
    COMMIT_MARGIN,
    InvoiceError,
    invoice_build,
    invoice_correct,
    invoice_finalize,
    invoice_mark_paid,
    invoice_void,
    month_close,
    month_parse,
    months_due,
)
from billing.models import (
    Invoice,
    InvoiceImmutable,
    InvoiceKeyLine,
    InvoiceLine,
    InvoiceNumber,
    UsageEvent,
)
from routing.models import ModelPrice, Provider
from tenants.services import api_key_issue, tenant_create

from .conftest import (
    TEST_BROKER_ENV,
    TEST_BROKER_KEY_PREFIX,
    TEST_BROKER_URL,
    api,
    broker_keys_clear,
    model_create,
    record,
)
from .conftest import test_database_url as database_url_of_tests
from .test_budget_alerts import wait_until
from .upstream import celery_worker_start

pytestmark = pytest.mark.django_db

OCT = date(2026, 10, 1)
NOV = date(2026, 11, 1)
AFTER_OCT = datetime(2026, 11, 2, tzinfo=UTC)


def lines_of(invoice) -> list[tuple]:
    return [
        (
            line.usage_month,
            line.bucket,
            line.quantity,
            line.unit_price,
            line.amount_exact,
            line.amount,
        )
        for line in invoice.lines.order_by("usage_month", "bucket", "unit_price")
    ]


def test_the_billing_guide_example_bills_disjoint_buckets(shop):
    tenant, (key, _), model = shop
    # 1000 prompt tokens of which 800 cached; 500 completion tokens of which 300 reasoning.
    record(
        key,
        model,
        datetime(2026, 10, 5, tzinfo=UTC),
        input_uncached=200,
        input_cached=800,
        output=200,
        reasoning=300,
    )

    invoice = invoice_finalize(invoice=invoice_build(tenant=tenant, month=OCT), now=AFTER_OCT)

    assert {(line.bucket, line.quantity, line.unit_price) for line in invoice.lines.all()} == {
        ("input", 200, Decimal("0.270000")),
        ("cached_input", 800, Decimal("0.070000")),
        ("output", 500, Decimal("1.100000")),
    }
    assert invoice.total == Decimal("0.00")  # $0.000660 rounds to no cents
    assert invoice.number == "INV-2026-000001"


def test_month_boundaries_are_half_open_in_utc(shop):
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 31, 23, 59, 59, 999000, tzinfo=UTC), output=1_000_000)
    record(key, model, datetime(2026, 11, 1, tzinfo=UTC), output=2_000_000)

    october = invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT)
    assert [(line.quantity, line.amount) for line in october.lines.all()] == [
        (1_000_000, Decimal("1.10"))
    ]


def test_month_boundaries_follow_new_york_across_the_dst_change(shop):
    tenant, (key, _), model = shop
    tenant.timezone = "America/New_York"
    tenant.save()
    record(
        key, model, datetime(2026, 11, 1, 3, 59, 59, tzinfo=UTC), output=1_000_000
    )  # Oct 31, EDT
    record(key, model, datetime(2026, 11, 1, 4, tzinfo=UTC), output=2_000_000)  # Nov 1, 00:00 EDT
    record(
        key, model, datetime(2026, 12, 1, 4, 59, 59, tzinfo=UTC), output=3_000_000
    )  # Nov 30, EST
    record(key, model, datetime(2026, 12, 1, 5, tzinfo=UTC), output=4_000_000)  # Dec 1, 00:00 EST

    now = datetime(2026, 12, 5, tzinfo=UTC)
    october = invoice_build(tenant=tenant, month=OCT, now=now)
    november = invoice_build(tenant=tenant, month=NOV, now=now)
    assert (october.starts_at, october.ends_at) == (
        datetime(2026, 10, 1, 4, tzinfo=UTC),
        datetime(2026, 11, 1, 4, tzinfo=UTC),
    )
    assert november.ends_at == datetime(2026, 12, 1, 5, tzinfo=UTC)
    assert [line.quantity for line in october.lines.all()] == [1_000_000]
    assert [line.quantity for line in november.lines.all()] == [5_000_000]


def test_a_price_change_on_the_15th_gives_two_lines(shop):
    tenant, (key, _), model = shop
    old = model.prices.get()
    change = datetime(2026, 10, 15, tzinfo=UTC)
    old.effective_to = change
    old.save()
    new = ModelPrice.objects.create(
        model=model,
        input_per_mtok=Decimal("0.30"),
        output_per_mtok=Decimal("2.00"),
        effective_from=change,
    )
    record(key, model, datetime(2026, 10, 14, 23, tzinfo=UTC), price=old, output=1_000_000)
    record(key, model, datetime(2026, 10, 15, 1, tzinfo=UTC), price=new, output=1_000_000)

    invoice = invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT)
    assert [(line.unit_price, line.amount) for line in invoice.lines.order_by("unit_price")] == [
        (Decimal("1.100000"), Decimal("1.10")),
        (Decimal("2.000000"), Decimal("2.00")),
    ]
    assert invoice.total == Decimal("3.10")


def test_one_million_one_token_events_at_15_cents_make_exactly_15_cents(shop):
    tenant, (key, _), model = shop
    price = model.prices.get()
    ModelPrice.objects.filter(pk=price.pk).update(input_per_mtok=Decimal("0.15"))
    template = record(key, model, datetime(2026, 10, 2, tzinfo=UTC), input_uncached=1)
    quote = connection.ops.quote_name
    table = quote(UsageEvent._meta.db_table)
    columns = [f.column for f in UsageEvent._meta.concrete_fields if not f.primary_key]
    copied = ", ".join("'req_bulk_' || n" if c == "request_id" else quote(c) for c in columns)
    series = (
        "generate_series(1, 999999) AS n"
        if connection.vendor == "postgresql"
        else "(WITH RECURSIVE s(n) AS "
        "(SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < 999999) SELECT n FROM s)"
    )
    with connection.cursor() as cursor:
        cursor.execute(  # one row copied 999,999 times; names come from the model only
            f"INSERT INTO {table} ({', '.join(quote(c) for c in columns)}) "  # noqa: S608
            f"SELECT {copied} FROM {table}, {series} WHERE {table}.{quote('id')} = %s",
            [template.pk],
        )
    assert UsageEvent.objects.count() == 1_000_000

    invoice = invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT)

    (line,) = invoice.lines.all()
    assert (line.quantity, line.unit_price) == (1_000_000, Decimal("0.150000"))
    assert line.amount_exact == Decimal("0.15") and line.amount == Decimal("0.15")
    assert invoice.total == Decimal("0.15")


event_specs = st.lists(
    st.tuples(
        st.integers(0, 1),  # key
        st.integers(1, 28),  # day of October
        st.integers(0, 3_000_000),
        st.integers(0, 3_000_000),
        st.integers(0, 3_000_000),
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=event_specs, order=st.randoms(use_true_random=False), batches=st.integers(1, 4))
def test_any_order_or_batching_gives_the_same_invoice_and_key_subtotals_add_up(
    shop, specs, order, batches
):
    tenant, keys, model = shop

    def invoice_after(sequence, batch_count):
        with transaction.atomic():
            size = max(1, len(sequence) // batch_count)
            for start in range(0, len(sequence), size):
                for k, day, uncached, cached, output in sequence[start : start + size]:
                    record(keys[k], model, datetime(2026, 10, day, tzinfo=UTC),
                           input_uncached=uncached, input_cached=cached, output=output)  # fmt: skip
                invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT)  # drafts rebuilt between
            invoice = invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT)
            result = (lines_of(invoice), invoice.total, _key_totals(invoice))
            for line in invoice.lines.all():
                assert sum(k.amount for k in line.key_lines.all()) == line.amount
                assert sum(k.quantity for k in line.key_lines.all()) == line.quantity
            assert sum(_key_totals(invoice).values()) == invoice.total
            transaction.set_rollback(True)
        return result

    shuffled = list(specs)
    order.shuffle(shuffled)
    assert invoice_after(specs, 1) == invoice_after(shuffled, batches)


def _key_totals(invoice) -> dict[int, Decimal]:
    totals: dict[int, Decimal] = {}
    for line in invoice.lines.all():
        for key_line in line.key_lines.all():
            totals[key_line.api_key_id] = (
                totals.get(key_line.api_key_id, Decimal(0)) + key_line.amount
            )
    return totals


def test_cents_of_a_line_are_allocated_to_its_keys_exactly(shop):
    tenant, (a, b), model = shop
    # Three thirds of 1.10: each key's exact share is 0.3666..., the line 1.10.
    for key, tokens in ((a, 333_334), (b, 666_666)):
        record(key, model, datetime(2026, 10, 3, tzinfo=UTC), output=tokens)
    invoice = invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT)
    (line,) = invoice.lines.all()
    shares = {k.api_key_id: k.amount for k in line.key_lines.all()}
    assert line.amount == Decimal("1.10")
    assert shares == {a.pk: Decimal("0.37"), b.pk: Decimal("0.73")}


def test_bulk_updates_and_deletes_cannot_touch_a_finalized_invoice(shop):
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    record(key, model, datetime(2026, 11, 5, tzinfo=UTC), output=2_000_000)
    invoice = invoice_finalize(invoice=invoice_build(tenant=tenant, month=OCT), now=AFTER_OCT)
    draft = invoice_build(
        tenant=tenant, month=date(2026, 11, 1), now=datetime(2026, 12, 2, tzinfo=UTC)
    )
    key_lines = InvoiceKeyLine.objects.filter(line__invoice__tenant=tenant)
    attempts = [
        lambda: Invoice.objects.update(total=Decimal("0.01")),
        lambda: Invoice.objects.filter(tenant=tenant).delete(),
        lambda: InvoiceLine.objects.filter(invoice__tenant=tenant).update(quantity=1),
        lambda: invoice.lines.all().delete(),
        lambda: key_lines.update(amount=Decimal("0")),
        lambda: key_lines.delete(),
    ]
    for attempt in attempts:
        with pytest.raises(InvoiceImmutable, match=invoice.number):
            attempt()

    # Nothing changed, the draft included: a refused bulk change touches no row.
    invoice.refresh_from_db()
    draft.refresh_from_db()
    assert (invoice.total, draft.total) == (Decimal("1.10"), Decimal("2.20"))
    assert [line.quantity for line in InvoiceLine.objects.order_by("usage_month")] == [
        1_000_000,
        2_000_000,
    ]
    assert InvoiceKeyLine.objects.count() == 2
    # A draft's own rows still change in bulk.
    assert draft.lines.all().update(quantity=3) == 1
    assert Invoice.objects.filter(pk=draft.pk).delete()[0] == 3  # with its line and key line


def test_finalized_invoices_refuse_every_change(shop):
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    invoice = invoice_finalize(invoice=invoice_build(tenant=tenant, month=OCT), now=AFTER_OCT)

    invoice.total = Decimal("0.01")
    with pytest.raises(InvoiceImmutable):
        invoice.save()
    invoice.refresh_from_db()
    with pytest.raises(InvoiceImmutable):
        invoice.delete()
    stale = Invoice.objects.get(pk=invoice.pk)
    stale.status = Invoice.Status.DRAFT  # as read before it was finalized
    with pytest.raises(InvoiceImmutable):
        stale.delete()
    line = invoice.lines.get()
    line.quantity = 1
    with pytest.raises(InvoiceImmutable):
        line.save()
    with pytest.raises(InvoiceImmutable):
        line.delete()
    with pytest.raises(InvoiceImmutable):
        line.key_lines.get().delete()
    invoice.status = Invoice.Status.DRAFT
    with pytest.raises(InvoiceImmutable):
        invoice.save()
    # Payment and voiding change only with their own step of status.
    for field, value in [
        ("paid_at", datetime(2020, 1, 1, tzinfo=UTC)),
        ("voided_at", AFTER_OCT),
        ("void_reason", "typo"),
    ]:
        invoice.refresh_from_db()
        setattr(invoice, field, value)
        with pytest.raises(InvoiceImmutable, match=field):
            invoice.save()
    invoice.refresh_from_db()
    invoice.status, invoice.paid_at = Invoice.Status.PAID, AFTER_OCT
    invoice.void_reason = "not a void"
    with pytest.raises(InvoiceImmutable, match="void_reason"):
        invoice.save()
    # Rebuilding and finalizing again change nothing.
    invoice.refresh_from_db()
    assert invoice_build(tenant=tenant, month=OCT) == invoice
    assert invoice_finalize(invoice=invoice).number == invoice.number
    assert Invoice.objects.get(pk=invoice.pk).total == Decimal("1.10")


def test_twenty_concurrent_finalizations_get_consecutive_unique_numbers(transactional_db):
    provider = Provider.objects.create(name="p", base_url="http://127.0.0.1:9/v1")
    model = model_create("m", provider=provider)
    ModelPrice.objects.filter(model=model).update(effective_from=datetime(2026, 1, 1, tzinfo=UTC))
    drafts = []
    for i in range(20):
        tenant = tenant_create(slug=f"t{i:02d}", name=f"T{i}", model_ids=["m"])
        record(
            api_key_issue(tenant=tenant).key, model, datetime(2026, 10, 5, tzinfo=UTC), output=10
        )
        drafts.append(invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT))
    barrier = threading.Barrier(20)

    def finalize(draft):
        try:
            barrier.wait()
            return invoice_finalize(invoice=draft, now=AFTER_OCT).number
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=20) as pool:
        numbers = list(pool.map(finalize, drafts))

    assert sorted(numbers) == [f"INV-2026-{n:06d}" for n in range(1, 21)]


def test_two_month_closes_at_once_make_one_invoice_and_one_number_per_tenant(
    transactional_db,
):
    provider = Provider.objects.create(name="p", base_url="http://127.0.0.1:9/v1")
    model = model_create("m", provider=provider)
    ModelPrice.objects.filter(model=model).update(effective_from=datetime(2026, 1, 1, tzinfo=UTC))
    for i in range(5):
        tenant = tenant_create(slug=f"t{i}", name=f"T{i}", model_ids=["m"])
        key = api_key_issue(tenant=tenant).key
        record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    barrier = threading.Barrier(2)

    def close(_):
        try:
            barrier.wait()
            return [r.outcome for r in month_close(month=OCT, now=AFTER_OCT)]
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(close, range(2)))

    # Each tenant was finalized by exactly one of the two runs.
    assert sorted(outcomes[0] + outcomes[1]) == ["already numbered"] * 5 + ["finalized"] * 5
    numbers = sorted(Invoice.objects.values_list("number", flat=True))
    assert numbers == [f"INV-2026-{n:06d}" for n in range(1, 6)]
    assert InvoiceNumber.objects.get(year=2026).last == 5


def test_building_is_one_group_by_whatever_the_number_of_events(shop):
    tenant, keys, model = shop

    def queries_to_build(events: int) -> int:
        for n in range(events):
            record(keys[n % 2], model, datetime(2026, 10, 1 + n % 28, tzinfo=UTC), output=n + 1)
        with CaptureQueriesContext(connection) as queries:
            invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT)
        return len(queries)

    queries_to_build(4)  # the first build creates the draft
    few = queries_to_build(0)  # a rebuild over 4 events
    assert queries_to_build(400) == few  # a rebuild over 404 events
    assert Invoice.objects.get().lines.get().quantity == 10 + sum(range(1, 401))


def test_close_month_for_one_tenant(shop, capsys):
    _, (key, _), model = shop
    other = tenant_create(slug="other", name="Other", model_ids=["m"])
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    record(api_key_issue(tenant=other).key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1)

    call_command("close_month", "2026-10", "--tenant", "other")

    assert capsys.readouterr().out.strip() == "other: finalized INV-2026-000001 0.00 USD"
    assert list(Invoice.objects.values_list("tenant__slug", flat=True)) == ["other"]
    with pytest.raises(CommandError, match="No tenant with slug 'nobody'"):
        call_command("close_month", "2026-10", "--tenant", "nobody")


def test_unpriced_usage_blocks_finalization(shop):
    tenant, (key, _), model = shop
    ModelPrice.objects.filter(model=model).update(input_per_mtok=None, cached_input_per_mtok=None)
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), input_uncached=100, output=10)
    draft = invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT)
    assert draft.unpriced_tokens == 100
    with pytest.raises(InvoiceError, match=r"100 tokens of acme's 2026-10 have no price \(m\)"):
        invoice_finalize(invoice=draft, now=AFTER_OCT)
    assert Invoice.objects.get(pk=draft.pk).status == Invoice.Status.DRAFT


def test_unpriced_usage_names_each_model_once_and_says_what_can_still_be_done(shop):
    tenant, (key, other_key), model = shop
    ModelPrice.objects.filter(model=model).update(input_per_mtok=None, cached_input_per_mtok=None)
    second = model_create("m2", provider=model.provider, input_=None, cached=None)
    ModelPrice.objects.filter(model=second).update(effective_from=datetime(2026, 1, 1, tzinfo=UTC))
    for day, by, used in (
        (5, key, model),
        (6, other_key, model),
        (7, key, second),
        (8, key, model),
    ):
        record(by, used, datetime(2026, 10, day, tzinfo=UTC), input_uncached=10, output=10)
    draft = invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT)

    with pytest.raises(InvoiceError) as refused:
        invoice_finalize(invoice=draft, now=AFTER_OCT)
    assert str(refused.value) == (
        "40 tokens of acme's 2026-10 have no price (m, m2). A usage event keeps the price "
        "version it was recorded with and a new price starts in the future, so no price set "
        "now bills them. This month, and every later one (months close in order), is "
        "finalized only if a superuser accepts them unbilled, saying why: close_month 2026-10 "
        '--tenant acme --accept-unpriced "REASON", or {"accept_unpriced": "REASON"} to the '
        "API's finalize, or the admin's \"Finalize selected drafts, accepting their unpriced "
        'usage unbilled" on the draft. Price these models now so that new usage is billed.'
    )


def unpriced_october(shop):
    """acme's October: 100 input tokens without a price, 1M output tokens at $1.10."""
    tenant, (key, _), model = shop
    ModelPrice.objects.filter(model=model).update(input_per_mtok=None, cached_input_per_mtok=None)
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), input_uncached=100, output=1_000_000)
    return invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT)


def test_a_superuser_finalizes_unpriced_usage_by_accepting_it_unbilled_with_a_reason(shop):
    tenant, (key, _), model = shop
    draft = unpriced_october(shop)
    with pytest.raises(InvoiceError, match="have no price"):
        invoice_finalize(invoice=draft, now=AFTER_OCT)  # refused by default
    for blank in ("", "  \n"):
        with pytest.raises(InvoiceError, match="Say why the unpriced usage is accepted"):
            invoice_finalize(invoice=draft, now=AFTER_OCT, accept_unpriced=blank)
    assert Invoice.objects.get(pk=draft.pk).status == Invoice.Status.DRAFT
    assert not InvoiceNumber.objects.filter(last__gt=0).exists()

    invoice = invoice_finalize(
        invoice=draft,
        now=AFTER_OCT,
        accept_unpriced="  Seeded catalog had no input prices; agreed with Acme  ",
        accepted_by="root",
    )

    stored = Invoice.objects.get(pk=draft.pk)
    assert (stored.status, stored.number) == (Invoice.Status.FINALIZED, "INV-2026-000001")
    assert stored.unpriced_accepted == "Seeded catalog had no input prices; agreed with Acme"
    assert stored.unpriced_accepted_by == "root"
    assert (stored.total, stored.unpriced_tokens) == (Decimal("1.10"), 100)
    assert sorted(
        (line.bucket, line.quantity, line.unit_price, line.amount) for line in stored.lines.all()
    ) == [
        ("input", 100, None, Decimal("0.00")),
        ("output", 1_000_000, Decimal("1.100000"), Decimal("1.10")),
    ]
    assert invoice.number == stored.number
    # No longer a dead end: the next month closes as usual.
    record(key, model, datetime(2026, 11, 5, tzinfo=UTC), output=1_000_000)
    later = datetime(2026, 12, 2, tzinfo=UTC)
    november = invoice_finalize(
        invoice=invoice_build(tenant=tenant, month=NOV, now=later), now=later
    )
    assert (november.number, november.unpriced_accepted) == ("INV-2026-000002", "")


def test_an_invoice_without_unpriced_usage_ignores_an_acceptance(shop):
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    draft = invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT)

    invoice = invoice_finalize(invoice=draft, now=AFTER_OCT, accept_unpriced="just in case")

    assert invoice.status == Invoice.Status.FINALIZED
    assert (invoice.unpriced_accepted, invoice.unpriced_accepted_by) == ("", "")


def test_the_beat_task_never_accepts_unpriced_usage(shop, caplog):
    from billing.tasks import invoices_close_due

    draft = unpriced_october(shop)

    (outcome,) = invoices_close_due(now="2026-11-02T00:00Z")

    assert outcome.startswith("acme 2026-10: not finalized: 100 tokens of acme's 2026-10")
    assert "--accept-unpriced" in outcome  # it says how a superuser may, never does it
    # A warning, where an operator's alerting looks (the task's result is INFO).
    (warned,) = [r for r in caplog.records if r.name == "billing.tasks"]
    assert warned.levelname == "WARNING"
    assert warned.getMessage() == f"Month not closed: {outcome}"
    stored = Invoice.objects.get(pk=draft.pk)
    assert (stored.status, stored.number, stored.unpriced_accepted) == ("draft", None, "")


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        ("yesterday", "not an ISO 8601 instant"),
        ("2026-13-02T00:00Z", "not an ISO 8601 instant"),
        ("2026-11-02T00:00", "no UTC offset"),
        ("2999-01-01T00:00Z", "in the future"),
    ],
)
def test_the_beat_task_refuses_an_as_of_time_it_cannot_trust(shop, now, reason):
    from billing.tasks import invoices_close_due

    _, (key, _), model = shop
    # Acting as of the present would close October; as of 2999, this month too.
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    record(key, model, timezone.now() - timedelta(minutes=1), output=1_000_000)

    with pytest.raises(ValueError, match=reason):
        invoices_close_due(now=now)

    assert not Invoice.objects.exists()
    assert invoices_close_due() == ["acme 2026-10: finalized"]


def test_a_month_cannot_be_finalized_before_it_ends(shop):
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=10)
    draft = invoice_build(tenant=tenant, month=OCT, now=datetime(2026, 10, 20, tzinfo=UTC))
    with pytest.raises(InvoiceError, match="has not ended"):
        invoice_finalize(invoice=draft, now=datetime(2026, 10, 31, 23, tzinfo=UTC))


def test_late_usage_goes_onto_the_next_invoice_as_an_adjustment(shop):
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    october = invoice_finalize(invoice=invoice_build(tenant=tenant, month=OCT), now=AFTER_OCT)
    # An October call that reached the ledger after October was finalized.
    record(
        key,
        model,
        datetime(2026, 10, 30, tzinfo=UTC),
        recorded_at=AFTER_OCT + timedelta(hours=1),
        output=2_000_000,
    )
    record(key, model, datetime(2026, 11, 3, tzinfo=UTC), output=3_000_000)

    november = invoice_finalize(
        invoice=invoice_build(tenant=tenant, month=NOV), now=datetime(2026, 12, 2, tzinfo=UTC)
    )

    assert Invoice.objects.get(pk=october.pk).total == Decimal("1.10")
    lines = {(line.usage_month, line.quantity) for line in november.lines.all()}
    assert lines == {(OCT, 2_000_000), (NOV, 3_000_000)}
    assert [line.is_adjustment for line in november.lines.order_by("usage_month")] == [True, False]
    assert november.total == Decimal("5.50")
    assert november.previous_cutoff == october.cutoff


def test_an_event_recorded_as_the_month_is_finalized_is_billed_once_on_the_next(shop):
    """A call whose ledger write was still committing when October was finalized is not
    lost: October covers what was recorded up to a margin before finalizing, and
    November bills the rest as an adjustment."""
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 30, tzinfo=UTC), output=1_000_000)
    record(
        key,
        model,
        datetime(2026, 10, 31, 23, 59, tzinfo=UTC),
        recorded_at=AFTER_OCT - timedelta(seconds=30),
        output=2_000_000,
    )
    october = invoice_finalize(invoice=invoice_build(tenant=tenant, month=OCT), now=AFTER_OCT)
    november = invoice_finalize(
        invoice=invoice_build(tenant=tenant, month=NOV), now=datetime(2026, 12, 2, tzinfo=UTC)
    )

    assert october.cutoff < AFTER_OCT - timedelta(seconds=30)
    assert [(line.usage_month, line.quantity) for line in october.lines.all()] == [(OCT, 1_000_000)]
    assert [(line.usage_month, line.quantity) for line in november.lines.all()] == [
        (OCT, 2_000_000)
    ]
    assert october.total + november.total == Decimal("3.30")


def test_a_draft_shows_everything_recorded_until_it_is_built(shop):
    """A draft is a preview, rebuilt when finalized: a call recorded a minute before it
    is on it. Finalizing (and a dry run, which shows what finalizing would) still leaves
    the last COMMIT_MARGIN to the next invoice, for a write still committing."""
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 30, tzinfo=UTC), output=1_000_000)
    record(
        key,
        model,
        datetime(2026, 10, 31, 23, 59, tzinfo=UTC),
        recorded_at=AFTER_OCT - timedelta(minutes=1),
        output=2_000_000,
    )

    draft = invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT)
    assert draft.cutoff == AFTER_OCT
    assert [(line.quantity, line.amount) for line in draft.lines.all()] == [
        (3_000_000, Decimal("3.30"))
    ]
    assert draft.total == Decimal("3.30")

    (dry,) = month_close(month=OCT, dry_run=True, now=AFTER_OCT)
    assert dry.outcome == "would finalize at 1.10 USD"
    october = invoice_finalize(invoice=draft, now=AFTER_OCT)
    assert october.cutoff == AFTER_OCT - COMMIT_MARGIN
    assert [(line.quantity, line.amount) for line in october.lines.all()] == [
        (1_000_000, Decimal("1.10"))
    ]
    # The next draft shows the rest at once, as the adjustment it will bill.
    november = invoice_build(tenant=tenant, month=NOV, now=AFTER_OCT)
    assert [(line.usage_month, line.quantity) for line in november.lines.all()] == [
        (OCT, 2_000_000)
    ]


def test_a_draft_built_through_the_api_shows_a_call_of_a_minute_ago(shop, superuser_token):
    _, (key, _), model = shop
    a_minute_ago = timezone.now() - timedelta(minutes=1)
    record(key, model, a_minute_ago, output=1_000_000)

    built = api(token=superuser_token).post(
        "/api/invoices/build/", {"tenant": "acme", "month": f"{a_minute_ago:%Y-%m}"}
    )

    assert built.status_code == 200, built.content
    assert built.json()["total"] == "1.10"
    assert [line["quantity"] for line in built.json()["lines"]] == [1_000_000]


def test_months_close_in_order(shop):
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=10)
    record(key, model, datetime(2026, 11, 5, tzinfo=UTC), output=10)
    now = datetime(2026, 12, 5, tzinfo=UTC)
    invoice_build(tenant=tenant, month=OCT, now=now)
    november = invoice_build(tenant=tenant, month=NOV, now=now)
    with pytest.raises(InvoiceError, match="usage of 2026-10 is not invoiced yet"):
        invoice_finalize(invoice=november, now=now)
    invoice_finalize(invoice=invoice_build(tenant=tenant, month=OCT, now=now), now=now)
    assert invoice_finalize(invoice=november, now=now).status == Invoice.Status.FINALIZED
    with pytest.raises(InvoiceError, match="later month"):
        invoice_build(tenant=tenant, month=date(2026, 9, 1), now=now)


def test_void_keeps_its_number_and_a_correction_replaces_it(shop):
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    original = invoice_finalize(invoice=invoice_build(tenant=tenant, month=OCT), now=AFTER_OCT)
    with pytest.raises(InvoiceError, match="Say why"):
        invoice_void(invoice=original, reason=" ")
    voided = invoice_void(invoice=original, reason="Wrong billing address")

    correction = invoice_correct(voided=voided)
    assert correction.corrects == voided
    assert (correction.cutoff, correction.previous_cutoff) == (
        voided.cutoff,
        voided.previous_cutoff,
    )
    assert lines_of(correction) == lines_of(voided)
    final = invoice_finalize(invoice=correction, now=AFTER_OCT + timedelta(days=3))
    assert final.number == "INV-2026-000002"
    assert Invoice.objects.get(pk=voided.pk).number == "INV-2026-000001"
    assert invoice_correct(voided=voided) == final  # once


def test_paid_is_after_finalized_only(shop):
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=10)
    draft = invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT)
    with pytest.raises(InvoiceError):
        invoice_mark_paid(invoice=draft)
    paid = invoice_mark_paid(invoice=invoice_finalize(invoice=draft, now=AFTER_OCT))
    assert paid.status == Invoice.Status.PAID and paid.paid_at is not None


def test_close_month_twice_gives_the_same_result(shop, capsys):
    _, (key, _), model = shop
    idle = tenant_create(slug="idle", name="Idle")
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)

    call_command("close_month", "2026-10", "--dry-run")
    assert "acme: would finalize at 1.10 USD" in capsys.readouterr().out
    assert not Invoice.objects.exists()

    call_command("close_month", "2026-10")
    first = capsys.readouterr().out
    assert "acme: finalized INV-2026-000001 1.10 USD" in first
    assert "idle: no usage" in first
    snapshot = list(Invoice.objects.values())
    call_command("close_month", "2026-10")
    assert "acme: already numbered INV-2026-000001 1.10 USD" in capsys.readouterr().out
    assert list(Invoice.objects.values()) == snapshot
    assert not Invoice.objects.filter(tenant=idle).exists()


def test_a_dry_run_predicts_each_refusal_of_the_real_run_and_the_total_once(shop, capsys):
    _, (key, _), model = shop
    ModelPrice.objects.filter(model=model).update(input_per_mtok=None, cached_input_per_mtok=None)
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), input_uncached=100, output=10)
    new_york = tenant_create(slug="ny", name="NY", timezone_name="America/New_York")
    ny_key = api_key_issue(tenant=new_york).key
    record(ny_key, model, datetime(2026, 9, 10, tzinfo=UTC), output=1_000_000)  # September open
    record(ny_key, model, datetime(2026, 10, 10, tzinfo=UTC), output=1_000_000)
    fine = tenant_create(slug="fine", name="Fine")
    fine_key = api_key_issue(tenant=fine).key
    record(fine_key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    record(fine_key, model, datetime(2026, 11, 5, tzinfo=UTC), output=1)

    with pytest.raises(CommandError, match=r"^2 tenant\(s\) would not be finalized; see above\.$"):
        call_command("close_month", "2026-10", "--dry-run")
    dry = capsys.readouterr().out.splitlines()
    assert not Invoice.objects.exists()
    with pytest.raises(CommandError, match=r"^2 tenant\(s\) not finalized; see above\.$"):
        call_command("close_month", "2026-10")
    real = capsys.readouterr().out.splitlines()

    assert dry[1] == "fine: would finalize at 1.10 USD"
    assert real[1] == "fine: finalized INV-2026-000001 1.10 USD"
    assert real[0].startswith("acme: not finalized: 100 tokens of acme's 2026-10 have no price")
    assert real[2] == (
        "ny: not finalized: ny's usage of 2026-09 is not invoiced yet: months close in order."
    )
    for would, did in zip([dry[0], dry[2]], [real[0], real[2]], strict=True):
        assert would == did.replace(": not finalized: ", ": would refuse: ")
    # Before the month ends, as the real run would say.
    early = month_close(month=NOV, dry_run=True, now=datetime(2026, 11, 20, tzinfo=UTC))
    assert [r.outcome for r in early if r.tenant == fine] == [
        "would refuse: fine's 2026-11 has not ended yet."
    ]


def test_close_month_accepts_unpriced_usage_for_one_tenant_with_a_reason(shop, capsys):
    draft = unpriced_october(shop)
    other = tenant_create(slug="other", name="Other")
    record(
        api_key_issue(tenant=other).key,
        shop[2],
        datetime(2026, 10, 5, tzinfo=UTC),
        input_uncached=7,
    )
    reason = "Input prices were never published; agreed with finance"

    with pytest.raises(CommandError, match="--accept-unpriced needs --tenant"):
        call_command("close_month", "2026-10", "--accept-unpriced", reason)
    for blank in ("", "   "):
        with pytest.raises(CommandError, match="needs a reason"):
            call_command("close_month", "2026-10", "--tenant", "acme", "--accept-unpriced", blank)
    with pytest.raises(CommandError, match="not finalized"):
        call_command("close_month", "2026-10", "--tenant", "acme")  # refused by default
    capsys.readouterr()

    call_command(
        "close_month", "2026-10", "--tenant", "acme", "--dry-run", "--accept-unpriced", reason
    )
    assert capsys.readouterr().out.splitlines() == [
        "acme: would finalize at 1.10 USD, 100 tokens (m) are not billed: they have no price; "
        f"accepted unbilled: {reason}"
    ]
    assert Invoice.objects.get(pk=draft.pk).status == Invoice.Status.DRAFT

    call_command("close_month", "2026-10", "--tenant", "acme", "--accept-unpriced", reason)
    assert capsys.readouterr().out.splitlines() == [
        "acme: finalized INV-2026-000001 1.10 USD",
        f"  100 tokens (m) are not billed: they have no price; accepted unbilled: {reason}",
    ]
    stored = Invoice.objects.get(pk=draft.pk)
    assert (stored.number, stored.total, stored.unpriced_accepted) == (
        "INV-2026-000001",
        Decimal("1.10"),
        reason,
    )
    # The other tenant was not touched: accepting is one tenant at a time.
    assert not Invoice.objects.filter(tenant=other).exists()


def test_close_month_refuses_a_month_not_over_and_bad_input(shop):
    with pytest.raises(CommandError, match="not a month"):
        call_command("close_month", "October")
    with pytest.raises(CommandError, match="has not ended"):
        call_command("close_month", "2999-01")


def test_months_are_due_once_their_grace_is_over_in_each_time_zone(shop, settings):
    settings.TOLLGATE_INVOICE_GRACE_SECONDS = 3600
    tenant, (key, _), model = shop
    new_york = tenant_create(
        slug="ny", name="NY", model_ids=["m"], timezone_name="America/New_York"
    )
    tenant_create(slug="idle", name="Idle")  # no usage: nothing to close, ever
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1)
    record(api_key_issue(tenant=new_york).key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1)
    assert months_due(now=datetime(2026, 11, 1, 0, 30, tzinfo=UTC)) == []
    assert months_due(now=datetime(2026, 11, 1, 1, 30, tzinfo=UTC)) == [(tenant, OCT)]
    # New York's October ends at 04:00 UTC (00:00 EDT); its grace at 05:00.
    assert months_due(now=datetime(2026, 11, 1, 5, 1, tzinfo=UTC)) == [
        (tenant, OCT),
        (new_york, OCT),
    ]
    month_close(month=OCT, tenants=[tenant], now=datetime(2026, 11, 1, 5, 1, tzinfo=UTC))
    assert months_due(now=datetime(2026, 11, 2, tzinfo=UTC)) == [(new_york, OCT)]
    # Late October usage of acme after its invoice: due again, for the next invoice.
    record(key, model, datetime(2026, 10, 31, tzinfo=UTC), recorded_at=AFTER_OCT, output=1)
    assert months_due(now=datetime(2026, 12, 1, 2, tzinfo=UTC)) == [
        (tenant, NOV),
        (new_york, OCT),
    ]
    # A month missed is closed first: New York's October, then its November.
    record(key, model, datetime(2026, 11, 20, tzinfo=UTC), output=1)
    month_close(month=NOV, tenants=[tenant], now=datetime(2026, 12, 1, 2, tzinfo=UTC))
    assert months_due(now=datetime(2027, 1, 5, tzinfo=UTC)) == [(new_york, OCT)]


@pytest.mark.django_db(transaction=True)
def test_the_beat_task_on_a_real_worker_closes_the_month_once(shop, settings):
    """The task as beat sends it, through Redis, run by a real Celery worker process."""
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    worker = celery_worker_start(database_url_of_tests(), **TEST_BROKER_ENV)
    broker = Celery(broker=TEST_BROKER_URL, set_as_current=False)  # the tests keep theirs
    broker.conf.broker_transport_options = {"global_keyprefix": TEST_BROKER_KEY_PREFIX}
    try:
        broker.send_task("billing.tasks.invoices_close_due", kwargs={"now": "2026-11-01T00:30Z"})
        broker.send_task("billing.tasks.invoices_close_due", kwargs={"now": "2026-11-01T01:30Z"})
        wait_until(lambda: Invoice.objects.filter(status="finalized").exists())
        broker.send_task("billing.tasks.invoices_close_due", kwargs={"now": "2026-11-01T01:40Z"})
        broker.send_task("billing.tasks.invoices_close_due", kwargs={"now": "2026-11-02T00:00Z"})
        # Tasks are acknowledged once done (acks_late): nothing queued nor unacknowledged.
        queue = redis.Redis.from_url(TEST_BROKER_URL)
        queued, unacked = (f"{TEST_BROKER_KEY_PREFIX}{name}" for name in ("celery", "unacked"))
        wait_until(lambda: queue.llen(queued) == 0 and queue.hlen(unacked) == 0)
    finally:
        worker.stop()
        broker.close()
        broker_keys_clear()

    invoice = Invoice.objects.get()
    # Acting as of 1 November (the cutoff), issued when it ran: never dated before that.
    assert invoice.cutoff == datetime(2026, 11, 1, 1, 30, tzinfo=UTC) - COMMIT_MARGIN
    assert timezone.now() - invoice.finalized_at < timedelta(minutes=5)
    year = invoice.finalized_at.year
    assert (invoice.tenant, invoice.month, invoice.number) == (tenant, OCT, f"INV-{year}-000001")
    assert invoice.total == Decimal("1.10")


def test_a_month_of_failed_calls_only_holds_nothing_open(shop, settings):
    """Calls that failed upstream are in the ledger with no tokens: on no invoice line,
    and they keep no month open (the next one is due and finalizes)."""
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC))  # no tokens at all
    record(key, model, datetime(2026, 11, 5, tzinfo=UTC), output=1_000_000)
    now = datetime(2026, 12, 2, tzinfo=UTC)

    assert months_due(now=now) == [(tenant, NOV)]
    (closed,) = month_close(month=NOV, tenants=[tenant], now=now)
    assert closed.outcome == "finalized" and closed.invoice.total == Decimal("1.10")
    assert months_due(now=now) == []


def test_a_void_month_is_corrected_after_later_months_were_invoiced(shop):
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    record(key, model, datetime(2026, 11, 5, tzinfo=UTC), output=2_000_000)
    now = datetime(2026, 12, 2, tzinfo=UTC)
    october = invoice_finalize(invoice=invoice_build(tenant=tenant, month=OCT, now=now), now=now)
    november = invoice_finalize(invoice=invoice_build(tenant=tenant, month=NOV, now=now), now=now)

    invoice_void(invoice=october, reason="wrong entity")
    correction = invoice_correct(voided=october)
    assert (correction.corrects, correction.total) == (october, Decimal("1.10"))
    correction = invoice_finalize(invoice=correction, now=now)
    assert correction.number == "INV-2026-000003"
    # Rebuilding a voided month (close_month, the API) builds its correction, never a
    # second invoice beside it.
    invoice_void(invoice=correction, reason="again")
    rebuilt = invoice_build(tenant=tenant, month=OCT, now=now)
    assert rebuilt.corrects == correction and rebuilt.total == Decimal("1.10")
    assert invoice_correct(voided=october).pk == correction.pk  # corrected once, only
    assert Invoice.objects.get(pk=november.pk).total == Decimal("2.20")


@pytest.mark.parametrize("old, new", [("America/New_York", "UTC"), ("UTC", "America/New_York")])
def test_a_time_zone_change_between_months_bills_every_event_once(shop, old, new):
    tenant, (key, _), model = shop
    tenant.timezone = old
    tenant.save()
    # Around 1 October 02:00 UTC: still September in New York, October in UTC.
    for hour in (1, 3, 5):
        record(key, model, datetime(2026, 10, 1, hour, tzinfo=UTC), output=1_000_000)
    record(key, model, datetime(2026, 9, 10, tzinfo=UTC), output=1_000_000)
    now = datetime(2026, 11, 3, tzinfo=UTC)
    september = date(2026, 9, 1)
    sept = invoice_finalize(invoice=invoice_build(tenant=tenant, month=september, now=now), now=now)
    tenant.timezone = new
    tenant.save()

    october = invoice_finalize(invoice=invoice_build(tenant=tenant, month=OCT, now=now), now=now)

    assert october.starts_at == sept.ends_at  # no gap, no overlap
    billed = sum(line.quantity for inv in (sept, october) for line in inv.lines.all())
    assert billed == 4_000_000
    assert sept.total + october.total == Decimal("4.40")
    assert all(line.usage_month == OCT for line in october.lines.all())


def test_months_out_of_range_are_refused_not_a_crash(shop):
    for value in ("9999-12", "0001-01", "2026-00", "2026-13", "-1-01", "2026"):
        with pytest.raises(InvoiceError, match="not a month"):
            month_parse(value)


SEP, DEC = date(2026, 9, 1), date(2026, 12, 1)


def _billed(*months) -> dict[date, int]:
    """Tokens of each usage month over every invoice that stands (not void)."""
    billed: dict[date, int] = {}
    lines = InvoiceLine.objects.exclude(invoice__status=Invoice.Status.VOID)
    for line in lines.filter(usage_month__in=months):
        billed[line.usage_month] = billed.get(line.usage_month, 0) + line.quantity
    return billed


def test_a_late_call_of_a_month_without_invoice_is_billed_once_after_a_later_void(shop):
    """October had no usage when it closed; a late October call then arrived. Voiding
    November must not let October be invoiced now: December would bill the call again,
    as usage November's coverage (carried by its correction) never saw."""
    _, (key, _), model = shop
    record(key, model, datetime(2026, 9, 5, tzinfo=UTC), output=1_000_000)
    record(key, model, datetime(2026, 11, 5, tzinfo=UTC), output=2_000_000)
    closed = datetime(2026, 12, 2, tzinfo=UTC)
    outcomes = [month_close(month=m, now=closed)[0].outcome for m in (SEP, OCT, NOV)]
    assert outcomes == ["finalized", "no usage", "finalized"]
    record(
        key,
        model,
        datetime(2026, 10, 15, tzinfo=UTC),
        recorded_at=datetime(2026, 12, 3, tzinfo=UTC),
        output=4_000_000,
    )
    november = invoice_void(invoice=Invoice.objects.get(month=NOV), reason="wrong PO number")
    later = datetime(2027, 1, 5, tzinfo=UTC)

    (october,) = month_close(month=OCT, now=later)
    assert october.outcome.startswith("not finalized: A later month of acme is already invoiced")
    invoice_finalize(invoice=invoice_correct(voided=november), now=later)
    (december,) = month_close(month=DEC, now=later)

    assert december.outcome == "finalized"
    assert lines_of(december.invoice)[0][:3] == (OCT, InvoiceLine.Bucket.OUTPUT, 4_000_000)
    assert _billed(SEP, OCT, NOV) == {SEP: 1_000_000, OCT: 4_000_000, NOV: 2_000_000}


def test_months_keep_coming_due_after_the_time_zone_moves_west(shop, settings):
    """September closed in UTC; New York then reads its end (1 October 00:00 UTC) as
    September still. The next month due is October, never September again."""
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 9, 10, tzinfo=UTC), output=1_000_000)
    (september,) = month_close(month=SEP, now=datetime(2026, 10, 3, tzinfo=UTC))
    tenant.timezone = "America/New_York"
    tenant.save()
    record(key, model, datetime(2026, 10, 1, 1, tzinfo=UTC), output=1_000_000)
    record(key, model, datetime(2026, 10, 15, tzinfo=UTC), output=1_000_000)
    # A late September call too: also billed with October, as an adjustment.
    record(
        key,
        model,
        datetime(2026, 9, 20, tzinfo=UTC),
        recorded_at=datetime(2026, 10, 5, tzinfo=UTC),
        output=1_000_000,
    )
    settings.TOLLGATE_INVOICE_GRACE_SECONDS = 3600

    assert months_due(now=datetime(2026, 11, 1, 3, tzinfo=UTC)) == []  # not over in New York
    assert months_due(now=datetime(2026, 11, 1, 6, tzinfo=UTC)) == [(tenant, OCT)]
    (october,) = month_close(month=OCT, now=datetime(2026, 11, 1, 6, tzinfo=UTC))

    assert october.outcome == "finalized"
    assert october.invoice.starts_at == september.invoice.ends_at
    assert _billed(SEP, OCT) == {SEP: 2_000_000, OCT: 2_000_000}
    assert months_due(now=datetime(2026, 12, 5, tzinfo=UTC)) == []


def test_late_usage_stays_an_adjustment_after_the_time_zone_moves_east(shop):
    """October closed in UTC; Tokyo reads 31 October 20:00 UTC as 1 November. A call at
    that time that arrived late is still October's adjustment on November's invoice."""
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    october = invoice_finalize(invoice=invoice_build(tenant=tenant, month=OCT), now=AFTER_OCT)
    tenant.timezone = "Asia/Tokyo"
    tenant.save()
    record(
        key,
        model,
        datetime(2026, 10, 31, 20, tzinfo=UTC),
        recorded_at=AFTER_OCT + timedelta(hours=1),
        output=2_000_000,
    )
    record(key, model, datetime(2026, 11, 10, tzinfo=UTC), output=4_000_000)

    november = invoice_finalize(
        invoice=invoice_build(tenant=tenant, month=NOV), now=datetime(2026, 12, 2, tzinfo=UTC)
    )

    lines = [(line.usage_month, line.quantity, line.is_adjustment) for line in november.lines.all()]
    assert sorted(lines) == [(OCT, 2_000_000, True), (NOV, 4_000_000, False)]
    assert Invoice.objects.get(pk=october.pk).total == Decimal("1.10")


def test_closing_a_voided_month_again_waits_for_its_correction(shop, capsys):
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    call_command("close_month", "2026-10")
    original = Invoice.objects.get(month=OCT)
    invoice_void(invoice=original, reason="disputed")
    capsys.readouterr()

    call_command("close_month", "2026-10")

    assert "acme: void, awaiting its correction INV-2026-000001" in capsys.readouterr().out
    assert list(Invoice.objects.values_list("number", "status")) == [
        ("INV-2026-000001", Invoice.Status.VOID)
    ]
    # Corrected on purpose, the correction is what a later close finds.
    correction = invoice_correct(voided=original)
    (closed,) = month_close(month=OCT, tenants=[tenant], now=datetime(2026, 11, 5, tzinfo=UTC))
    assert (closed.outcome, closed.invoice.pk) == ("finalized", correction.pk)


def test_a_catch_up_as_of_a_past_instant_issues_its_invoices_now_in_number_order(shop):
    """Replayed as of 1 November a week later, an invoice was dated 1 November, before
    invoices numbered ahead of it: numbers and issue dates out of order."""
    from billing.tasks import invoices_close_due

    tenant, (key, _), model = shop
    beta = tenant_create(slug="beta", name="Beta", model_ids=[model.public_id])
    beta_key = api_key_issue(tenant=beta, name="k").key
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    record(beta_key, model, datetime(2026, 10, 6, tzinfo=UTC), output=1_000_000)
    first = invoice_finalize(invoice=invoice_build(tenant=beta, month=OCT))

    invoices_close_due(now="2026-11-01T02:00Z")

    second = Invoice.objects.get(tenant=tenant)
    assert second.cutoff == datetime(2026, 11, 1, 2, tzinfo=UTC) - COMMIT_MARGIN
    assert second.finalized_at >= first.finalized_at
    assert second.number > first.number


def test_late_usage_names_the_invoiced_month_after_a_move_east_and_a_month_skipped(shop):
    """August closed in New York; the tenant moved to Tokyo, had no September usage, and
    closed October by hand. A late call of 31 August 23:00 UTC (1 September in Tokyo) is
    August's adjustment, not September's, a month with no invoice."""
    tenant, (key, _), model = shop
    tenant.timezone = "America/New_York"
    tenant.save()
    august = date(2026, 8, 1)
    record(key, model, datetime(2026, 8, 10, tzinfo=UTC), output=1_000_000)
    invoice_finalize(
        invoice=invoice_build(tenant=tenant, month=august), now=datetime(2026, 9, 2, tzinfo=UTC)
    )
    tenant.timezone = "Asia/Tokyo"
    tenant.save()
    record(
        key,
        model,
        datetime(2026, 8, 31, 23, tzinfo=UTC),
        recorded_at=datetime(2026, 9, 5, tzinfo=UTC),
        output=2_000_000,
    )
    record(key, model, datetime(2026, 10, 10, tzinfo=UTC), output=4_000_000)

    october = invoice_finalize(
        invoice=invoice_build(tenant=tenant, month=OCT), now=datetime(2026, 11, 3, tzinfo=UTC)
    )

    lines = sorted((line.usage_month, line.quantity) for line in october.lines.all())
    assert lines == [(august, 2_000_000), (OCT, 4_000_000)]
