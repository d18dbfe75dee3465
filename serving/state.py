"""The serving app's shared state: `ServerState` (settings, metrics, the engine, lifecycle phase, in-flight work).

The routers (`serving.api`) and the app (`serving.app`) both read it; it imports neither, so the layers run one
way: app -> api -> state -> engine interface.

Lifecycle (`ServerState.phase`): the app starts listening at once, `loading` the model in a background
thread and then warming it up (`engine.start()`); `ready` serves; `draining` (after SIGTERM, see
`serving.__main__`) refuses new work and lets in-flight requests finish up to the grace period, then aborts
them; `stopped` after the engine shut down; `failed` when the model could not be loaded; `engine dead` when the
engine died while serving (readiness fails, and `serving.__main__` exits non-zero once open streams got their error).
"""
from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Union

from serving.api_keys import KeyRing
from serving.engine.interface import Engine, EngineStats, ModelLoadError
from serving.errors import APIError
from serving.gpu_monitor import GpuUtilizationCollector
from serving.metrics import ServerMetrics
from serving.settings import BODY_BYTES_BEFORE_LOAD, Settings, default_max_body_bytes

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # typing's own from Python 3.13

logger = logging.getLogger("serving")

EngineSource = Union[Engine, Callable[[], Engine]]

# After the drain deadline aborts what is left, aborted streams need a moment to send their last event.
_ABORT_SETTLE_SECONDS = 5.0
# Tokenizing and chat templating run on these threads, never on the event loop (a 1 MiB prompt takes about a second
# to tokenize); the Rust tokenizer releases the GIL meanwhile. Two bound the CPU that prompts can take from streaming.
_TOKENIZER_THREADS = 2
# Where the request middleware leaves the name of the API key a request authenticated with (`scope["state"]`).
API_KEY_NAME = "api_key_name"


class Phase(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"
    ENGINE_DEAD = "engine dead"


@dataclass
class InflightGeneration:
    """An engine request being streamed; the drain deadline aborts it and marks it `cut`."""

    engine_request_id: str
    cut: bool = False


class ServerState:
    """What the routers share: settings, metrics, the engine once started, phase and in-flight work."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.phase = Phase.LOADING
        self.engine: Engine | None = None
        self.started_at = int(time.time())
        self.gpu_collector = GpuUtilizationCollector()
        self.metrics = ServerMetrics(settings.model_name, self.engine_stats, self.gpu_collector)
        self.inflight: dict[str, InflightGeneration] = {}
        self.keys = KeyRing(settings.api_keys_file, settings.api_key)
        self.max_body_bytes = settings.max_body_bytes or BODY_BYTES_BEFORE_LOAD
        """The request body limit in force: MAX_BODY_BYTES, else derived from the context window once it is known."""
        self.tokenizer_pool = ThreadPoolExecutor(_TOKENIZER_THREADS, thread_name_prefix="tokenize")
        self.prompts: Any = None
        """What the API layer keeps per engine to prepare prompts (`serving.api.prompts`), made on first use."""
        self._active_requests = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def started(self) -> bool:
        """Loaded and warmed up (it stays so while draining)."""
        return self.phase in (Phase.READY, Phase.DRAINING)

    @property
    def ready(self) -> bool:
        """Serving: started, not draining, and the engine alive."""
        return self.phase is Phase.READY and not self.engine_died()

    @property
    def failed(self) -> bool:
        return self.phase is Phase.FAILED

    # ---- engine access ---------------------------------------------------------------------------------------

    def engine_stats(self) -> EngineStats | None:
        """Stats of a started engine, else None (metrics then read zero)."""
        if self.engine is None or self.phase in (Phase.LOADING, Phase.FAILED):
            return None
        return self.engine.stats()

    def require_engine(self) -> Engine:
        """The engine, or a 503 that says why there is none to use."""
        if self.ready and self.engine is not None:
            return self.engine
        reason = {
            Phase.LOADING: "the model is still loading; retry shortly",
            Phase.DRAINING: "the server is shutting down; retry on another replica",
            Phase.STOPPED: "the server is shutting down; retry on another replica",
            Phase.FAILED: "the model failed to load; see the server log",
            Phase.ENGINE_DEAD: "the engine died and the server is restarting; retry on another replica",
        }[self.phase]
        code = "engine_dead" if self.phase is Phase.ENGINE_DEAD else "not_ready"
        raise APIError(503, f"Service unavailable: {reason}", code=code, headers={"Retry-After": "1"})

    def engine_died(self) -> bool:
        """True once the engine died after it started (its loop thread, or its process); the first call that sees it
        moves the phase to `engine dead`: readiness fails and `serving.__main__` exits non-zero."""
        if self.phase is Phase.ENGINE_DEAD:
            return True
        if self.phase not in (Phase.READY, Phase.DRAINING) or self.engine is None or self.engine.stats().loop_alive:
            return False
        self.phase = Phase.ENGINE_DEAD
        logger.error("the engine died; the server exits once open requests got their error",
                     extra={"event": "engine_dead", "active_requests": self._active_requests})
        return True

    # ---- lifecycle -------------------------------------------------------------------------------------------

    async def load(self, source: EngineSource) -> None:
        """Build the engine (slow: in a thread, so health probes answer meanwhile), then warm it up."""
        try:
            engine = await _run_in_daemon_thread(source) if _is_factory(source) else source
            self.engine = engine
            await engine.start()
        except ModelLoadError as exc:
            self.phase = Phase.FAILED
            logger.error(str(exc), extra={"event": "model_load_failed", "model_path": str(self.settings.model_path)})
            return
        except Exception:
            self.phase = Phase.FAILED
            logger.exception("engine failed to start", extra={"event": "model_load_failed"})
            return
        if self.phase is Phase.LOADING:
            if self.settings.max_body_bytes is None:
                self.max_body_bytes = default_max_body_bytes(engine.model_info.max_model_len)
            self.phase = Phase.READY
            info = engine.model_info
            logger.info("ready to serve", extra={"event": "ready", "model": self.settings.model_name,
                                                 "max_model_len": info.max_model_len, "device": info.device,
                                                 "dtype": info.dtype, "max_body_bytes": self.max_body_bytes})

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new work, let in-flight requests finish for up to `grace_seconds`, then abort the rest."""
        if self.phase in (Phase.LOADING, Phase.READY):
            self.phase = Phase.DRAINING
        logger.info("draining", extra={"event": "drain_started", "active_requests": self._active_requests,
                                       "grace_seconds": grace_seconds})
        if await self._wait_idle(grace_seconds):
            logger.info("drained: no requests in flight", extra={"event": "drained"})
            return
        cut = list(self.inflight.values())
        logger.warning("drain deadline reached: aborting in-flight generations",
                       extra={"event": "drain_deadline", "aborted": len(cut), "active_requests": self._active_requests})
        for generation in cut:
            generation.cut = True
            if self.engine is not None:
                self.engine.abort(generation.engine_request_id)
        if not await self._wait_idle(_ABORT_SETTLE_SECONDS):
            logger.warning("requests still open after abort; the server closes them",
                           extra={"active_requests": self._active_requests})

    async def close(self) -> None:
        """Shut the engine down (aborting anything left) once the HTTP server stopped serving."""
        if self.phase not in (Phase.FAILED, Phase.ENGINE_DEAD):
            self.phase = Phase.STOPPED
        if self.engine is not None:
            await self.engine.shutdown()
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self.gpu_collector.close()
        logger.info("engine shut down", extra={"event": "stopped"})

    # ---- in-flight generations (the drain deadline aborts them) ------------------------------------------------

    def track(self, engine_request_id: str) -> InflightGeneration:
        generation = InflightGeneration(engine_request_id)
        self.inflight[engine_request_id] = generation
        return generation

    def untrack(self, engine_request_id: str) -> None:
        self.inflight.pop(engine_request_id, None)

    # ---- request accounting (middleware) ---------------------------------------------------------------------

    def request_started(self) -> None:
        self._active_requests += 1
        self._idle.clear()
        self.metrics.active.inc()

    def request_finished(self) -> None:
        self._active_requests -= 1
        self.metrics.active.dec()
        if self._active_requests == 0:
            self._idle.set()

    async def _wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


def _is_factory(source: EngineSource) -> TypeIs[Callable[[], Engine]]:
    """Whether `source` is a factory to call rather than an engine (which may be callable too, but generates)."""
    return callable(source) and not hasattr(source, "generate")


async def _run_in_daemon_thread(function: Callable[[], Engine]) -> Engine:
    """Like asyncio.to_thread, but a daemon thread: a SIGTERM during a minutes-long load must not wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Engine] = loop.create_future()

    def settle(outcome: Engine | BaseException) -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def work() -> None:
        try:
            result = function()
        except BaseException as exc:  # noqa: BLE001 - whatever the thread's outcome, the future in the loop gets it
            loop.call_soon_threadsafe(settle, exc)
        else:
            loop.call_soon_threadsafe(settle, result)

    threading.Thread(target=work, name="model-loader", daemon=True).start()
    return await future
