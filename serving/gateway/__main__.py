"""`python -m serving.gateway --route MODEL=URL ...` or `--routes-file F`: run the gateway (see `config` for every
option).

Exit codes: 0 after a clean shutdown, 2 for bad settings, routes or keys file. The first SIGTERM or SIGINT drains:
`/health/ready` answers 503 so the Service stops sending here, requests in flight (streams, requests held for a
cold start) get up to DRAIN_SECONDS, then the process exits; a second signal exits at once. As for the server
(`serving.__main__`), uvicorn's own handling would close the listening socket first and exit by the signal.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn

from serving.api_keys import KeyFileError, KeyRing
from serving.gateway.app import Gateway
from serving.gateway.config import ConfigError, GatewayConfig, load_config
from serving.logs import configure_logging

logger = logging.getLogger("serving.gateway")

# After the drain, uvicorn only has to close connections; what is still open then is cut.
_UVICORN_GRACEFUL_SECONDS = 3


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the gateway before uvicorn's shutdown begins."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway, drain_seconds: float) -> None:
        super().__init__(config)
        self._gateway = gateway
        self._drain_seconds = drain_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Future | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the loop's thread: schedule the drain rather than run it here. Leaving the
        # signal out of `_captured_signals` keeps uvicorn from re-raising it after shutdown (exit code 0).
        if self._drain is not None or self._loop is None:
            logger.warning("second signal: exiting without waiting", extra={"signal": signal.Signals(sig).name})
            self.should_exit = True
            self.force_exit = True
            return
        logger.info("signal received: draining", extra={"signal": signal.Signals(sig).name})
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._gateway.drain(self._drain_seconds)
        finally:
            self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
        keys = KeyRing(config.api_keys_file, config.api_key)
    except (ConfigError, KeyFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve(config, keys)


def serve(config: GatewayConfig, keys: KeyRing) -> int:
    configure_logging(config.log_level)
    gateway = Gateway(config, keys)
    server_config = uvicorn.Config(gateway, host=config.host, port=config.port, log_config=None, access_log=False,
                                   timeout_graceful_shutdown=_UVICORN_GRACEFUL_SECONDS, lifespan="on")
    logger.info("starting", extra={"event": "starting", "host": config.host, "port": config.port,
                                   "models": [route.model for route in config.routes], "auth": keys.enabled})
    DrainingServer(server_config, gateway, config.drain_seconds).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
