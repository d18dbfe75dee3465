"""`python -m serving.gateway --route MODEL=URL ...` or `--routes-file F`: run the gateway (see `config` for every
option).

Exit codes: 0 after a clean shutdown, 2 for bad settings, routes or keys file. The first SIGTERM or SIGINT drains:
`/health/ready` answers 503 so the Service stops sending here, requests in flight (streams, requests held for a
cold start) get up to DRAIN_SECONDS, then the process exits; a second signal exits at once. As for the server
(`serving.draining`), uvicorn's own handling would close the listening socket first and exit by the signal.
"""
from __future__ import annotations

import logging
import sys

import uvicorn

from serving.api_keys import KeyFileError, KeyRing
from serving.connections import guarded_protocol
from serving.draining import DrainingServer
from serving.gateway.app import Gateway
from serving.gateway.config import ConfigError, GatewayConfig, load_config
from serving.logs import configure_logging

logger = logging.getLogger("serving.gateway")

# After the drain, uvicorn only has to close connections; what is still open then is cut.
_UVICORN_GRACEFUL_SECONDS = 3


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
                                   timeout_graceful_shutdown=_UVICORN_GRACEFUL_SECONDS, lifespan="on",
                                   http=guarded_protocol(config.max_connections, config.header_timeout_seconds))
    logger.info("starting", extra={"event": "starting", "host": config.host, "port": config.port,
                                   "models": [route.model for route in config.routes], "auth": keys.enabled})
    DrainingServer(server_config, drain=lambda: gateway.drain(config.drain_seconds)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
