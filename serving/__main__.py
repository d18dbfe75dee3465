"""`python -m serving --model-path DIR`: run the OpenAI-compatible server (see `serving.settings` for every option).

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT drain), 1 when the model could not be loaded, 2 for bad
settings, 3 when the engine died while serving (as soon as it is seen, once the open streams got their error, so
the kubelet restarts the pod rather than the Service sending it traffic it can only refuse). The first SIGTERM or
SIGINT drains (readiness fails, in-flight requests get up to DRAIN_SECONDS, the rest are aborted, the engine shuts
down); a second one exits at once.

Why not uvicorn's own signal handling: `serving.draining`.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable

import uvicorn
from starlette.types import ASGIApp

from serving.app import create_app
from serving.connections import guarded_protocol
from serving.draining import DrainingServer
from serving.engine.config import GIL_SWITCH_INTERVAL_S, EngineConfig
from serving.engine.interface import Engine
from serving.logs import configure_logging, route_transformers_logging
from serving.settings import Settings, SettingsError, load_settings
from serving.state import EngineSource, Phase, ServerState

logger = logging.getLogger("serving")

# After our drain has finished or aborted everything, uvicorn only has to flush and close connections.
_UVICORN_GRACEFUL_SECONDS = 5


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's settings from the server's; SettingsError for a combination the engine refuses."""
    # Each value has its EngineConfig field's type; None leaves the engine's default.
    options: dict[str, Any] = {
        "device": settings.device, "dtype": settings.dtype, "max_num_seqs": settings.max_num_seqs,
        "max_model_len": settings.max_model_len, "max_waiting": settings.max_queue,
        "gpu_memory_utilization": settings.gpu_memory_utilization, "cuda_graphs": settings.cuda_graphs,
        "max_prefill_tokens_per_step": settings.max_prefill_tokens, "attention": settings.attention_backend,
        "overlap": settings.overlap, "block_size": settings.block_size,
        "enable_prefix_caching": settings.enable_prefix_caching}
    try:
        return EngineConfig(**{name: value for name, value in options.items() if value is not None})
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _engine_factory(settings: Settings) -> Callable[[], Engine]:
    """The zero-argument factory the app runs in a thread; imports torch only when called."""
    config = engine_config(settings)

    def build() -> Engine:
        if settings.engine_process:
            from serving.engine.process import EngineClient

            return EngineClient.spawn(settings.model_path, config, settings.log_level)
        from serving.engine.engine import LLMEngine

        route_transformers_logging()
        return LLMEngine.from_model_dir(settings.model_path, config)

    return build


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        factory = _engine_factory(settings)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve(settings, factory)


def serve(settings: Settings, engine: EngineSource) -> int:
    """Run the server on `engine` (an Engine, or a factory run in a thread at startup) until it is stopped."""
    configure_logging(settings.log_level)
    # The event loop shares the GIL with the engine thread, or with the reader of the engine process's pipe.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    app = create_app(settings, engine)
    state: ServerState = app.state.server
    config = uvicorn_config(settings, app)
    logger.info("starting", extra={"event": "starting", "model": settings.model_name,
                                   "model_path": str(settings.model_path), "host": settings.host,
                                   "port": settings.port, "auth": settings.auth_enabled})
    # A model that failed to load (exit 1) or an engine that died (exit 3) ends the process.
    DrainingServer(config, drain=lambda: state.drain(settings.drain_seconds),
                   failed=lambda: state.phase is Phase.FAILED or state.engine_died()).run()
    return {Phase.FAILED: 1, Phase.ENGINE_DEAD: 3}.get(state.phase, 0)


def uvicorn_config(settings: Settings, app: ASGIApp) -> uvicorn.Config:
    """uvicorn's configuration for the app: our logging, and the connection limits of `serving.connections`."""
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                          timeout_graceful_shutdown=_UVICORN_GRACEFUL_SECONDS, lifespan="on",
                          http=guarded_protocol(settings.max_connections, settings.header_timeout_seconds))


if __name__ == "__main__":
    sys.exit(main())
