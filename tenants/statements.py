"""The per-call statements of budgets and rate limits, written out by hand.

Each call of a key with a budget or a rate limit runs up to a dozen small statements.
Built by the ORM, each costs about 400 µs of CPU; written out, about 80 µs (measured on
PostgreSQL, `make bench --limits`). The SQL is assembled once from the models' own
metadata (table and column names), takes every value as a parameter, and runs the same
on PostgreSQL and SQLite (3.35 and later, for RETURNING). Everything else about budgets
and limits stays in the ORM.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache

from django.db import connection

from config.db import Statement, fetch_all, fetch_one, row_count, sql_names

from .models import ApiKey, BudgetPeriod, BudgetReservation, KeyLease, RateWindow

# Stands for "no limit" in the conditions below (BIGINT-safe on both databases).
UNLIMITED = 2**62


def _at(value: datetime):
    """A datetime as the database stores it (naive UTC text on SQLite)."""
    return connection.ops.adapt_datetimefield_value(value)


# --- rate windows --------------------------------------------------------------------------


@cache
def _window_admit_sql() -> str:
    table, c = sql_names(RateWindow)
    return (
        f"UPDATE {table} SET {c['requests']} = {c['requests']} + 1 "  # noqa: S608
        f"WHERE {c['api_key']} = %s AND {c['window_start']} = %s "
        f"AND {c['requests']} < %s AND {c['tokens']} < %s "
        f"RETURNING {c['requests']}, {c['tokens']}"
    )


def window_admit_statement(
    *, key_id: int, window_start: datetime, rpm: int | None, tpm: int | None
) -> Statement:
    """Count a request in the key's window if both limits leave room. Its row: (requests,
    tokens) after counting; none when there is no room, or no window yet."""
    return Statement(
        _window_admit_sql(), [key_id, _at(window_start), rpm or UNLIMITED, tpm or UNLIMITED]
    )


def window_admit(
    *, key_id: int, window_start: datetime, rpm: int | None, tpm: int | None
) -> tuple[int, int] | None:
    """`window_admit_statement`, run: (requests, tokens), or None."""
    statement = window_admit_statement(key_id=key_id, window_start=window_start, rpm=rpm, tpm=tpm)
    row = fetch_one(statement.sql, statement.params)
    return (row[0], row[1]) if row else None


@cache
def _window_tokens_sql() -> str:
    table, c = sql_names(RateWindow)
    return (
        f"UPDATE {table} SET {c['tokens']} = {c['tokens']} + %s "  # noqa: S608
        f"WHERE {c['api_key']} = %s AND {c['window_start']} = %s"
    )


def window_tokens_add_statement(*, key_id: int, window_start: datetime, tokens: int) -> Statement:
    return Statement(_window_tokens_sql(), [tokens, key_id, _at(window_start)])


# --- concurrency leases ----------------------------------------------------------------------


@cache
def _key_lock_sql() -> str:
    table, c = sql_names(ApiKey)
    # FOR NO KEY UPDATE serialises lease counting without blocking the inserts of rows
    # that reference the key. SQLite has no row locks and needs none: its write
    # transactions run one at a time.
    lock = " FOR NO KEY UPDATE" if connection.features.has_select_for_no_key_update else ""
    return f"SELECT {c['id']} FROM {table} WHERE {c['id']} = %s{lock}"  # noqa: S608


def key_lock_statement(*, key_id: int) -> Statement:
    """Hold the key's row until the transaction ends (run it inside one)."""
    return Statement(_key_lock_sql(), [key_id])


def key_lock(*, key_id: int) -> None:
    statement = key_lock_statement(key_id=key_id)
    fetch_one(statement.sql, statement.params)


@cache
def _leases_live_sql() -> str:
    table, c = sql_names(KeyLease)
    return (
        f"SELECT COUNT(*) FROM {table} "  # noqa: S608
        f"WHERE {c['api_key']} = %s AND {c['expires_at']} > %s"
    )


def leases_live(*, key_id: int, at: datetime) -> int:
    return fetch_one(_leases_live_sql(), [key_id, _at(at)])[0]


@cache
def _lease_insert_sql() -> str:
    table, c = sql_names(KeyLease)
    return (
        f"INSERT INTO {table} ({c['api_key']}, {c['request_id']}, {c['expires_at']}) "  # noqa: S608
        "VALUES (%s, %s, %s)"
    )


def lease_insert(*, key_id: int, request_id: str, expires_at: datetime) -> None:
    row_count(_lease_insert_sql(), [key_id, request_id, _at(expires_at)])


@cache
def _lease_insert_if_room_sql() -> str:
    table, c = sql_names(KeyLease)
    return (
        f"INSERT INTO {table} ({c['api_key']}, {c['request_id']}, {c['expires_at']}) "  # noqa: S608
        f"SELECT %s, %s, %s WHERE (SELECT COUNT(*) FROM {table} "
        f"WHERE {c['api_key']} = %s AND {c['expires_at']} > %s) < %s"
    )


def lease_insert_if_room_statement(
    *, key_id: int, request_id: str, at: datetime, expires_at: datetime, limit: int
) -> Statement:
    """`leases_live` then `lease_insert` in one statement: inserts nothing (rowcount 0)
    when the key has `limit` live leases. Run it after `key_lock_statement`, in its
    transaction: a statement's snapshot is taken when it starts, so the count sees every
    lease committed before the lock was granted."""
    return Statement(
        _lease_insert_if_room_sql(),
        [key_id, request_id, _at(expires_at), key_id, _at(at), limit],
    )


@cache
def _lease_expire_sql() -> str:
    table, c = sql_names(KeyLease)
    return f"UPDATE {table} SET {c['expires_at']} = %s WHERE {c['request_id']} = %s"  # noqa: S608


def lease_expire_statement(*, request_id: str, at: datetime) -> Statement:
    return Statement(_lease_expire_sql(), [_at(at), request_id])


def lease_renew(*, request_id: str, expires_at: datetime) -> None:
    """A long call's lease moved on; on a pooled connection taken for it alone (a stream
    holds none while it relays)."""
    row_count(_lease_expire_sql(), [_at(expires_at), request_id])


# --- budget periods and reservations -----------------------------------------------------


@cache
def _period_reserve_sql() -> str:
    table, c = sql_names(BudgetPeriod)
    return (
        f"UPDATE {table} SET {c['reserved_pico']} = {c['reserved_pico']} + %s "  # noqa: S608
        f"WHERE {c['id']} = %s AND {c['spent_pico']} + {c['reserved_pico']} + %s <= %s"
    )


def period_reserve_statement(*, period_id: int, amount_pico: int, limit_pico: int) -> Statement:
    """Add to reserved if spent + reserved + amount stays within the limit (rowcount 1)."""
    return Statement(_period_reserve_sql(), [amount_pico, period_id, amount_pico, limit_pico])


def period_reserve(*, period_id: int, amount_pico: int, limit_pico: int) -> bool:
    statement = period_reserve_statement(
        period_id=period_id, amount_pico=amount_pico, limit_pico=limit_pico
    )
    return row_count(statement.sql, statement.params) == 1


@cache
def _period_settle_sql(releasing: bool) -> str:
    table, c = sql_names(BudgetPeriod)
    held = "0"
    if releasing:
        # What the call's reservation row still holds, not what the call remembers: the
        # hold may have been released since (budget_holds_expire, on a call that ran
        # past its hour), and releasing it twice would break the period's check.
        holds, h = sql_names(BudgetReservation)
        held = (
            f"COALESCE((SELECT {h['amount_pico']} FROM {holds} "  # noqa: S608
            f"WHERE {h['period']} = %s AND {h['request_id']} = %s), 0)"
        )
    return (
        f"UPDATE {table} SET {c['reserved_pico']} = {c['reserved_pico']} - {held}, "  # noqa: S608
        f"{c['spent_pico']} = {c['spent_pico']} + %s WHERE {c['id']} = %s "
        f"RETURNING {c['spent_pico']}"
    )


def period_settle_statement(*, period_id: int, request_id: str | None, cost_pico: int) -> Statement:
    """Add a cost, and release the hold `request_id` has on the period (None: release
    nothing, its hold covers a next attempt). Its row: the period's spent afterwards
    (none: no such period)."""
    if request_id is None:
        return Statement(_period_settle_sql(False), [cost_pico, period_id])
    return Statement(_period_settle_sql(True), [period_id, request_id, cost_pico, period_id])


def period_settle(*, period_id: int, request_id: str | None, cost_pico: int) -> int | None:
    statement = period_settle_statement(
        period_id=period_id, request_id=request_id, cost_pico=cost_pico
    )
    row = fetch_one(statement.sql, statement.params)
    return row[0] if row else None


@cache
def _reservations_insert_sql(rows: int) -> str:
    table, c = sql_names(BudgetReservation)
    values = ", ".join(["(%s, %s, %s, %s)"] * rows)
    return (
        f"INSERT INTO {table} ({c['period']}, {c['request_id']}, {c['amount_pico']}, "  # noqa: S608
        f"{c['created_at']}) VALUES {values}"
    )


def reservations_insert_statement(
    *, request_id: str, holds: dict[int, int], at: datetime
) -> Statement:
    """One row per hold (at least one), in one statement."""
    created_at = _at(at)
    params = []
    for period_id, amount in holds.items():
        params += [period_id, request_id, amount, created_at]
    return Statement(_reservations_insert_sql(len(holds)), params)


def reservations_insert(*, request_id: str, holds: dict[int, int], at: datetime) -> None:
    if holds:
        statement = reservations_insert_statement(request_id=request_id, holds=holds, at=at)
        row_count(statement.sql, statement.params)


@cache
def _reservations_lock_sql(vendor: str) -> str:
    table, c = sql_names(BudgetReservation)
    lock = " FOR UPDATE" if vendor == "postgresql" else ""  # SQLite: one writer at a time
    return (
        f"SELECT {c['period']} FROM {table} WHERE {c['request_id']} = %s "  # noqa: S608
        f"ORDER BY {c['period']}{lock}"
    )


def reservations_lock_statement(*, request_id: str) -> Statement:
    """A call's reservation rows locked, before its settlement reads what they hold: a
    release of the same holds running at the same moment (budget_holds_expire) either
    waits for the settlement, or the settlement waits for it and then finds them gone.
    (An UPDATE's subquery reads the snapshot its statement began with, not the rows as
    they are once its lock wait is over.)"""
    return Statement(_reservations_lock_sql(connection.vendor), [request_id])


@cache
def _reservations_take_sql(older: bool) -> str:
    table, c = sql_names(BudgetReservation)
    where = f"{c['request_id']} = %s" + (f" AND {c['created_at']} < %s" if older else "")
    return (
        f"DELETE FROM {table} WHERE {where} "  # noqa: S608
        f"RETURNING {c['period']}, {c['amount_pico']}"
    )


def reservations_take(*, request_id: str, older_than: datetime | None = None) -> list[tuple]:
    """Delete a call's reservations (those not renewed since `older_than`, if given) and
    return what each held, (period id, amount): only what this statement deleted is
    released, whatever ran at the same moment."""
    if older_than is None:
        return fetch_all(_reservations_take_sql(False), [request_id])
    return fetch_all(_reservations_take_sql(True), [request_id, _at(older_than)])


@cache
def _reservations_renew_sql() -> str:
    table, c = sql_names(BudgetReservation)
    return f"UPDATE {table} SET {c['created_at']} = %s WHERE {c['request_id']} = %s"  # noqa: S608


def reservations_renew(*, request_id: str, at: datetime) -> None:
    """A long call's holds marked alive; on a pooled connection taken for it alone."""
    row_count(_reservations_renew_sql(), [_at(at), request_id])


@cache
def _reservations_delete_sql() -> str:
    table, c = sql_names(BudgetReservation)
    return f"DELETE FROM {table} WHERE {c['request_id']} = %s"  # noqa: S608


def reservations_delete_statement(*, request_id: str) -> Statement:
    return Statement(_reservations_delete_sql(), [request_id])
