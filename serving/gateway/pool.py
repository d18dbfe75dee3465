"""One model's pods as the gateway sees them: which are ready, how many requests each has from this gateway, and
the requests waiting for a slot. No HTTP here; the proxy acquires a pod, sends, and releases it.

A request takes a slot on a pod at once when one is free (the balancer picks which pod). Otherwise it waits, in
arrival order, up to the route's `maxQueue` waiting requests (past it: `QueueFull`, a 429): held while the model
has no ready pod (scaled to zero, or starting), queued while every ready pod has `maxInflightPerPod` requests.
It is woken when a slot frees or pods appear, and gives up after `coldStartTimeoutSeconds` (`NoPodReady`, a 503,
when the model still has no ready pod; `QueueTimeout`, a 429, when it had pods but no free slot).
"""
from __future__ import annotations

import asyncio
import random
from collections import deque
from typing import Awaitable, Callable

from serving.gateway.balancer import HashRing, choose
from serving.gateway.config import Route
from serving.gateway.metrics import GatewayMetrics


class QueueFull(Exception):
    """The model's wait queue is full."""


class QueueTimeout(Exception):
    """Waited the whole timeout with pods ready but none with a free slot."""


class NoPodReady(Exception):
    """Waited the whole timeout and the model never had a ready pod."""


class ShuttingDown(Exception):
    """The gateway's drain period ended while the request was still waiting."""


class Pod:
    """A pod (or static upstream) address and this gateway's requests on it. A pod that leaves the ready set keeps
    its object until its last request is released."""

    __slots__ = ("address", "url", "inflight")

    def __init__(self, url: str) -> None:
        self.url = url
        self.address = url.split("://", 1)[-1]
        self.inflight = 0


class _Waiter:
    __slots__ = ("wake",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.wake = loop.create_future()


class ModelPool:
    def __init__(self, route: Route, metrics: GatewayMetrics, load_factor: float,
                 rng: random.Random | None = None) -> None:
        self.route = route
        self.model = route.model
        self._metrics = metrics
        self._load_factor = load_factor
        self._rng = rng or random.Random()
        self._pods: dict[str, Pod] = {}  # ready pods by URL
        self._ring = HashRing(())
        self._waiters: deque[_Waiter] = deque()
        self._closed = False
        self.refresh: Callable[[], Awaitable[None]] | None = None
        """Set by discovery: re-resolve (or re-probe) now, after a pod failed a request."""

    # ---- the ready set (discovery) ---------------------------------------------------------------------------

    @property
    def ready_urls(self) -> list[str]:
        return list(self._pods)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def set_ready(self, urls: list[str]) -> None:
        """The model's ready pods are now `urls`; wakes waiters when that frees slots."""
        if set(urls) == set(self._pods):
            return
        self._pods = {url: self._pods.get(url) or Pod(url) for url in urls}
        self._ring = HashRing([pod.address for pod in self._pods.values()])
        self._metrics.ready_pods.labels(self.model).set(len(self._pods))
        self._wake()

    def drop(self, url: str) -> None:
        """Take a pod that just failed a request out of the ready set until discovery finds it ready again."""
        if url in self._pods:
            self.set_ready([other for other in self._pods if other != url])

    # ---- slots -----------------------------------------------------------------------------------------------

    async def acquire(self, prefix: bytes | None, avoid: str | None = None) -> Pod:
        """A pod with a slot taken for this request; waits as the module says, or raises."""
        if not self._waiters:
            pod = self._pick(prefix, avoid)
            if pod is not None:
                return self._take(pod)
        if self._closed:
            raise ShuttingDown()
        if len(self._waiters) >= self.route.max_queue:
            raise QueueFull()
        waiter = _Waiter(asyncio.get_running_loop())
        self._waiters.append(waiter)
        self._metrics.pending.labels(self.model).inc()
        try:
            async with asyncio.timeout(self.route.cold_start_timeout_seconds):
                while True:
                    await waiter.wake
                    if self._closed:
                        raise ShuttingDown()
                    pod = self._pick(prefix, avoid)
                    if pod is not None:
                        return self._take(pod)
                    waiter.wake = asyncio.get_running_loop().create_future()
        except TimeoutError:
            raise (QueueTimeout() if self._pods else NoPodReady()) from None
        finally:
            self._waiters.remove(waiter)
            self._metrics.pending.labels(self.model).dec()
            self._wake()  # a wake-up this waiter got and did not use (it gave up, or left) goes to the next

    def close(self) -> None:
        """Send every waiting request away (ShuttingDown), and any that would wait from now on."""
        self._closed = True
        for waiter in self._waiters:
            if not waiter.wake.done():
                waiter.wake.set_result(None)

    def release(self, pod: Pod) -> None:
        pod.inflight -= 1
        self._metrics.inflight.labels(self.model, pod.address).set(pod.inflight)
        self._wake()

    def _take(self, pod: Pod) -> Pod:
        pod.inflight += 1
        self._metrics.inflight.labels(self.model, pod.address).set(pod.inflight)
        return pod

    def _pick(self, prefix: bytes | None, avoid: str | None) -> Pod | None:
        limit = self.route.max_inflight_per_pod
        free = {pod.address: pod for pod in self._pods.values() if pod.inflight < limit}
        if avoid is not None and len(free) > 1:
            free.pop(avoid.split("://", 1)[-1], None)
        loads = {pod.address: pod.inflight for pod in self._pods.values()}
        chosen = choose(self._ring, loads, free.keys(), prefix, self._load_factor, self._rng)
        return None if chosen is None else free[chosen]

    def _wake(self) -> None:
        """Wake as many waiters, in order, as there are free slots (a woken waiter that finds none waits again)."""
        free = sum(max(0, self.route.max_inflight_per_pod - pod.inflight) for pod in self._pods.values())
        for waiter in self._waiters:
            if free <= 0:
                return
            if not waiter.wake.done():
                waiter.wake.set_result(None)
            free -= 1
