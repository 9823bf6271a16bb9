"""The process's own end: when its server asks it to stop, by when calls under way must
have ended (gunicorn's graceful timeout, less a margin to write their ledger rows), and
the upstream reads still waiting then, interrupted so that their calls end too."""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from typing import Protocol


class Interruptible(Protocol):
    def interrupt(self) -> None: ...


_stop_at: float | None = None
# Weak: a stream dropped without being closed is not kept alive by this.
_interruptible: weakref.WeakSet[Interruptible] = weakref.WeakSet()
_lock = threading.Lock()


def stop_requested(*, within: float) -> None:
    """The server is stopping this process: calls must end within `within` seconds.
    Then every streamed response still being read is interrupted (a stream whose
    provider is silent, or has sent its headers but no event yet, would otherwise be cut
    at the server's deadline, unmetered). A call still waiting for a provider's headers,
    or a plain one, is not: it ends by its own timeout or at the server's deadline."""
    global _stop_at
    _stop_at = time.monotonic() + within
    timer = threading.Timer(within, _interrupt_all)
    timer.daemon = True
    timer.start()


def stop_due() -> bool:
    """Whether calls still under way must end now."""
    return _stop_at is not None and time.monotonic() >= _stop_at


def interrupt_on_stop(reader: Interruptible) -> None:
    """Call `reader.interrupt()` (from another thread) when calls must end, unless it is
    forgotten (closed) first."""
    with _lock:
        _interruptible.add(reader)
    if stop_due():
        reader.interrupt()


def forget(reader: Interruptible) -> None:
    with _lock:
        _interruptible.discard(reader)


def _interrupt_all() -> None:
    with _lock:
        readers = list(_interruptible)
    for reader in readers:
        with contextlib.suppress(Exception):  # each read is interrupted on a best effort
            reader.interrupt()
