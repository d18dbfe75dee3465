"""The gateway's settings and routes: one frozen `GatewayConfig`, read once from flags, environment and routes file.

As for the server (`serving.settings`), a flag wins over its environment variable, which wins over the default,
and every value is checked before the process listens: a bad one is one line naming the flag, variable or routes
file key, the value and what is allowed (`ConfigError`; `python -m serving.gateway` prints it and exits 2).

A model's route is either static (`--route MODEL=URL[,URL...]`, for local runs and tests: the gateway probes each
URL's `/health/ready` and sends only to those that answer 200) or a headless Service in the routes file, whose DNS
records are the model's ready pods (`service`, `port`). The routes file is JSON, rendered by the platform:

    {"models": [{"model": "llama-3.1-8b", "service": "llm-service-endpoints.ai-production.svc.cluster.local",
                 "port": 8000, "coldStartTimeoutSeconds": 900, "maxQueue": 256, "maxInflightPerPod": 320}]}
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeGuard
from urllib.parse import urlsplit

from serving.options import (
    LOG_LEVELS,
    Option,
    choice,
    non_negative_float,
    option_parser,
    port,
    positive_float,
    positive_int,
    read_options,
)

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8000
DEFAULT_COLD_START_TIMEOUT_SECONDS = 600.0
DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_INFLIGHT_PER_POD = 256
# The leading block hashed for prefix affinity: 256 characters is a system prompt's opening (about 64 tokens,
# several KV-cache blocks), long enough to tell prompts apart and short enough to be shared by a whole family.
DEFAULT_PREFIX_CHARS = 256
# CHWBL's bound: a pod takes a hashed request while its load stays within 1.25x the average (KubeAI's default).
DEFAULT_LOAD_FACTOR = 1.25
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_DRAIN_SECONDS = 30.0
DEFAULT_DISCOVERY_SECONDS = 1.0
DEFAULT_MAX_CONNECTIONS = 4096
"""Above the model server's 1024: every client stream of every model holds a connection here."""
DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0
DEFAULT_BODY_TIMEOUT_SECONDS = 30.0


class ConfigError(ValueError):
    """A flag, environment variable or routes file holds a value the gateway cannot run with."""


@dataclass(frozen=True)
class Route:
    """Where one model's requests go, and how many the gateway lets wait or run per pod."""

    model: str
    """The name clients send as `model`."""
    urls: tuple[str, ...] = ()
    """Static upstreams (`http://host:port`), each probed for readiness; empty when `service` is set."""
    service: str | None = None
    """A headless Service's DNS name: its A/AAAA records are the model's ready pods."""
    port: int = DEFAULT_PORT
    """The pods' port (with `service`)."""
    cold_start_timeout_seconds: float = DEFAULT_COLD_START_TIMEOUT_SECONDS
    """How long a request waits for a first ready pod (or, when every pod is full, for a slot)."""
    max_queue: int = DEFAULT_MAX_QUEUE
    """Requests that may wait at once (held for a cold start or queued); past it, 429."""
    max_inflight_per_pod: int = DEFAULT_MAX_INFLIGHT_PER_POD
    """Requests the gateway sends one pod at once; past it, requests wait in the queue."""


@dataclass(frozen=True)
class GatewayConfig:
    routes: tuple[Route, ...]
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys_file: Path | None = None
    """The keys file (`serving.api_keys`); with neither it nor `api_key` the API is open."""
    api_key: str | None = None
    """One more key, from the environment only (`API_KEY`, e.g. from a Kubernetes Secret); named `env`."""
    prefix_chars: int = DEFAULT_PREFIX_CHARS
    load_factor: float = DEFAULT_LOAD_FACTOR
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    discovery_seconds: float = DEFAULT_DISCOVERY_SECONDS
    """How often pod addresses are re-resolved (and static upstreams probed)."""
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    """Open client connections; more are closed as they arrive (`serving.connections`)."""
    header_timeout_seconds: float = DEFAULT_HEADER_TIMEOUT_SECONDS
    """A request's headers must arrive within this long (408 and close)."""
    body_timeout_seconds: float = DEFAULT_BODY_TIMEOUT_SECONDS
    """A request's whole body must arrive within this long after its headers (408 and close)."""
    log_level: str = "info"

    def __repr__(self) -> str:  # the environment key must not reach a log line through a repr
        return f"GatewayConfig(models={[route.model for route in self.routes]}, port={self.port})"


def _load_factor(text: str) -> float:
    value = non_negative_float(text)
    if value < 1:
        raise ValueError("must be at least 1 (1.25 lets a pod take 25% more than the average load)")
    return value


_OPTIONS = tuple(Option(*option) for option in (
    ("host", "--host", "HOST", str, f"bind address (default {DEFAULT_HOST})"),
    ("port", "--port", "PORT", port, f"listen port (default {DEFAULT_PORT})"),
    ("routes_file", "--routes-file", "ROUTES_FILE", str, "JSON routes file: each model's headless Service"),
    ("api_keys_file", "--api-keys-file", "API_KEYS_FILE", str,
     "API keys, one per line: KEY or NAME:KEY [rpm=N] [tpm=N] (# comments)"),
    ("cold_start_timeout_seconds", "--cold-start-timeout-seconds", "COLD_START_TIMEOUT_SECONDS",
     non_negative_float,
     f"for --route models: how long a request waits for a ready pod (default {DEFAULT_COLD_START_TIMEOUT_SECONDS:g})"),
    ("max_queue", "--max-queue", "MAX_QUEUE", positive_int,
     f"for --route models: requests waiting per model before 429 (default {DEFAULT_MAX_QUEUE})"),
    ("max_inflight_per_pod", "--max-inflight-per-pod", "MAX_INFLIGHT_PER_POD", positive_int,
     f"for --route models: requests sent to one pod at once (default {DEFAULT_MAX_INFLIGHT_PER_POD})"),
    ("prefix_chars", "--prefix-chars", "PREFIX_CHARS", positive_int,
     f"leading prompt characters hashed for prefix affinity (default {DEFAULT_PREFIX_CHARS})"),
    ("load_factor", "--load-factor", "LOAD_FACTOR", _load_factor,
     f"a hashed pod keeps requests while its load is within this times the average (default {DEFAULT_LOAD_FACTOR})"),
    ("max_body_bytes", "--max-body-bytes", "MAX_BODY_BYTES", positive_int,
     f"largest request body (default {DEFAULT_MAX_BODY_BYTES})"),
    ("drain_seconds", "--drain-seconds", "DRAIN_SECONDS", non_negative_float,
     f"after SIGTERM, how long in-flight requests may run (default {DEFAULT_DRAIN_SECONDS:g})"),
    ("discovery_seconds", "--discovery-seconds", "DISCOVERY_SECONDS", positive_float,
     f"how often pod addresses are re-resolved (default {DEFAULT_DISCOVERY_SECONDS:g})"),
    ("max_connections", "--max-connections", "MAX_CONNECTIONS", positive_int,
     f"open client connections; more are closed as they arrive (default {DEFAULT_MAX_CONNECTIONS})"),
    ("header_timeout_seconds", "--header-timeout-seconds", "HEADER_TIMEOUT_SECONDS", positive_float,
     f"time for a request's headers to arrive, else 408 (default {DEFAULT_HEADER_TIMEOUT_SECONDS:g})"),
    ("body_timeout_seconds", "--body-timeout-seconds", "BODY_TIMEOUT_SECONDS", positive_float,
     f"time for a request's body to arrive after its headers, else 408 (default {DEFAULT_BODY_TIMEOUT_SECONDS:g})"),
    ("log_level", "--log-level", "LOG_LEVEL", choice(*LOG_LEVELS), "log level (default info)"),
))


def build_parser() -> argparse.ArgumentParser:
    parser = option_parser(
        "python -m serving.gateway",
        "Model-aware OpenAI gateway. Every flag can also be set by the environment variable shown.",
        "API_KEY (environment only, e.g. from a Kubernetes Secret) adds one key, named env, to those of "
        "API_KEYS_FILE; with no key configured the API is open.", _OPTIONS, ConfigError)
    parser.add_argument("--route", dest="route", action="append", default=None, metavar="MODEL=URL[,URL...]",
                        help="a model and its static upstreams; repeat per model [env ROUTES, routes separated "
                             "by ';']")
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Build the config from flags (`argv`, without the program name), environment and routes file."""
    environ = os.environ if environ is None else environ
    flags = vars(build_parser().parse_args(list(argv) if argv is not None else None))
    values = read_options(flags, _OPTIONS, environ, ConfigError)

    defaults: dict[str, object] = {name: values.pop(name) for name in ("cold_start_timeout_seconds", "max_queue",
                                                    "max_inflight_per_pod") if name in values}
    if flags["route"]:
        specs, source = list(flags["route"]), "--route"
    else:
        specs, source = [spec for spec in environ.get("ROUTES", "").split(";") if spec.strip()], "ROUTES"
    routes = [parse_route(spec, source, defaults) for spec in specs]
    routes_file = values.pop("routes_file", None)
    if routes_file is not None:
        routes += read_routes_file(Path(str(routes_file)))
    if not routes:
        raise ConfigError("no models to route: pass --route MODEL=URL[,URL...], set ROUTES, or give --routes-file")
    seen: set[str] = set()
    for route in routes:
        if route.model in seen:
            raise ConfigError(f"model {route.model!r} is routed twice; give each model one route")
        seen.add(route.model)

    keys_file = values.pop("api_keys_file", None)
    return GatewayConfig(routes=tuple(routes), api_keys_file=Path(str(keys_file)) if keys_file else None,
                         api_key=environ.get("API_KEY", "").strip() or None, **values)


def parse_route(spec: str, source: str, defaults: Mapping[str, Any]) -> Route:
    """`MODEL=URL[,URL...]`, each URL `http(s)://host:port` with no path; `defaults` are parsed `Route` fields
    (`read_options`), each of its field's type."""
    model, sep, urls_text = spec.strip().partition("=")
    model = model.strip()
    if not sep or not model:
        raise ConfigError(f"{source} {spec!r}: write MODEL=URL[,URL...], e.g. llama=http://127.0.0.1:8001")
    urls = [url.strip() for url in urls_text.split(",") if url.strip()]
    if not urls:
        raise ConfigError(f"{source} {spec!r}: model {model!r} has no URL; write MODEL=URL[,URL...]")
    checked = []
    for url in urls:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None or parts.path not in ("",
                                                                                                          "/"):
            raise ConfigError(f"{source} {spec!r}: {url!r} is not an upstream URL; write http://HOST:PORT "
                              "(no path)")
        checked.append(f"{parts.scheme}://{parts.netloc}")
    return Route(model=model, urls=tuple(dict.fromkeys(checked)), **defaults)


# routes file key -> (Route attribute, check, what is allowed)
_FILE_FIELDS: dict[str, tuple[str, Callable[[object], bool], str]] = {
    "model": ("model", lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "service": ("service", lambda v: isinstance(v, str) and bool(v.strip()) and "/" not in v and ":" not in v,
                "a DNS name (no scheme, port or path)"),
    "port": ("port", lambda v: _is_int(v) and 1 <= v <= 65535, "a whole number from 1 to 65535"),
    "coldStartTimeoutSeconds": ("cold_start_timeout_seconds",
                                lambda v: _is_number(v) and 0 <= v < math.inf, "a number >= 0"),
    "maxQueue": ("max_queue", lambda v: _is_int(v) and v >= 1, "a whole number >= 1"),
    "maxInflightPerPod": ("max_inflight_per_pod", lambda v: _is_int(v) and v >= 1, "a whole number >= 1"),
}


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_routes_file(path: Path) -> list[Route]:
    """The routes of a routes file; ConfigError naming the file, the key path and the value for anything wrong."""
    where = f"ROUTES_FILE {str(path)!r}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"models"} or not isinstance(data["models"], list):
        raise ConfigError(f"{where}: expected {{\"models\": [...]}} and nothing else; got "
                          f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    routes = []
    for index, entry in enumerate(data["models"]):
        key_path = f"{where}: models[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{key_path} must be an object, not {type(entry).__name__}")
        unknown = sorted(set(entry) - set(_FILE_FIELDS))
        if unknown:
            raise ConfigError(f"{key_path}: unknown key {unknown[0]!r}; allowed: {', '.join(_FILE_FIELDS)}")
        for required in ("model", "service"):
            if required not in entry:
                raise ConfigError(f"{key_path}: {required!r} is required")
        fields: dict[str, Any] = {}  # Route's fields, each value passed its key's check
        for key, value in entry.items():
            attribute, check, allowed = _FILE_FIELDS[key]
            if not check(value):
                raise ConfigError(f"{key_path}.{key}: {value!r} is not allowed; it must be {allowed}")
            fields[attribute] = value.strip() if isinstance(value, str) else value
        if "cold_start_timeout_seconds" in fields:
            fields["cold_start_timeout_seconds"] = float(fields["cold_start_timeout_seconds"])
        routes.append(Route(**fields))
    return routes
