"""OpenAI-shaped errors: every failure leaves the server as `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `APIError` (or one of the helpers below) with a message that tells the client what to change;
`install_error_handlers` turns it, and Starlette's own 404/405, into that JSON shape. Unexpected exceptions are
answered by the request middleware (`serving.app`), which logs the traceback and returns a generic 500.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"; shows up in llm_requests_total

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(self, status_code: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status_code, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status_code: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status_code, message, param, code), status_code=status_code, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(exc: ValidationError) -> APIError:
    """A pydantic error as a 400 that names the field: `max_tokens: Input should be a valid integer`."""
    problems = []
    for error in exc.errors(include_url=False):
        # Union members and model validators add location parts a client never wrote; keep the field path.
        location = ".".join(str(part) for part in error["loc"] if not _is_internal_loc(part))
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{location}: {message}" if location else message)
    first = exc.errors(include_url=False)[0]["loc"] if exc.error_count() else ()
    param = next((str(part) for part in first if not _is_internal_loc(part)), None)
    return bad_request("Invalid request: " + "; ".join(problems), param=param)


def _is_internal_loc(part: object) -> bool:
    return isinstance(part, str) and (part.startswith(("function-", "list[", "union[")) or part in ("str", "int"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "Request failed"
        if exc.status_code == 404:
            message = "Unknown path; this server serves /v1/models, /v1/completions and /v1/chat/completions"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))
