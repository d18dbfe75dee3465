"""Per-key rate limits: requests per minute and tokens per minute, as token buckets. Pure: the caller passes the time.

A key's `rpm=N` is a bucket of N requests that refills at N per minute: a burst of N goes through, then one
request every 60/N seconds. `tpm=N` is a bucket of N tokens: a request is let in while the bucket is not empty,
and its prompt plus completion tokens are taken out when its usage is known, so one large request can run the
bucket into debt and the key waits until it refills (the tokens a request will use are unknown when it starts).
A refused request is told how long until it would pass (`Retry-After`). The buckets live in one gateway replica:
with R replicas behind a Service a key gets up to R times its limits (documented in the README).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from serving.api_keys import ApiKey


@dataclass
class TokenBucket:
    capacity: float
    per_second: float
    level: float
    updated: float

    @classmethod
    def per_minute(cls, limit: int, now: float) -> "TokenBucket":
        return cls(capacity=float(limit), per_second=limit / 60.0, level=float(limit), updated=now)

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
        self.updated = max(self.updated, now)

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` is in the bucket (0 when it is now)."""
        self._refill(now)
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self.per_second

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount


class KeyLimiter:
    """The buckets of every limited key, by key name. A key whose limits change (the keys file was reloaded) gets
    fresh buckets; keys without limits have none."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[tuple[int | None, int | None], TokenBucket | None, TokenBucket | None]] = {}

    def _of(self, key: ApiKey, now: float) -> tuple[TokenBucket | None, TokenBucket | None]:
        limits = (key.requests_per_minute, key.tokens_per_minute)
        entry = self._buckets.get(key.name)
        if entry is None or entry[0] != limits:
            entry = (limits,
                     TokenBucket.per_minute(limits[0], now) if limits[0] else None,
                     TokenBucket.per_minute(limits[1], now) if limits[1] else None)
            self._buckets[key.name] = entry
        return entry[1], entry[2]

    def admit(self, key: ApiKey, now: float) -> float | None:
        """None when the request may go (one request is taken from the key's rpm bucket), else the seconds to wait;
        the message for the client says which limit (`which_limit`)."""
        requests, tokens = self._of(key, now)
        wait = 0.0
        if requests is not None:
            wait = requests.wait_for(1, now)
        if tokens is not None:
            # Let a request in while the bucket holds anything: its size is unknown until it has run.
            wait = max(wait, tokens.wait_for(min(1.0, tokens.capacity), now))
        if wait > 0:
            return wait
        if requests is not None:
            requests.take(1, now)
        return None

    def which_limit(self, key: ApiKey, now: float) -> str:
        requests, _ = self._of(key, now)
        if requests is not None and requests.wait_for(1, now) > 0:
            return f"{key.requests_per_minute} requests per minute"
        return f"{key.tokens_per_minute} tokens per minute"

    def spend_tokens(self, key: ApiKey, tokens_used: int, now: float) -> None:
        _, tokens = self._of(key, now)
        if tokens is not None and tokens_used > 0:
            tokens.take(tokens_used, now)


def retry_after(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
