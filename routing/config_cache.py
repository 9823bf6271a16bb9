"""A per-process, thread-safe TTL cache for configuration read on every request (the
catalog, allowlists). Entries live TOLLGATE_CONFIG_CACHE_SECONDS; saves in this process
clear it at once through signals (see the apps' ready())."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import TypeVar

from cachetools import TTLCache
from django.conf import settings

T = TypeVar("T")


class ConfigCache:
    """`ttl` seconds, or (None) TOLLGATE_CONFIG_CACHE_SECONDS read at first use."""

    def __init__(self, maxsize: int, ttl: float | None = None):
        self._maxsize = maxsize
        self._ttl = ttl
        self._lock = threading.Lock()
        self._cache: TTLCache | None = None

    def get_or_load(self, key: Hashable, load: Callable[[], T]) -> T:
        with self._lock:
            if self._cache is None:
                # The lifetime is read at first use, so tests and settings can change it.
                ttl = self._ttl if self._ttl is not None else settings.TOLLGATE_CONFIG_CACHE_SECONDS
                self._cache = TTLCache(self._maxsize, ttl)
            try:
                return self._cache[key]
            except KeyError:
                pass
        value = load()  # outside the lock: a slow query must not hold up other threads
        with self._lock:
            if self._cache is not None:
                self._cache[key] = value
        return value

    def clear(self) -> None:
        with self._lock:
            self._cache = None
