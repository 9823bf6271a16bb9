"""Per-key rate limits, shared by every gateway process through the database.

- Requests per minute and tokens per minute count in fixed one-minute windows
  (`RateWindow`). A request is admitted by one conditional UPDATE that matches no row
  once the minute's requests or tokens have reached their limit. Tokens are counted when
  a call finishes, with its real usage, so a burst of concurrent calls can end a minute
  somewhat over its token limit; the next calls are then refused until the window turns.
- Concurrent requests are leases (`KeyLease`), taken under a lock on the key's row and
  given back when the call ends, or earlier when its client hangs up (the proxy then
  drains the provider's stream for its usage); a lease of a process that died expires on
  its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from config.db import Statement, run_together

from . import statements
from .models import ApiKey, KeyLease, RateWindow

WINDOW = timedelta(minutes=1)
# Streams renew their lease while they run; a dead process's lease lapses after this.
LEASE_TTL = timedelta(minutes=10)


@dataclass(frozen=True)
class RateState:
    """What the x-ratelimit-* headers report after admitting (or refusing) a call."""

    window_start: datetime
    requests: int
    tokens: int
    rpm_limit: int | None
    tpm_limit: int | None

    def reset_seconds(self, now: datetime) -> int:
        return max(1, int((self.window_start + WINDOW - now).total_seconds() + 0.999))

    def headers(self, now: datetime) -> dict[str, str]:
        reset = f"{self.reset_seconds(now)}s"
        headers = {}
        if self.rpm_limit is not None:
            headers["x-ratelimit-limit-requests"] = str(self.rpm_limit)
            headers["x-ratelimit-remaining-requests"] = str(max(self.rpm_limit - self.requests, 0))
            headers["x-ratelimit-reset-requests"] = reset
        if self.tpm_limit is not None:
            headers["x-ratelimit-limit-tokens"] = str(self.tpm_limit)
            headers["x-ratelimit-remaining-tokens"] = str(max(self.tpm_limit - self.tokens, 0))
            headers["x-ratelimit-reset-tokens"] = reset
        return headers


class RateLimited(Exception):
    def __init__(self, message: str, *, retry_after: int, state: RateState | None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.state = state


def _window_start(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def rate_limited(key: ApiKey) -> bool:
    """Whether the key has any limit a call counts against."""
    return (key.rpm_limit, key.tpm_limit, key.concurrency_limit) != (None, None, None)


def rate_limit_admit(*, key: ApiKey, request_id: str, at: datetime) -> RateState | None:
    """Count the call against the key's limits, or raise RateLimited (counting nothing).
    Returns the state for the headers (None for a key without per-minute limits)."""
    if not rate_limited(key):
        return None
    per_minute = key.rpm_limit is not None or key.tpm_limit is not None
    # One transaction (the caller's, if any): the count read back is this call's own,
    # the row staying locked until it commits.
    with transaction.atomic(savepoint=False):
        if key.concurrency_limit is not None:
            # Serialises the lease count of this key across processes. Taken first, so
            # every transaction takes its locks in one order (no deadlock).
            statements.key_lock(key_id=key.pk)
        state = _minute_admit(key, at) if per_minute else None
        if key.concurrency_limit is not None:
            _lease_take(key, request_id, at, state)
    return state


class RateAdmission:
    """`rate_limit_admit` as statements, for a caller to send with its own in one round
    trip (config.db.run_together) in its transaction, then ask `admitted()`. When it is
    False the caller rolls back and admits step by step with `rate_limit_admit`, which
    tells what refused the call, or opens the minute's window when none exists yet."""

    def __init__(self, *, key: ApiKey, request_id: str, at: datetime):
        self._key = key
        self._window_start = _window_start(at)
        self.statements: list[Statement] = []
        self._window = self._lease = None
        if key.concurrency_limit is not None:
            # The same order as rate_limit_admit takes its locks in.
            self.statements.append(statements.key_lock_statement(key_id=key.pk))
        if key.rpm_limit is not None or key.tpm_limit is not None:
            self._window = statements.window_admit_statement(
                key_id=key.pk, window_start=self._window_start, rpm=key.rpm_limit, tpm=key.tpm_limit
            )
            self.statements.append(self._window)
        if key.concurrency_limit is not None:
            self._lease = statements.lease_insert_if_room_statement(
                key_id=key.pk,
                request_id=request_id,
                at=at,
                expires_at=at + LEASE_TTL,
                limit=key.concurrency_limit,
            )
            self.statements.append(self._lease)

    def admitted(self) -> bool:
        return (self._window is None or self._window.row is not None) and (
            self._lease is None or self._lease.rowcount == 1
        )

    @property
    def state(self) -> RateState | None:
        """For the headers, once admitted (None: the key has no per-minute limits)."""
        if self._window is None:
            return None
        requests, tokens = self._window.row
        return RateState(
            self._window_start, requests, tokens, self._key.rpm_limit, self._key.tpm_limit
        )


def _minute_admit(key: ApiKey, at: datetime) -> RateState:
    window_start = _window_start(at)

    def admit():
        return statements.window_admit(
            key_id=key.pk, window_start=window_start, rpm=key.rpm_limit, tpm=key.tpm_limit
        )

    counts = admit()
    if counts is None:
        # No room, or no window yet (or one another process opened after our UPDATE).
        try:
            with transaction.atomic():  # a savepoint: a lost race leaves the outer one usable
                RateWindow.objects.create(api_key_id=key.pk, window_start=window_start, requests=1)
            counts = (1, 0)
        except IntegrityError:  # the window exists: count in it if there is room
            counts = admit()
    admitted = counts is not None
    if counts is None:
        counts = (
            RateWindow.objects.filter(api_key_id=key.pk, window_start=window_start)
            .values_list("requests", "tokens")
            .get()
        )
    requests, tokens = counts
    state = RateState(window_start, requests, tokens, key.rpm_limit, key.tpm_limit)
    if not admitted:
        over_requests = key.rpm_limit is not None and requests >= key.rpm_limit
        what = (
            f"{key.rpm_limit} requests per minute"
            if over_requests
            else f"{key.tpm_limit} tokens per minute"
        )
        raise RateLimited(
            f"Rate limit reached for this API key: {what}. Retry after the window resets.",
            retry_after=state.reset_seconds(at),
            state=state,
        )
    return state


def _lease_take(key: ApiKey, request_id: str, at: datetime, state: RateState | None) -> None:
    """Count then insert, under the lock on the key's row that the caller holds."""
    if statements.leases_live(key_id=key.pk, at=at) >= key.concurrency_limit:
        raise RateLimited(
            f"Too many concurrent requests for this API key: the limit is {key.concurrency_limit}.",
            retry_after=1,
            state=state,
        )
    statements.lease_insert(key_id=key.pk, request_id=request_id, expires_at=at + LEASE_TTL)


def key_lease_renew(*, request_id: str, now: datetime) -> None:
    statements.lease_renew(request_id=request_id, expires_at=now + LEASE_TTL)


def rate_limit_release_statements(
    *, key: ApiKey, request_id: str, at: datetime, tokens: int, lease: bool = True
) -> list[Statement]:
    """What `rate_limit_release` writes, for a caller to run in its own transaction (the
    proxy runs them with the call's usage event: config.db.run_together). `lease=False`:
    the lease was given back already (a `rate_limit_release` with no tokens, when the
    client hung up); expiring it again would move its expiry later, making it count
    again for a call that arrived in between."""
    writes = []
    if key.tpm_limit is not None and tokens > 0:
        writes.append(
            statements.window_tokens_add_statement(
                key_id=key.pk, window_start=_window_start(at), tokens=tokens
            )
        )
    if lease and key.concurrency_limit is not None:
        # Expired at once; the beat task deletes the row.
        writes.append(statements.lease_expire_statement(request_id=request_id, at=timezone.now()))
    return writes


def rate_limit_release(
    *, key: ApiKey, request_id: str, at: datetime, tokens: int, lease: bool = True
) -> None:
    """A call has ended: count its tokens in its window and give its lease back (unless
    `lease=False`: see `rate_limit_release_statements`), in one transaction (the caller's,
    if any). With no tokens it gives the lease back alone."""
    writes = rate_limit_release_statements(
        key=key, request_id=request_id, at=at, tokens=tokens, lease=lease
    )
    if writes:
        with transaction.atomic(savepoint=False):
            run_together(writes)


def key_leases_expire() -> int:
    """Delete expired leases and windows older than an hour. Returns the leases deleted."""
    now = timezone.now()
    RateWindow.objects.filter(window_start__lt=now - timedelta(hours=1)).delete()
    deleted, _ = KeyLease.objects.filter(expires_at__lte=now).delete()
    return deleted
