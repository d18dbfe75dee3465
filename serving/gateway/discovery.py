"""Which pods of each model are ready, refreshed about every second and on demand after a pod fails a request.

- A routes-file model names a headless Service (clusterIP None, only ready pods published): its DNS A/AAAA
  records are the ready pods, resolved with the event loop's `getaddrinfo`. No records (the name does not resolve)
  means no pod is ready: the model is at zero or starting. No Kubernetes API access is needed.
- A `--route` model lists static upstreams: each is probed with `GET /health/ready`, and only those answering 200
  are ready, so a server that is down or still loading its model is treated as a pod not yet ready. A probe that
  times out keeps the upstream as it was (a busy server answers its probe late, it is not gone).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

import httpx

from serving.gateway.pool import ModelPool

logger = logging.getLogger("serving.gateway.discovery")

PROBE_TIMEOUT_SECONDS = 2.0
# The answers that mean "no such name, or no address for it", as opposed to a resolver that failed to answer.
_NO_SUCH_NAME = {code for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None),
                                   getattr(socket, "EAI_ADDRFAMILY", None)) if code is not None}


class Discovery:
    """Keeps one pool's ready set current: a loop every `interval` seconds, and `refresh()` on demand."""

    def __init__(self, pool: ModelPool, client: httpx.AsyncClient, interval: float) -> None:
        self.pool = pool
        self._client = client
        self._interval = interval
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        pool.refresh = self.refresh

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"discovery-{self.pool.model}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def refresh(self) -> None:
        """Look again now; a refresh already running is waited for instead of doubled."""
        if self._lock.locked():
            async with self._lock:
                return
        async with self._lock:
            before = set(self.pool.ready_urls)
            try:
                urls = await self._ready_urls()
            except Exception as exc:  # noqa: BLE001 - discovery outlives any one failure; the next pass tries again
                logger.warning("pod discovery failed; the pods known stay in use",
                               extra={"event": "discovery_failed", "model": self.pool.model, "error": repr(exc)})
                return
            self.pool.set_ready(urls)
            if set(urls) != before:
                logger.info("ready pods changed", extra={"event": "pods_changed", "model": self.pool.model,
                                                         "pods": len(urls), "addresses": sorted(urls)})

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval)

    async def _ready_urls(self) -> list[str]:
        route = self.pool.route
        if route.service is not None:
            return await resolve(route.service, route.port)
        current = set(self.pool.ready_urls)
        answers = await asyncio.gather(*(self._probe(url) for url in route.urls))
        return [url for url, ready in zip(route.urls, answers) if ready or (ready is None and url in current)]

    async def _probe(self, url: str) -> bool | None:
        """True when the upstream answers /health/ready with 200, False when it refuses or says not ready, None
        when it did not answer in time."""
        try:
            response = await self._client.get(f"{url}/health/ready", timeout=PROBE_TIMEOUT_SECONDS)
        except httpx.TimeoutException:
            return None
        except httpx.HTTPError:
            return False
        return response.status_code == 200


async def resolve(service: str, port: int) -> list[str]:
    """The URLs of a headless Service's addresses (sorted, IPv6 in brackets); empty when it has none."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(service, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NO_SUCH_NAME:
            return []  # a headless Service with no ready pod publishes no record
        raise  # the resolver failed (timeout, server error): keep the pods known until the next pass
    urls = set()
    for _, _, _, _, sockaddr in infos:
        # An IPv4 or IPv6 sockaddr: its host is text (typeshed's int is for families a host name never resolves to).
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        host = f"[{address}]" if address.version == 6 else str(address)
        urls.add(f"http://{host}:{port}")
    return sorted(urls)
