"""Run the real gateway (`python -m serving.gateway`) in a subprocess for the HTTP tests, as `server.ServerProcess`
runs the model server (both are `server.ChildProcess`es): 127.0.0.1 on a free port, JSON log lines to a file,
stopped with SIGTERM."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tests.serving.server import ChildProcess, free_port

STARTUP_TIMEOUT_S = 60.0


class GatewayProcess(ChildProcess):
    name = "gateway"
    startup_timeout = STARTUP_TIMEOUT_S

    def __init__(self, log_path: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        port = free_port()
        command = [sys.executable, "-m", "serving.gateway", "--host", "127.0.0.1", "--port", str(port),
                   "--discovery-seconds", "0.2", *args]
        # The tests' own environment must not configure the gateway behind their back.
        base = {name: value for name, value in os.environ.items()
                if name not in ("API_KEY", "API_KEYS_FILE", "ROUTES", "ROUTES_FILE", "PORT")}
        super().__init__(command, log_path, {**base, **(env or {})}, port)
        self.wait_listening()


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll `condition()` until it returns something true; fail (not time) the test if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} never happened")
