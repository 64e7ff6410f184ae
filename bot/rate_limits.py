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
    """Per-user and per-channel limits; a question is counted against both only once it is accepted.

    Checking (`exceeded`) and counting (`hit`) are separate so that a question is counted only after
    it was stored: one that failed to store, or a Slack redelivery of one already stored, never
    uses up the asker's quota. Questions checked at the same moment can therefore overshoot a limit
    by the few in flight, which is fine for a guard against monopolising the GPU.
    """

    def __init__(
        self,
        per_user: int,
        per_channel: int,
        window_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._users = SlidingWindow(per_user, window_seconds, clock)
        self._channels = SlidingWindow(per_channel, window_seconds, clock)
        # Both windows are counted together, so neither is ever seen with only one of them hit.
        self._lock = threading.Lock()

    @staticmethod
    def _keys(team_id: str, channel_id: str, user_id: str | None) -> tuple[str | None, str]:
        return (f"{team_id}/{user_id}" if user_id else None), f"{team_id}/{channel_id}"

    def exceeded(self, team_id: str, channel_id: str, user_id: str | None) -> Exceeded | None:
        """Which limit another question would exceed, or None when it is allowed; counts nothing."""
        user_key, channel_key = self._keys(team_id, channel_id, user_id)
        with self._lock:
            if user_key is not None and not self._users.allows(user_key):
                return "user"
            if not self._channels.allows(channel_key):
                return "channel"
            return None

    def hit(self, team_id: str, channel_id: str, user_id: str | None) -> None:
        """Count an accepted question against both limits."""
        user_key, channel_key = self._keys(team_id, channel_id, user_id)
        with self._lock:
            if user_key is not None:
                self._users.hit(user_key)
            self._channels.hit(channel_key)
