"""`make bench-billing`: closing a month of invoices, as the ledger grows.

    python -m bench.billing [--sizes 100000,250000,500000,1000000] [--tenants 200]
        [--models 15] [--repeat 3] [--keep]
    python -m bench.billing --report FILE    # the table of an earlier run's JSON

The requirement: with one million usage events across 200 tenants and 15 models in
PostgreSQL, closing the month takes at most 30 seconds on this machine. For each size
the benchmark builds the production setting from scratch: a fresh PostgreSQL database
`tollgate_bench_billing` (dropped and created again), migrated under
`config.settings.production`, then seeded:

- Through the project's own services where that is cheap: the seed catalog's priced
  models (15 by default), 200 tenants (`tenant_create`; about a fifth in
  America/New_York and a few in Asia/Tokyo, the rest UTC), two or three keys each
  (`api_key_issue`).
- Prices as of the past, written directly (the services refuse a start in the past):
  every model gets full list prices (input, output, and for half of them cached input)
  from August; three models change price on 15 October at noon UTC and one at 02:00 UTC
  on 1 October, which is still September in New York, so their lines split by price
  version. A tenth of the tenants have an every-model markup (half of them changing it
  on 20 October), a few a negotiated price for one model, one a model markup overriding
  its every-model markup.
- The N events, inserted by one INSERT ... SELECT over generate_series in PostgreSQL,
  in time order as the gateway appends them: tenants and models drawn with a skew (a few
  big tenants), 98 % between 30 September noon and 1 November noon UTC (every time
  zone's month boundary inside), 1 % in late September, 1 % in early November; 1 %
  upstream errors with no tokens, 0.5 % cancelled streams and 1 % of the rest metered by
  estimate; random token buckets (reasoning on the reasoning models). Each event's
  `price` and `tenant_price` are the versions in force at its instant
  (`billing.pricing.tenant_price_in_force`), and its `cost` comes from the unit prices
  `billing.pricing.unit_prices` gives, as in `billing.metering.usage_charge`.
- September is closed first (`month_close` with now = 3 October), and 2 % of the usage
  before 1 October 04:00 UTC is recorded only after that, on 4 to 7 October: it arrives
  late and goes onto the October invoice as adjustment lines. Each tenant's first event
  is an on-time one in late September, so every tenant has a September invoice and each
  October invoice a previous one, as in any month but a tenant's first.
- VACUUM ANALYZE and a CHECKPOINT, so that the measured run starts from a settled table.

What it measures: the wall-clock time of `python manage.py close_month 2026-10`, the
real command in a subprocess (process start and Django setup included: what an operator
sees), for every tenant; then the same command again, which must change nothing. The
first run is repeated (`--repeat`, 3 by default) on fresh copies of the seeded database
(CREATE DATABASE ... TEMPLATE), because a shared machine's speed drifts by a fifth from
one minute to the next: the table shows the first run, the median and the worst, and the
verdict against the 30 s limit takes the worst. The seeding time is reported but not
what is measured.

What it checks after each size (straight SQL through psycopg, not the invoicing code):
every tenant got one finalized October invoice, numbered consecutively in slug order;
each invoice total is the sum of its lines' amounts, each amount the exact amount
rounded half up to cents, each exact amount quantity x unit price; each line's key
lines add up to it (tokens and cents); per tenant, usage month and bucket, the tokens
on the October invoices equal the tokens of the events of the tenant's local October,
plus September's late ones as adjustments, and the exact amounts equal the events'
summed cost; September's invoices and October's adjustments together hold every
September event exactly once; the second run leaves the invoices, their lines and the
number sequence exactly as they were.

Results go to stdout as a table (events, seeding seconds, the first close, the median and
worst, the second close, events per second and the ratio to the smallest size, both from
the median) and to bench-results/billing-<timestamp>.json, with the seeding's parts, the
table's size and the invoices' line counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from datetime import UTC, date, datetime
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from .stack import PG_ADMIN_URL, ROOT, BenchEnv
from .stats import fmt, machine, table

RESULTS_DIR = ROOT / "bench-results"
DB_NAME = "tollgate_bench_billing"
LIMIT_SECONDS = 30.0
DEFAULT_SIZES = (100_000, 250_000, 500_000, 1_000_000)

MONTH = "2026-10"
OCT = date(2026, 10, 1)
SEP = date(2026, 9, 1)
PRICES_FROM = datetime(2026, 8, 1, tzinfo=UTC)
PRICE_CHANGE_AT = datetime(2026, 10, 15, 12, tzinfo=UTC)
BOUNDARY_PRICE_CHANGE_AT = datetime(2026, 10, 1, 2, tzinfo=UTC)  # September in New York
MARKUP_CHANGE_AT = datetime(2026, 10, 20, tzinfo=UTC)
SEP_CLOSED_AT = datetime(2026, 10, 3, tzinfo=UTC)  # September's invoices' cutoff
LATE_BEFORE = datetime(2026, 10, 1, 4, tzinfo=UTC)  # the end of September in every zone
LATE_FROM = datetime(2026, 10, 4, tzinfo=UTC)
SEGMENTS_FROM = datetime(2026, 9, 1, tzinfo=UTC)
SEGMENTS_TO = datetime(2026, 12, 1, tzinfo=UTC)
# When the events happen: (share, start, end), the shares in order.
WINDOWS = (
    (0.01, datetime(2026, 9, 24, tzinfo=UTC), datetime(2026, 9, 30, 12, tzinfo=UTC)),
    (0.98, datetime(2026, 9, 30, 12, tzinfo=UTC), datetime(2026, 11, 1, 12, tzinfo=UTC)),
    (0.01, datetime(2026, 11, 1, 12, tzinfo=UTC), datetime(2026, 11, 3, tzinfo=UTC)),
)


SEEDED_DB = f"{DB_NAME}_seeded"  # a copy of the seeded database, for the repeats
RERUN_DB = f"{DB_NAME}_rerun"  # a fresh copy of it for each repeat


def database_url(name: str = DB_NAME) -> str:
    return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"


def _database_drop(*names: str) -> None:
    """Drop the benchmark's own databases, never any other."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        for name in names:
            assert name.startswith(DB_NAME)
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _database_create(name: str, template: str | None = None) -> None:
    """Drop and create one of the benchmark's databases, empty or as a copy of another."""
    _database_drop(name)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
            if conn.info.server_version >= 150000:
                # A file copy, not hundreds of MB through the WAL that the next
                # measurement would then share the disk with.
                create += sql.SQL(" STRATEGY FILE_COPY")
        conn.execute(create)


# --- seeding (runs in a subprocess with the production settings) ---------------------


def _tz(index: int) -> str:
    if index % 5 == 1:
        return "America/New_York"
    if index % 20 == 7:
        return "Asia/Tokyo"
    return "UTC"


def _seed_catalog(n_models: int) -> list:
    """The priced seed catalog models (and made-up ones beyond it), with full list prices
    from August and the price changes of October."""
    from routing.models import CatalogModel, ModelPrice, Provider

    six = Decimal("0.000001")
    priced = list(
        CatalogModel.objects.filter(prices__output_per_mtok__isnull=False)
        .distinct()
        .order_by("public_id")[:n_models]
    )
    provider = Provider.objects.order_by("pk").first()
    for extra in range(n_models - len(priced)):
        model = CatalogModel.objects.create(
            public_id=f"bench-model-{extra:02d}",
            display_name=f"Bench model {extra}",
            family="Bench",
            developer="Bench Lab",
            provider=provider,
            upstream_model_id=f"bench-model-{extra:02d}",
        )
        ModelPrice.objects.create(
            model=model,
            output_per_mtok=Decimal("0.80"),
            effective_from=datetime(2026, 1, 1, tzinfo=UTC),
        )
        priced.append(model)
    for k, model in enumerate(priced):
        listed = ModelPrice.objects.get(model=model, effective_to__isnull=True)
        output = listed.output_per_mtok
        listed.effective_to = PRICES_FROM
        listed.save(update_fields=["effective_to"])
        unit_in = max(output / 4, Decimal("0.005")).quantize(six)
        cached = (unit_in / 5).quantize(six) if k % 2 == 0 else None
        changes = []
        if k % 5 == 0:
            changes.append(PRICE_CHANGE_AT)
        if k == 1:
            changes.append(BOUNDARY_PRICE_CHANGE_AT)
        starts = [PRICES_FROM, *changes]
        for v, start in enumerate(starts):
            factor = Decimal(1) - Decimal("0.2") * v
            ModelPrice.objects.create(
                model=model,
                input_per_mtok=(unit_in * factor).quantize(six),
                cached_input_per_mtok=None if cached is None else (cached * factor).quantize(six),
                output_per_mtok=(output * factor).quantize(six),
                effective_from=start,
                effective_to=starts[v + 1] if v + 1 < len(starts) else None,
            )
    return priced


def _seed_tenants(n_tenants: int, models: list) -> list:
    from billing.models import TenantPrice
    from routing.models import ModelPrice
    from tenants.services import api_key_issue, tenant_create

    public_ids = [m.public_id for m in models]
    tenants = []
    for i in range(n_tenants):
        tenant = tenant_create(
            slug=f"bench-{i:03d}",
            name=f"Bench tenant {i}",
            model_ids=public_ids,
            timezone_name=_tz(i),
        )
        for n in range(3 if i % 3 == 0 else 2):
            api_key_issue(tenant=tenant, name=f"key-{n}")
        tenants.append(tenant)
        if i % 10 == 3:  # an every-model markup, changed on 20 October for half of them
            change = i % 20 == 13
            TenantPrice.objects.create(
                tenant=tenant,
                markup_percent=Decimal("15"),
                effective_from=PRICES_FROM,
                effective_to=MARKUP_CHANGE_AT if change else None,
            )
            if change:
                TenantPrice.objects.create(
                    tenant=tenant, markup_percent=Decimal("10"), effective_from=MARKUP_CHANGE_AT
                )
        if i == 3:  # a model's own markup wins over the every-model one
            TenantPrice.objects.create(
                tenant=tenant,
                model=models[2],
                markup_percent=Decimal("-5"),
                effective_from=PRICES_FROM,
            )
        if i % 25 == 5:  # a negotiated price for one model; cached input falls back to list
            listed = ModelPrice.objects.filter(model=models[0]).order_by("effective_from")[1]
            TenantPrice.objects.create(
                tenant=tenant,
                model=models[0],
                input_per_mtok=(listed.input_per_mtok / 2).quantize(Decimal("0.000001")),
                output_per_mtok=(listed.output_per_mtok * Decimal("0.6")).quantize(
                    Decimal("0.000001")
                ),
                effective_from=PRICES_FROM,
            )
    return tenants


def _segments(tenants: list, models: list) -> list[tuple]:
    """Per tenant and model, the intervals over which one list price version and one
    tenant price version (or none) are in force, with the unit prices they give."""
    from billing.models import TenantPrice
    from billing.pricing import tenant_price_cache_clear, tenant_price_in_force, unit_prices
    from routing.models import ModelPrice

    tenant_price_cache_clear()
    list_prices: dict[int, list] = {}
    for price in ModelPrice.objects.filter(model__in=models).order_by("effective_from"):
        list_prices.setdefault(price.model_id, []).append(price)
    own_prices: dict[int, list] = {}
    for version in TenantPrice.objects.all():
        own_prices.setdefault(version.tenant_id, []).append(version)
    rows = []
    for tenant in tenants:
        for model in models:
            versions = list_prices[model.pk] + [
                v for v in own_prices.get(tenant.pk, []) if v.model_id in (None, model.pk)
            ]
            cuts = {SEGMENTS_FROM, SEGMENTS_TO}
            for v in versions:
                cuts.update(
                    at for at in (v.effective_from, v.effective_to) if at and at > SEGMENTS_FROM
                )
            cuts = sorted(at for at in cuts if at <= SEGMENTS_TO)
            for start, end in pairwise(cuts):
                price = next(
                    p
                    for p in list_prices[model.pk]
                    if p.effective_from <= start
                    and (p.effective_to is None or p.effective_to > start)
                )
                own = tenant_price_in_force(tenant_id=tenant.pk, model_id=model.pk, at=start)
                units = unit_prices(price, own)
                assert None not in (units.input, units.cached_input_effective, units.output)
                rows.append(
                    (
                        tenant.pk,
                        model.pk,
                        model.provider_id,
                        model.public_id,
                        "reasoning" in model.capabilities,
                        price.pk,
                        own.pk if own else None,
                        start,
                        end,
                        units.input,
                        units.cached_input_effective,
                        units.output,
                    )
                )
    return rows


EVENTS_SQL = """
INSERT INTO billing_usageevent (
    request_id, tenant_id, api_key_id, requested_model, served_model_id, provider_id,
    price_id, tenant_price_id, input_uncached_tokens, input_cached_tokens, output_tokens,
    reasoning_tokens, unpriced_tokens, cost, usage_source, status, upstream_status,
    error_code, streamed, latency_ms, ttft_ms, raw_usage, occurred_at, recorded_at
)
WITH draw AS MATERIALIZED (
    -- The first event of each tenant: in late September, ok, recorded in time, so that
    -- every tenant has a September invoice before October closes (months close in order).
    SELECT i, CASE WHEN i <= %(tenants)s THEN i - 1
                   ELSE floor(%(tenants)s * random() ^ 1.6)::int END AS tenant_idx,
           CASE WHEN i <= %(tenants)s THEN 0 ELSE random() END AS r_window,
           CASE WHEN i <= %(tenants)s THEN 1 ELSE random() END AS r_status,
           CASE WHEN i <= %(tenants)s THEN 1 ELSE random() END AS r_late,
           random() AS r_model, random() AS r_key, random() AS r_at, random() AS r_in,
           random() AS r_has_cached, random() AS r_cached, random() AS r_out,
           random() AS r_reasoning, random() AS r_stream, random() AS r_latency,
           random() AS r_late_at, random() AS r_source
    FROM generate_series(1, %(n)s) AS i
), facts AS (
    SELECT d.*, t.tenant_id, m.model_id, m.reasoning,
           t.keys[1 + floor(d.r_key * cardinality(t.keys))::int] AS api_key_id,
           CASE WHEN d.r_window < %(w0)s THEN %(a0)s + d.r_at * (%(b0)s - %(a0)s)
                WHEN d.r_window < %(w1)s THEN %(a1)s + d.r_at * (%(b1)s - %(a1)s)
                ELSE %(a2)s + d.r_at * (%(b2)s - %(a2)s) END AS occurred_at,
           CASE WHEN d.r_status < 0.010 THEN 'upstream_error'
                WHEN d.r_status < 0.015 THEN 'client_cancelled'
                ELSE 'ok' END AS status,
           150 + floor(d.r_latency ^ 2 * 30000)::int AS latency_ms
    FROM draw d
    JOIN bench_tenant t ON t.idx = d.tenant_idx
    JOIN bench_model m ON m.idx = floor(%(models)s * d.r_model ^ 1.3)::int
), tokens AS (
    SELECT f.*,
           CASE WHEN status = 'upstream_error' THEN 0
                ELSE 20 + floor(r_in ^ 3 * 30000)::bigint END AS uncached,
           CASE WHEN status = 'upstream_error' OR r_has_cached >= 0.4 THEN 0
                ELSE floor(r_cached * 12000)::bigint END AS cached,
           CASE WHEN status = 'upstream_error' THEN 0
                WHEN status = 'client_cancelled' THEN 1 + floor(r_out ^ 2 * 1000)::bigint
                ELSE 1 + floor(r_out ^ 2 * 3000)::bigint END AS output,
           CASE WHEN status = 'ok' AND reasoning THEN floor(r_reasoning * 4000)::bigint
                ELSE 0 END AS reasoning_tokens,
           status = 'client_cancelled' OR r_stream < 0.45 AS streamed,
           CASE WHEN status = 'client_cancelled' OR (status = 'ok' AND r_source < 0.01)
                THEN 'estimated'
                ELSE 'provider' END AS usage_source
    FROM facts f
)
SELECT 'req_' || md5(e.i::text), e.tenant_id, e.api_key_id, s.public_id, e.model_id,
       s.provider_id, s.price_id, s.tenant_price_id, e.uncached, e.cached, e.output,
       e.reasoning_tokens, 0,
       ((e.uncached * s.unit_input + e.cached * s.unit_cached
         + (e.output + e.reasoning_tokens) * s.unit_output) * 0.000001)::numeric(24, 12),
       e.usage_source, e.status,
       CASE WHEN e.status = 'upstream_error' THEN 502 END,
       CASE WHEN e.status = 'upstream_error' THEN 'upstream_unavailable' ELSE '' END,
       e.streamed, e.latency_ms,
       CASE WHEN e.streamed THEN 50 + floor(e.r_latency * e.latency_ms / 10)::int END,
       CASE WHEN e.usage_source = 'provider' AND e.status = 'ok' THEN jsonb_build_object(
           'prompt_tokens', e.uncached + e.cached,
           'completion_tokens', e.output + e.reasoning_tokens,
           'total_tokens', e.uncached + e.cached + e.output + e.reasoning_tokens,
           'prompt_tokens_details', jsonb_build_object('cached_tokens', e.cached),
           'completion_tokens_details',
           jsonb_build_object('reasoning_tokens', e.reasoning_tokens)) END,
       e.occurred_at,
       CASE WHEN e.occurred_at < %(late_before)s AND e.r_late < 0.02
            THEN %(late_from)s + e.r_late_at * interval '3 days'
            ELSE e.occurred_at + e.latency_ms * interval '1 millisecond' END
FROM tokens e
JOIN bench_segment s
  ON s.tenant_id = e.tenant_id AND s.model_id = e.model_id
 AND e.occurred_at >= s.starts AND e.occurred_at < s.ends
ORDER BY e.occurred_at
"""


def _insert_events(n: int, tenants: list, models: list, segments: list[tuple]) -> int:
    from tenants.models import ApiKey

    keys: dict[int, list[int]] = {}
    for key_id, tenant_id in ApiKey.objects.order_by("pk").values_list("pk", "tenant_id"):
        keys.setdefault(tenant_id, []).append(key_id)
    order = list(range(len(tenants)))
    random.Random(42).shuffle(order)  # noqa: S311 (the big tenants anywhere in the slug order)
    bounds = {}
    cumulative = 0.0
    for w, (share, start, end) in enumerate(WINDOWS):
        cumulative += share
        bounds.update({f"w{w}": cumulative, f"a{w}": start, f"b{w}": end})
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        conn.execute("SELECT setseed(0.42)")
        conn.execute("CREATE TEMP TABLE bench_tenant (idx int, tenant_id bigint, keys bigint[])")
        conn.execute("CREATE TEMP TABLE bench_model (idx int, model_id bigint, reasoning bool)")
        conn.execute(
            """CREATE TEMP TABLE bench_segment (
                tenant_id bigint, model_id bigint, provider_id bigint, public_id text,
                reasoning bool, price_id bigint, tenant_price_id bigint, starts timestamptz,
                ends timestamptz, unit_input numeric, unit_cached numeric, unit_output numeric)"""
        )
        with conn.cursor() as cur:
            with cur.copy("COPY bench_tenant FROM STDIN") as copy:
                for idx, t in zip(order, tenants, strict=True):
                    copy.write_row((idx, t.pk, keys[t.pk]))
            with cur.copy("COPY bench_model FROM STDIN") as copy:
                for idx, m in enumerate(models):
                    copy.write_row((idx, m.pk, "reasoning" in m.capabilities))
            with cur.copy("COPY bench_segment FROM STDIN") as copy:
                for row in segments:
                    copy.write_row(row)
            cur.execute("ANALYZE bench_segment")
            cur.execute(
                EVENTS_SQL,
                {
                    "n": n,
                    "tenants": len(tenants),
                    "models": len(models),
                    "late_before": LATE_BEFORE,
                    "late_from": LATE_FROM,
                    **bounds,
                },
            )
            inserted = cur.rowcount
    if inserted != n:
        raise RuntimeError(f"inserted {inserted} events instead of {n}")
    return inserted


def seed(n: int, n_tenants: int, n_models: int) -> dict[str, Any]:
    """Everything but VACUUM: catalog, tenants, keys, prices, events, September closed."""
    from billing.invoicing import month_close

    timings = {}
    started = time.perf_counter()
    models = _seed_catalog(n_models)
    tenants = _seed_tenants(n_tenants, models)
    segments = _segments(tenants, models)
    timings["setup_s"] = time.perf_counter() - started
    started = time.perf_counter()
    _insert_events(n, tenants, models, segments)
    timings["events_s"] = time.perf_counter() - started
    started = time.perf_counter()
    closed = month_close(month=SEP, now=SEP_CLOSED_AT)
    timings["september_close_s"] = time.perf_counter() - started
    outcomes: dict[str, int] = {}
    for result in closed:
        outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
    if set(outcomes) - {"finalized", "no usage"}:
        raise RuntimeError(f"September did not close cleanly: {outcomes}")
    return {
        **timings,
        "models": [m.public_id for m in models],
        "segments": len(segments),
        "september": outcomes,
    }


# --- measuring and checking (no Django in this process) ------------------------------


def _close(env: BenchEnv) -> tuple[float, dict[str, int]]:
    started = time.perf_counter()
    out = env.run("manage.py", "close_month", MONTH)
    elapsed = time.perf_counter() - started
    outcomes: dict[str, int] = {}
    for line in out.splitlines():
        outcome = line.split(": ", 1)[1].split(" INV-")[0] if ": " in line else line
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return elapsed, outcomes


SNAPSHOT_SQL = """
SELECT t.slug, i.number, i.status, i.total::text, i.cutoff, i.finalized_at, i.updated_at,
       (SELECT count(*) FROM billing_invoiceline l WHERE l.invoice_id = i.id),
       (SELECT count(*) FROM billing_invoicekeyline k JOIN billing_invoiceline l
          ON l.id = k.line_id WHERE l.invoice_id = i.id),
       (SELECT coalesce(sum(l.amount), 0)::text FROM billing_invoiceline l
          WHERE l.invoice_id = i.id)
FROM billing_invoice i JOIN tenants_tenant t ON t.id = i.tenant_id
WHERE i.month = %s ORDER BY t.slug
"""


def _snapshot(conn: psycopg.Connection) -> list:
    rows = [list(map(str, r)) for r in conn.execute(SNAPSHOT_SQL, (OCT,)).fetchall()]
    sequence = conn.execute("SELECT year, last FROM billing_invoicenumber ORDER BY year")
    return [rows, [list(r) for r in sequence.fetchall()]]


# Tokens and cost per tenant, local usage month and bucket, straight from the events.
EXPECTED_SQL = """
WITH ev AS (
    SELECT e.tenant_id, e.recorded_at,
           date_trunc('month', e.occurred_at AT TIME ZONE t.timezone)::date AS usage_month,
           e.input_uncached_tokens, e.input_cached_tokens,
           e.output_tokens + e.reasoning_tokens AS output, e.cost
    FROM billing_usageevent e JOIN tenants_tenant t ON t.id = e.tenant_id
)
SELECT tenant_id, usage_month, recorded_at > %(sep_closed)s AS late,
       sum(input_uncached_tokens), sum(input_cached_tokens), sum(output), sum(cost)
FROM ev WHERE usage_month IN (%(sep)s, %(oct)s)
GROUP BY 1, 2, 3
"""

INVOICED_SQL = """
SELECT i.tenant_id, i.month, l.usage_month,
       sum(l.quantity) FILTER (WHERE l.bucket = 'input'),
       sum(l.quantity) FILTER (WHERE l.bucket = 'cached_input'),
       sum(l.quantity) FILTER (WHERE l.bucket = 'output'),
       sum(l.amount_exact)
FROM billing_invoice i JOIN billing_invoiceline l ON l.invoice_id = i.id
WHERE i.month IN (%(sep)s, %(oct)s) AND i.status = 'finalized'
GROUP BY 1, 2, 3
"""


def _sums(values: list) -> tuple:
    """(input, cached input, output tokens, exact amount) of a result row's tail."""
    uncached, cached, output, amount = values
    return (int(uncached or 0), int(cached or 0), int(output or 0), amount or Decimal(0))


def _check(conn: psycopg.Connection, n_tenants: int) -> dict[str, Any]:
    """Independent checks of the October invoices; a list of what failed."""
    failures: list[str] = []
    invoices = conn.execute(
        """SELECT t.slug, i.number, i.status, i.total FROM billing_invoice i
           JOIN tenants_tenant t ON t.id = i.tenant_id WHERE i.month = %s ORDER BY t.slug""",
        (OCT,),
    ).fetchall()
    if len(invoices) != n_tenants:
        failures.append(f"{len(invoices)} October invoices for {n_tenants} tenants")
    if any(status != "finalized" for _, _, status, _ in invoices):
        failures.append("an October invoice is not finalized")
    numbers = [int(number.rsplit("-", 1)[1]) for _, number, _, _ in invoices if number]
    if not numbers or numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        failures.append("October invoice numbers are not consecutive in slug order")
    bad = conn.execute(
        """SELECT
             (SELECT count(*) FROM billing_invoice i
                WHERE i.total <> (SELECT coalesce(sum(amount), 0) FROM billing_invoiceline l
                                  WHERE l.invoice_id = i.id)),
             (SELECT count(*) FROM billing_invoiceline WHERE amount <> round(amount_exact, 2)),
             (SELECT count(*) FROM billing_invoiceline
                WHERE amount_exact <> quantity * unit_price * 0.000001),
             (SELECT count(*) FROM billing_invoiceline l LEFT JOIN (
                 SELECT line_id, sum(quantity) AS quantity, sum(amount) AS amount
                 FROM billing_invoicekeyline GROUP BY line_id) k ON k.line_id = l.id
                WHERE k.quantity IS DISTINCT FROM l.quantity
                   OR k.amount IS DISTINCT FROM l.amount)"""
    ).fetchone()
    assert bad is not None
    for count, what in zip(
        bad,
        (
            "invoice totals differ from the sum of their lines",
            "line amounts are not their exact amounts rounded to cents",
            "exact amounts are not quantity x unit price",
            "key lines do not add up to their line",
        ),
        strict=True,
    ):
        if count:
            failures.append(f"{count} {what}")
    total, lines_sum = conn.execute(
        """SELECT (SELECT sum(total) FROM billing_invoice WHERE month = %(oct)s),
                  (SELECT sum(l.amount) FROM billing_invoiceline l JOIN billing_invoice i
                     ON i.id = l.invoice_id WHERE i.month = %(oct)s)""",
        {"oct": OCT},
    ).fetchone()
    if total != lines_sum:
        failures.append(f"October totals {total} differ from the lines' {lines_sum}")

    params = {"sep": SEP, "oct": OCT, "sep_closed": SEP_CLOSED_AT}
    zero = (0, 0, 0, Decimal(0))
    expected: dict[tuple, tuple] = {}  # (tenant, invoice month, usage month) -> sums
    september: dict[int, tuple] = {}  # every September event, late or not
    for tenant, usage_month, late, *sums in conn.execute(EXPECTED_SQL, params):
        sums = _sums(sums)
        on = OCT if usage_month == OCT or late else SEP
        key = (tenant, on, usage_month)
        expected[key] = tuple(a + b for a, b in zip(expected.get(key, zero), sums, strict=True))
        if usage_month == SEP:
            september[tenant] = tuple(
                a + b for a, b in zip(september.get(tenant, zero), sums, strict=True)
            )
    invoiced: dict[tuple, tuple] = {}
    sept_invoiced: dict[int, tuple] = {}
    for tenant, month, usage_month, *sums in conn.execute(INVOICED_SQL, params):
        sums = _sums(sums)
        invoiced[(tenant, month, usage_month)] = sums
        if usage_month == SEP:
            sept_invoiced[tenant] = tuple(
                a + b for a, b in zip(sept_invoiced.get(tenant, zero), sums, strict=True)
            )
    expected = {k: v for k, v in expected.items() if any(v[:3])}
    mismatched = sorted(
        k for k in expected.keys() | invoiced.keys() if expected.get(k) != invoiced.get(k)
    )
    if mismatched:
        failures.append(
            f"{len(mismatched)} (tenant, invoice month, usage month) differ from the events, "
            f"e.g. {mismatched[0]}: {invoiced.get(mismatched[0])} != {expected.get(mismatched[0])}"
        )
    september = {k: v for k, v in september.items() if any(v[:3])}
    if september != sept_invoiced:
        failures.append("September's events are not each on exactly one invoice")

    stats = conn.execute(
        """SELECT count(*), count(*) FILTER (WHERE l.usage_month <> i.month),
                  (SELECT count(*) FROM billing_invoicekeyline k JOIN billing_invoiceline l2
                     ON l2.id = k.line_id JOIN billing_invoice i2 ON i2.id = l2.invoice_id
                     WHERE i2.month = %(oct)s),
                  count(DISTINCT (l.invoice_id, l.usage_month, l.model_id, l.bucket))
           FROM billing_invoiceline l JOIN billing_invoice i ON i.id = l.invoice_id
           WHERE i.month = %(oct)s""",
        {"oct": OCT},
    ).fetchone()
    assert stats is not None
    october_events = conn.execute(
        """SELECT count(*) FROM billing_usageevent e JOIN tenants_tenant t ON t.id = e.tenant_id
           WHERE date_trunc('month', e.occurred_at AT TIME ZONE t.timezone)::date = %s""",
        (OCT,),
    ).fetchone()
    assert october_events is not None
    return {
        "failures": failures,
        "invoices": len(invoices),
        "numbers": [invoices[0][1], invoices[-1][1]] if invoices else [],
        "total_usd": str(total),
        "october_events": october_events[0],
        "lines": stats[0],
        "adjustment_lines": stats[1],
        "key_lines": stats[2],
        "lines_split_by_price": stats[0] - stats[3],
    }


def _settle(url: str) -> dict[str, Any]:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
        conn.execute("CHECKPOINT")
        size = conn.execute(
            "SELECT pg_total_relation_size('billing_usageevent'), "
            "pg_relation_size('billing_usageevent')"
        ).fetchone()
    assert size is not None
    return {
        "vacuum_s": time.perf_counter() - started,
        "table_mib": size[1] / 2**20,
        "table_with_indexes_mib": size[0] / 2**20,
    }


def bench_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    env = BenchEnv.create()
    env.values["DATABASE_URL"] = url = database_url()
    result: dict[str, Any] = {"events": n}
    started = time.perf_counter()
    _database_create(DB_NAME)
    env.run("manage.py", "migrate", "--noinput", "-v", "0")
    result["migrate_s"] = time.perf_counter() - started
    seeded = env.run(
        "-m", "bench.billing", "--seed", str(n), "--tenants", str(args.tenants),
        "--models", str(args.models),
    )  # fmt: skip
    result["seed"] = json.loads(seeded.splitlines()[-1])
    result["seed"].update(_settle(url))
    result["seed_s"] = time.perf_counter() - started

    if args.repeat > 1:
        _database_create(SEEDED_DB, template=DB_NAME)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")

    print(f"  seeded in {result['seed_s']:.1f} s; closing {MONTH} ...", flush=True)
    result["close_s"], result["close_outcomes"] = _close(env)
    with psycopg.connect(url) as conn:
        first = _snapshot(conn)
    print(f"  closed in {result['close_s']:.2f} s; again ...", flush=True)
    result["second_close_s"], result["second_outcomes"] = _close(env)
    with psycopg.connect(url) as conn:
        second = _snapshot(conn)
        result["checks"] = _check(conn, args.tenants)
    if first != second:
        result["checks"]["failures"].append("the second run changed the invoices")
    if result["close_outcomes"] != {"finalized": args.tenants}:
        result["checks"]["failures"].append(f"first run: {result['close_outcomes']}")
    if result["second_outcomes"] != {"already numbered": args.tenants}:
        result["checks"]["failures"].append(f"second run: {result['second_outcomes']}")
    print(f"  again in {result['second_close_s']:.2f} s", flush=True)

    result["repeats_s"] = [result["close_s"]]
    for _ in range(args.repeat - 1):
        result["repeats_s"].append(_close_copy(env, first, result["checks"]["failures"]))
        print(f"  on a fresh copy: {result['repeats_s'][-1]:.2f} s", flush=True)
    if args.repeat > 1:
        _database_drop(RERUN_DB, SEEDED_DB)
    result["close_median_s"] = statistics.median(result["repeats_s"])
    result["close_max_s"] = max(result["repeats_s"])
    result["events_per_s"] = n / result["close_median_s"]
    return result


def _close_copy(env: BenchEnv, first: list, failures: list[str]) -> float:
    """The first close again, on a fresh copy of the seeded database: its seconds. The
    invoices must come out with the same numbers and totals."""
    _database_create(RERUN_DB, template=SEEDED_DB)
    url = database_url(RERUN_DB)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    rerun = BenchEnv({**env.values, "DATABASE_URL": url})
    elapsed, outcomes = _close(rerun)
    with psycopg.connect(url) as conn:
        again = _snapshot(conn)
    if [r[:2] + r[3:4] for r in again[0]] != [r[:2] + r[3:4] for r in first[0]]:
        failures.append("a repeat on a fresh copy gave other numbers or totals")
    if outcomes != {"finalized": len(first[0])}:
        failures.append(f"a repeat on a fresh copy: {outcomes}")
    return elapsed


def report(results: dict) -> str:
    sizes = results["sizes"]
    base = sizes[0]["close_median_s"] if sizes else None
    rows = [
        [
            s["events"],
            s["checks"]["october_events"],
            round(s["seed_s"], 1),
            round(s["close_s"], 2),
            round(s["close_median_s"], 2),
            round(s["close_max_s"], 2),
            round(s["second_close_s"], 2),
            round(s["events_per_s"]),
            round(s["close_median_s"] / base, 2) if base else None,
            s["checks"]["lines"],
            s["checks"]["key_lines"],
            not s["checks"]["failures"],
        ]
        for s in sizes
    ]
    header = [
        "events",
        "october",
        "seed s",
        "close s",
        "median s",
        "worst s",
        "again s",
        "events/s",
        "x smallest",
        "lines",
        "key lines",
        "checks ok",
    ]
    meta = results["meta"]
    out = [
        f"close_month {MONTH}: {meta['tenants']} tenants, {meta['models']} models, "
        f"PostgreSQL {meta.get('postgres', '?')}, {meta.get('cpus')} CPUs",
        f"close s: the first run; median s, worst s: of {meta.get('repeat', 1)} runs (the "
        "others on fresh copies of the seeded database);",
        "again s: the same command once more (changes nothing); events/s and x smallest: "
        "from the median.",
        "",
        table(rows, header),
    ]
    for s in sizes:
        for failure in s["checks"]["failures"]:
            out.append(f"FAILED at {s['events']} events: {failure}")
    largest = max(sizes, key=lambda s: s["events"]) if sizes else None
    if largest is not None:
        verdict = "within" if largest["close_max_s"] <= LIMIT_SECONDS else "OVER"
        out.append(
            f"{largest['events']} events: closed in {fmt(largest['close_median_s'])} s "
            f"(median), {fmt(largest['close_max_s'])} s at worst: {verdict} the "
            f"{LIMIT_SECONDS:.0f} s limit."
        )
    return "\n".join(out)


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    with psycopg.connect(PG_ADMIN_URL) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "month": MONTH,
        "tenants": args.tenants,
        "models": args.models,
        "limit_s": LIMIT_SECONDS,
        "repeat": args.repeat,
        "postgres": row[0] if row else None,
        **machine(ROOT),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        default=",".join(str(s) for s in DEFAULT_SIZES),
        help="comma-separated numbers of usage events",
    )
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--models", type=int, default=15)
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="close the month this many times per size, each on a fresh copy of the "
        "seeded database (default 3; the table shows the median and the worst)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the last size's database")
    parser.add_argument("--report", metavar="JSON", help="print the table of an earlier run")
    parser.add_argument("--seed", type=int, metavar="N", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return 0
    if args.seed:
        import django

        django.setup()
        print(json.dumps(seed(args.seed, args.tenants, args.models)))
        return 0

    sizes = sorted(int(s) for s in args.sizes.split(","))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS_DIR.mkdir(exist_ok=True)
    results: dict[str, Any] = {"meta": _meta(args), "sizes": []}
    path = RESULTS_DIR / f"billing-{stamp}.json"
    try:
        for n in sizes:
            print(f"{n} events, {args.tenants} tenants, {args.models} models ...", flush=True)
            results["sizes"].append(bench_size(n, args))
            path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    finally:
        if not args.keep:
            _database_drop(DB_NAME, SEEDED_DB, RERUN_DB)
    results["meta"]["loadavg_after"] = os.getloadavg()
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(report(results))
    print(f"\nFull results: {path.relative_to(ROOT)}")
    return 1 if any(s["checks"]["failures"] for s in results["sizes"]) else 0


if __name__ == "__main__":
    sys.exit(main())
