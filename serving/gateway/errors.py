"""The gateway's own errors, in the OpenAI shape the server uses (`serving.errors.error_body`).

An error a pod answers (its 400, 404, 429, ...) passes through untouched; these are the ones the gateway decides:
401 and 429 for keys and limits, 400/404/413 for a body it cannot route, 429 and 503 for a full queue or a model
still starting, 502 when a pod failed a request twice before its first byte.
"""
from __future__ import annotations

import json

from serving.errors import error_body

# serving.errors types the statuses the server answers; the gateway also answers 502.
_TYPES = {502: "server_error", 503: "service_unavailable_error"}


class GatewayError(Exception):
    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return json.dumps(error_json(self.status, self.message, self.code, self.param)).encode()


def error_json(status: int, message: str, code: str, param: str | None = None) -> dict:
    body = error_body(status, message, param, code)
    if status in _TYPES:
        body["error"]["type"] = _TYPES[status]
    return body
