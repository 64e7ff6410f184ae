"""Per-user and per-channel sliding-window limits on questions, so nobody can monopolise the GPU."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

Exceeded = Literal["user", "channel"]


class SlidingWindow:
    """At most `limit` hits per `window_seconds` for each key (limit 0 means unlimited)."""

    def __init__(self, limit: int, window_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._window = window_seconds
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @property
    def limited(self) -> bool:
        return self._limit > 0

    def _recent(self, key: str, now: float) -> deque[float]:
        hits = self._hits.setdefault(key, deque())
        while hits and now - hits[0] >= self._window:
            hits.popleft()
        return hits

    def allows(self, key: str) -> bool:
        if self._limit <= 0:
            return True
        with self._lock:
            return len(self._recent(key, self._clock())) < self._limit

    def hit(self, key: str) -> None:
        if self._limit <= 0:
            return
        with self._lock:
            now = self._clock()
            self._recent(key, now).append(now)


class QuestionRateLimiter:
    """Checks both limits and counts a question against both only when both allow it."""

    def __init__(
        self,
        per_user: int,
        per_channel: int,
        window_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._users = SlidingWindow(per_user, window_seconds, clock)
        self._channels = SlidingWindow(per_channel, window_seconds, clock)
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """False when both limits are off (0): `check` then always allows."""
        return self._users.limited or self._channels.limited

    def check(self, team_id: str, channel_id: str, user_id: str | None) -> Exceeded | None:
        """None (and the question is counted) when allowed; otherwise which limit was exceeded."""
        if not self.active:
            return None
        user_key = f"{team_id}/{user_id}" if user_id else None
        channel_key = f"{team_id}/{channel_id}"
        with self._lock:
            if user_key is not None and not self._users.allows(user_key):
                return "user"
            if not self._channels.allows(channel_key):
                return "channel"
            if user_key is not None:
                self._users.hit(user_key)
            self._channels.hit(channel_key)
            return None
