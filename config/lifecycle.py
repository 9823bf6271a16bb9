"""The process's own end: when its server asks it to stop, by when calls under way must
have ended (gunicorn's graceful timeout, less a margin to write their ledger rows)."""

from __future__ import annotations

import time

_stop_at: float | None = None


def stop_requested(*, within: float) -> None:
    """The server is stopping this process: calls must end within `within` seconds."""
    global _stop_at
    _stop_at = time.monotonic() + within


def stop_due() -> bool:
    """Whether calls still under way must end now."""
    return _stop_at is not None and time.monotonic() >= _stop_at
