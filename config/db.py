"""Running the gateway's hand-written per-call statements (key lookup, usage INSERT,
budget and rate-limit counters).

What the ORM's cursor does not do for them:

- On PostgreSQL each statement is prepared (parsed and planned once per pooled
  connection, then only executed): psycopg's server-side binding with `prepare=True`.
  Django's own cursors bind on the client and never prepare, which keeps external
  connection poolers happy; the gateway uses Django's in-process pool, where a
  connection and its prepared statements stay together.
- Outside a transaction, a thread holding no connection runs the statement on one taken
  from Django's pool for it alone and given straight back, without Django's own checkout
  and return (its connection state checks and signals, twice per call); the thread then
  holds no connection while the call waits on its provider.
- A statement outside a transaction whose pooled connection turns out to be dead (the
  database restarted, or a connection was killed) is run again once on a fresh
  connection, after the pool has checked and replaced the rest of its idle connections.
  That is why the pool does not spend a round trip checking each connection it hands out
  (DATABASE_POOL_CHECKS turns that back on). A connection the server has closed fails
  before the statement runs, so running it again counts nothing twice; the statements
  run this way are reads, writes a unique key makes idempotent (the usage event), and
  counter updates for rate limits, where a connection lost in the middle of one could at
  worst count a call's tokens twice.

While Django logs queries (DEBUG, or a test capturing them) or has execute wrappers
installed, statements go through its cursor instead, unprepared, so that they show up in
the log and pass the wrappers; and so they do when TOLLGATE_DATABASE_PREPARE is off
(behind a pooler that cannot keep prepared statements).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, OperationalError, connection, connections

logger = logging.getLogger(__name__)

T = TypeVar("T")


def fetch_one(sql: str, params: Sequence[Any]) -> tuple | None:
    return _execute(sql, params, lambda cursor: cursor.fetchone())


def fetch_all(sql: str, params: Sequence[Any]) -> list[tuple]:
    return _execute(sql, params, lambda cursor: cursor.fetchall())


def row_count(sql: str, params: Sequence[Any]) -> int:
    """Rows changed by an INSERT, UPDATE or DELETE."""
    return _execute(sql, params, lambda cursor: cursor.rowcount)


@dataclass
class Statement:
    """A statement for `run_together`; `rowcount` and `row` (its first row, for one that
    returns rows) are filled in when it has run."""

    sql: str
    params: Sequence[Any]
    rowcount: int = -1
    row: tuple | None = None

    def _read(self, cursor) -> None:
        self.rowcount = cursor.rowcount
        self.row = cursor.fetchone() if cursor.description is not None else None


def run_together(statements: Sequence[Statement]) -> None:
    """Run statements in order, inside the caller's transaction, and fill in their results.

    On PostgreSQL (prepared) they go to the server in one round trip (psycopg's pipeline
    mode) instead of one each: the rows they lock stay locked for that round trip and
    the commit, not for one round trip per statement with this thread waiting its turn
    for the GIL in between, which is what serialises calls that share a counter row. An
    error fails the statement it comes from; the server skips the rest, and the caller's
    transaction rolls back.
    """
    db = connections[DEFAULT_DB_ALIAS]
    if not db.in_atomic_block:
        raise RuntimeError("run_together() runs inside a transaction.")
    if not statements:
        return
    if not _prepares(db):
        for statement in statements:
            _execute_once(db, statement.sql, statement.params, statement._read)
        return
    _connection_checks(db)
    with db.wrap_database_errors:
        cursors = _pipeline_cursors(db.connection, len(statements))
        with db.connection.pipeline() as pipeline:
            for statement, cursor in zip(statements, cursors, strict=False):
                cursor.execute(statement.sql, statement.params, prepare=True)
            pipeline.sync()
            for statement, cursor in zip(statements, cursors, strict=False):
                statement._read(cursor)


def sql_names(model) -> tuple[str, dict[str, str]]:
    """A model's quoted table name and its concrete fields' quoted column names, by field
    name, in field order (the order `model_from_row` reads), for hand-written statements."""
    quote = connection.ops.quote_name
    columns = {f.name: quote(f.column) for f in model._meta.concrete_fields}
    return quote(model._meta.db_table), columns


def model_from_row(model: type[T], values: Sequence[Any]) -> T:
    """An instance of `model` from the values of its concrete fields' columns, in their
    order, converted as the ORM converts them (SQLite's datetimes, for one)."""
    attnames, converters = _from_db_plan(model)
    if converters:
        values = list(values)
        for index, column, functions in converters:
            for function in functions:
                values[index] = function(values[index], column, connection)
    return model.from_db(connection.alias, attnames, values)


@cache
def _from_db_plan(model) -> tuple[list[str], list[tuple[int, Any, list]]]:
    fields = model._meta.concrete_fields
    converters = []
    for index, field in enumerate(fields):
        column = field.get_col(model._meta.db_table)
        functions = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        if functions:
            converters.append((index, column, functions))
    return [f.attname for f in fields], converters


def _execute(sql: str, params: Sequence[Any], read: Callable[[Any], T]) -> T:
    # The thread's own wrapper, looked up once: each `connection.x` is a lookup.
    db = connections[DEFAULT_DB_ALIAS]
    retry = not db.in_atomic_block
    while True:
        pool = _statement_pool(db)
        try:
            if pool is not None:
                return _execute_pooled(db, pool, sql, params, read)
            return _execute_once(db, sql, params, read)
        except OperationalError as exc:
            died = (
                isinstance(exc, _PooledConnectionDied) if pool is not None else connection_broken()
            )
            if not (retry and died):
                raise
        retry = False
        logger.warning("A pooled database connection was dead; running the statement again.")
        if pool is not None:
            pool.check()
        else:
            connection_replace()


def _prepares(db) -> bool:
    """Whether statements run prepared on psycopg's own cursor (else Django's cursor)."""
    return (
        db.vendor == "postgresql"
        and not db.queries_logged
        and not db.execute_wrappers
        and settings.TOLLGATE_DATABASE_PREPARE
    )


def _statement_pool(db):
    """Django's pool, when a statement may take a connection from it for itself alone:
    outside a transaction, in a thread holding no connection, prepared."""
    if db.connection is None and not db.in_atomic_block and _prepares(db):
        pool = getattr(db, "pool", None)
        if pool is not None and type(getattr(pool, "_pool", None)) is deque:
            _most_recent_first(pool)
        return pool
    return None


class _MostRecentFirst(deque):
    """A pool's idle connections, handed out most recently returned first."""

    def popleft(self):
        return self.pop()


def _most_recent_first(pool) -> None:
    """Make `pool` hand out its most recently returned connection first (a stack), where
    psycopg_pool hands them out in turn (a queue), as SQLAlchemy's `pool_use_lifo` does.

    A call's two statements, and the next call's, then go to the PostgreSQL backend that
    served the last one, whose process and caches are still warm, instead of to the one
    that has waited longest: 0.2 to 0.25 ms less per call at concurrency 1 in
    bench.compare. psycopg_pool has no option for it: its idle connections are a deque
    it takes from the left and returns to the right (`_pool`), replaced here once, under
    its lock, by one that takes from the right (also when the pool shrinks: it then
    closes a recently used idle connection rather than the oldest, which is as good).
    Should a psycopg_pool release store them otherwise, this does nothing and the pool
    keeps its own order (tests/test_db_reconnect.py shows which one is in force).
    """
    with pool._lock:
        if type(pool._pool) is deque:
            pool._pool = _MostRecentFirst(pool._pool)


class _PooledConnectionDied(OperationalError):
    """The connection a statement took from the pool turned out dead."""


def _execute_pooled(db, pool, sql: str, params: Sequence[Any], read: Callable[[Any], T]) -> T:
    """One statement in autocommit on a connection taken from Django's pool for it alone
    and given straight back: the thread holds no connection, and Django's per-checkout
    work (connection state checks, signals) is skipped; the pool configured the
    connection as Django does when it opened it."""
    raw = None
    try:
        with db.wrap_database_errors:
            if pool.closed:  # nothing has opened it yet (Django opens it on first use)
                pool.open()
            raw = pool.getconn()
            try:
                if not raw.autocommit:  # as Django gives connections back, but make sure
                    raw.autocommit = True
                cursor = _prepared_cursor(raw)
                cursor.execute(sql, params, prepare=True)
                return read(cursor)
            finally:
                pool.putconn(raw)
    except OperationalError as exc:
        # Not when no connection could be had (raw is None): see connection_broken().
        if raw is not None and raw.closed:
            raise _PooledConnectionDied(*exc.args) from exc
        raise


def _execute_once(db, sql: str, params: Sequence[Any], read: Callable[[Any], T]) -> T:
    if not _prepares(db):
        with db.cursor() as cursor:
            cursor.execute(sql, params)
            return read(cursor)
    _connection_checks(db)
    with db.wrap_database_errors:
        cursor = _prepared_cursor(db.connection)
        cursor.execute(sql, params, prepare=True)
        return read(cursor)


def _connection_checks(db) -> None:
    """The checks `db.cursor()` and its `execute()` make, without the two cursor objects
    (Django's wrapper and psycopg's client-side cursor) they would build per statement."""
    db.close_if_health_check_failed()
    db.ensure_connection()
    db.validate_thread_sharing()
    db.validate_no_broken_transaction()


def _pipeline_cursors(raw, count: int) -> list:
    """`count` server-side binding cursors kept on the connection, one per statement of a
    pipeline (each holds its own statement's results)."""
    cursors = getattr(raw, "_tollgate_pipeline_cursors", None)
    if cursors is None:
        cursors = raw._tollgate_pipeline_cursors = []
    if len(cursors) < count:
        import psycopg  # only on PostgreSQL

        cursors.extend(psycopg.Cursor(raw) for _ in range(count - len(cursors)))
    return cursors[:count]


def _prepared_cursor(raw):
    """The psycopg connection's server-side binding cursor, made once and kept on it (a
    pooled connection serves one thread at a time, and its cursor with it), using the
    adapters Django configured on the connection."""
    cursor = getattr(raw, "_tollgate_cursor", None)
    if cursor is None:
        import psycopg  # only on PostgreSQL

        cursor = raw._tollgate_cursor = psycopg.Cursor(raw)
    return cursor


def connection_broken() -> bool:
    """Whether this thread had a database connection that is now gone (not merely in
    error). Not when no connection could be had at all (the database down, the pool
    exhausted): another try would only wait as long again."""
    raw = connection.connection
    return raw is not None and bool(getattr(raw, "closed", False))


def connection_replace() -> None:
    """Drop this thread's dead connection; with a pool, have it check its idle ones too
    (after a database restart they are all dead), so the next statement gets a live one."""
    connection.close()
    pool = getattr(connection, "pool", None)
    if pool is not None:
        pool.check()
