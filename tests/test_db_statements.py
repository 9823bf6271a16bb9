"""config.db.run_together: statements sent at once (one round trip on PostgreSQL),
inside the caller's transaction, each with its own results, all or nothing. Runs on the
suite's database: SQLite in the first pass, PostgreSQL (pipeline mode) in the second."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction

from config.db import Statement, run_together, sql_names
from tenants.models import Tenant

pytestmark = pytest.mark.django_db(transaction=True)


def _bump(tenant_id: int) -> Statement:
    table, c = sql_names(Tenant)
    return Statement(
        f"UPDATE {table} SET {c['budget_version']} = {c['budget_version']} + 1 "  # noqa: S608
        f"WHERE {c['id']} = %s RETURNING {c['budget_version']}",
        [tenant_id],
    )


def _rename(tenant_id: int, slug: str) -> Statement:
    table, c = sql_names(Tenant)
    return Statement(
        f"UPDATE {table} SET {c['slug']} = %s WHERE {c['id']} = %s",  # noqa: S608
        [slug, tenant_id],
    )


def _tenant(slug: str) -> Tenant:
    return Tenant.objects.create(slug=slug, name=slug.title())


def test_each_statement_gets_its_own_results_in_order():
    one, two = _tenant("one"), _tenant("two")
    first, again, other, missing = _bump(one.pk), _bump(one.pk), _bump(two.pk), _bump(0)
    rename = _rename(two.pk, "renamed")
    with transaction.atomic():
        run_together([first, again, other, missing, rename])
    # The second statement saw the first one's write: they ran in order.
    assert (first.row, again.row, other.row, missing.row) == ((1,), (2,), (1,), None)
    assert (missing.rowcount, rename.rowcount, rename.row) == (0, 1, None)
    assert Tenant.objects.get(pk=two.pk).slug == "renamed"


def test_a_failing_statement_takes_the_whole_transaction_with_it():
    one, two = _tenant("one"), _tenant("two")
    with pytest.raises(IntegrityError), transaction.atomic():
        # The slug is unique: the second statement fails, the third never runs.
        run_together([_bump(one.pk), _rename(one.pk, "two"), _bump(two.pk)])
    assert list(Tenant.objects.order_by("slug").values_list("slug", "budget_version")) == [
        ("one", 0),
        ("two", 0),
    ]
    # The connection is usable again at once.
    with transaction.atomic():
        run_together([bump := _bump(one.pk)])
    assert bump.row == (1,)


def test_statements_run_together_only_inside_a_transaction():
    tenant = _tenant("one")
    with pytest.raises(RuntimeError, match="inside a transaction"):
        run_together([_bump(tenant.pk)])
    assert Tenant.objects.get(pk=tenant.pk).budget_version == 0
