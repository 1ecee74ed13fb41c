"""One JSON error shape for every failure the service answers: ``{"error": {"code", "message"}}``.

Our own refusals raise :class:`ApiError`; FastAPI's validation errors, Starlette's 404 / 405 and any
unexpected exception are turned into the same shape by :func:`install_error_handlers`, so a client
never has to parse two kinds of error.

Example:
    >>> raise ApiError(404, "not_found", "index 'cats' is not served; GET /indexes lists them")
    # answered as 404 {"error": {"code": "not_found", "message": "index 'cats' is not served; ..."}}
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["ApiError", "error_response", "install_error_handlers", "CODES"]

log = logging.getLogger("vlpretrain.serve")

# The code each HTTP status gets when the refusal did not name one itself.
CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
         413: "payload_too_large", 415: "unsupported_media_type", 500: "internal_error", 503: "unavailable"}


class ApiError(Exception):
    """A refusal with an HTTP status, a short machine-readable code and a one-line message.

    Example:
        >>> raise ApiError(400, "k_too_large", "k=500 is over the limit of 100 (the server's --max-k)")
    """

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = int(status), code, message


def error_response(status: int, code: str, message: str, headers: Any = None) -> JSONResponse:
    """The JSON response of one error.

    Example:
        >>> error_response(413, "payload_too_large", "the request body is over 10 MB").status_code
        413
    """
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    """pydantic's error list as one line: ``k: Input should be a valid integer; text: ...``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Answer :class:`ApiError`, validation errors (as 400), HTTP errors and crashes in the one shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, CODES.get(exc.status_code, "http_error"), message,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server's log, not to the client.
        log.exception("error answering %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")
