"""JSON-lines logging on stdout, with the current request's id on every line logged while serving it.

One object per line: `ts`, `level`, `logger`, `message`, `request_id` (when known), any `extra={...}` fields,
and `exc_info` as text for tracebacks. uvicorn's own loggers are routed here too, so the process writes
nothing but JSON lines (log collectors parse them without a multiline rule).
"""
from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import datetime, timezone

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is written as a field.
# uvicorn's `color_message` is its message with terminal colours: noise in a JSON line.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str = "info") -> None:
    """Send every logger (ours and uvicorn's) to one JSON handler on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings (deprecations from libraries) become JSON lines too
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # Our middleware writes one access line per API request, with the request id; uvicorn's would duplicate it.
    logging.getLogger("uvicorn.access").disabled = True


def route_transformers_logging() -> None:
    """Send transformers' logs through our JSON handler and turn its progress bars off (call once it is imported).

    transformers installs its own stderr handler and draws tqdm bars while loading weights; neither is a JSON line.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()
