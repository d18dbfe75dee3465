"""Run the real server (`python -m serving`) in a subprocess for the HTTP tests, and read what it says.

Each `ServerProcess` binds 127.0.0.1 on a free port, writes its JSON log lines to a file, and is stopped
with SIGTERM (as Kubernetes does), then killed if it does not exit.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny"
STARTUP_TIMEOUT_S = 90.0


def _parents() -> dict[int, int]:
    """Each live (not zombie) process's parent pid, from one pass over /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    return parents


def children(pid: int) -> list[int]:
    """Live child processes of `pid`."""
    return [child for child, parent in _parents().items() if parent == pid]


def descendants(pid: int) -> list[int]:
    """Live child processes of `pid`, their children, and so on."""
    by_parent: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        by_parent.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        below = by_parent.get(todo.pop(), [])
        found += below
        todo += below
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, ended but not yet reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def command_line(pid: int) -> str:
    """The process's command line, arguments joined by spaces ("" once it has ended)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ChildProcess:
    """A `python -m ...` child on 127.0.0.1, its stdout and stderr (JSON log lines) in a file; stopped with SIGTERM
    (as Kubernetes does), then killed if it does not exit."""

    name = "process"
    startup_timeout = STARTUP_TIMEOUT_S

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str], port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log,
                                            stderr=subprocess.STDOUT)

    def wait_listening(self, timeout: float | None = None) -> None:
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not listen within {timeout}s:\n{self.log_text()}")

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


class ServerProcess(ChildProcess):
    name = "server"

    def __init__(self, model_dir: Path, log_path: Path, *, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), port: int | None = None) -> None:
        port = port or free_port()
        command = [sys.executable, "-m", "serving", "--model-path", str(model_dir), "--model-name", MODEL_NAME,
                   "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32", *args]
        super().__init__(command, log_path, {**os.environ, **(env or {})}, port)

    def wait_started(self, timeout: float = STARTUP_TIMEOUT_S) -> list[int]:
        """Poll /health/startup until 200; return every status seen on the way."""
        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        seen: list[int] = []
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_text()}")
            status = httpx.get(f"{self.url}/health/startup", timeout=5).status_code
            seen.append(status)
            if status == 200:
                return seen
            time.sleep(0.05)
        raise TimeoutError(f"server did not start within {timeout}s:\n{self.log_text()}")


class ThreadServers:
    """Servers run in the test's own process, each on a thread of its own (for an engine the test builds, with no
    model to load): `start` returns once /health/startup answers 200, `stop` ends every one started."""

    def __init__(self) -> None:
        self._running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(self, config: uvicorn.Config, timeout: float = 30.0) -> str:
        server = uvicorn.Server(config)
        thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
        thread.start()
        self._running.append((server, thread))
        url = f"http://127.0.0.1:{config.port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{url}/health/startup").status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "in-thread server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        for server, thread in self._running:
            server.should_exit = True
            thread.join(10)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and index every sample by (name, sorted labels)."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    response.raise_for_status()
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent-events response, JSON-decoded, with "[DONE]" kept as a string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
