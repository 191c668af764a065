"""Requests per minute per API key: a fixed one-minute window counted in Redis, shared by every API
process (one INCR per request; the count expires with its window).

A fixed window lets a key send up to twice its limit across a window boundary; in exchange it costs
one round trip and its reset time is exact, which is what `Retry-After` reports. Without Redis (the
embedded mode: one API process) the count is kept in this process. When Redis cannot be reached
the request is let through and a warning logged: an outage of the limiter must not become an outage
of the API.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

WINDOW_S = 60
KEY_PREFIX = "atelier:rate"


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    used: int  # requests counted in this window, this one included
    window_start: float  # unix time
    reset_s: int  # whole seconds until the window ends (at least 1)

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


class RateLimiter(Protocol):
    def hit(self, key_id: str, limit: int) -> RateDecision: ...
    def peek(self, key_id: str, limit: int) -> RateDecision: ...


def _window(now: float) -> tuple[int, int]:
    start = int(now // WINDOW_S) * WINDOW_S
    return start, max(1, math.ceil(start + WINDOW_S - now))


def _decide(limit: int, used: int, now: float) -> RateDecision:
    start, reset_s = _window(now)
    return RateDecision(allowed=used <= limit, limit=limit, used=used, window_start=start, reset_s=reset_s)


class RedisRateLimiter:
    def __init__(self, url: str) -> None:
        import redis

        # Short timeouts: a slow Redis must not hold every request up for long.
        self._redis = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)

    def _key(self, key_id: str, start: int) -> str:
        return f"{KEY_PREFIX}:{key_id}:{start}"

    def hit(self, key_id: str, limit: int) -> RateDecision:
        now = time.time()
        start, _ = _window(now)
        key = self._key(key_id, start)
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, WINDOW_S * 2)
            used = int(pipe.execute()[0])
        except Exception:
            log.warning("rate limiter: Redis unreachable; request let through", exc_info=True)
            return _decide(limit, 0, now)
        return _decide(limit, used, now)

    def peek(self, key_id: str, limit: int) -> RateDecision:
        now = time.time()
        start, _ = _window(now)
        try:
            used = int(self._redis.get(self._key(key_id, start)) or 0)
        except Exception:
            used = 0
        return _decide(limit, used, now)


class MemoryRateLimiter:
    """The same window in this process only (embedded mode)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def hit(self, key_id: str, limit: int) -> RateDecision:
        now = time.time()
        start, _ = _window(now)
        with self._lock:
            for old in [k for k in self._counts if k[1] < start]:
                del self._counts[old]
            used = self._counts.get((key_id, start), 0) + 1
            self._counts[(key_id, start)] = used
        return _decide(limit, used, now)

    def peek(self, key_id: str, limit: int) -> RateDecision:
        now = time.time()
        start, _ = _window(now)
        with self._lock:
            used = self._counts.get((key_id, start), 0)
        return _decide(limit, used, now)


@functools.cache
def limiter_for(redis_url: str | None) -> RateLimiter:
    return RedisRateLimiter(redis_url) if redis_url else MemoryRateLimiter()
