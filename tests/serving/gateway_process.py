"""Run the real gateway (`python -m serving.gateway`) in a subprocess for the HTTP tests, as `server.ServerProcess`
runs the model server: 127.0.0.1 on a free port, JSON log lines to a file, stopped with SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.serving.server import REPO_ROOT, free_port

STARTUP_TIMEOUT_S = 60.0


class GatewayProcess:
    def __init__(self, log_path: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "serving.gateway", "--host", "127.0.0.1", "--port", str(self.port),
                   "--discovery-seconds", "0.2", *args]
        # The tests' own environment must not configure the gateway behind their back.
        base = {name: value for name, value in os.environ.items()
                if name not in ("API_KEY", "API_KEYS_FILE", "ROUTES", "ROUTES_FILE", "PORT")}
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env={**base, "PYTHONUNBUFFERED": "1",
                                                                         **(env or {})},
                                            stdout=log, stderr=subprocess.STDOUT)
        self.wait_listening()

    def wait_listening(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"gateway did not listen within {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict]:
        """Every log line, parsed; a line that is not JSON fails the test (the contract is JSON lines only)."""
        return [json.loads(line) for line in self.log_text().splitlines() if line.strip()]

    def terminate(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll `condition()` until it returns something true; fail (not time) the test if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} never happened")
