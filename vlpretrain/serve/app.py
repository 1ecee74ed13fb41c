"""The HTTP API and web page over retrieval indexes: :func:`create_app` builds the FastAPI application.

Endpoints (every error is ``{"error": {"code", "message"}}``, see :mod:`.errors`):

- ``POST /search``: JSON ``{"text" | "image" (base64) | "embedding", "k", "index", "rerank", "rerank_score"}``,
  or multipart form data with the image file in ``image`` and the same fields; answers
  ``{"index", "query", "k", "hits": [{"rank", "score", "id", "caption", "image_url", "metadata", ...}]}``.
- ``GET /image/{index}/{id}``: the indexed image of a row, by id only.
- ``GET /indexes``: what each index holds; ``GET /health``; ``GET /docs`` (OpenAPI); ``GET /``: the page.

With an API key, /search, /indexes and /image need it (header ``X-API-Key``, ``Authorization: Bearer``,
or the page's ``vlp_api_key`` cookie); the page, its static files, /health and the API docs hold no
indexed data and stay open, so the page can load and ask for the key.

Example:
    >>> app = create_app(["runs/demo-emoji/index"], max_k=50)
    >>> from fastapi.testclient import TestClient
    >>> TestClient(app).post("/search", json={"text": "a smiling cat", "k": 3}).json()["hits"][0]["caption"]
    'smiling cat face with open mouth'
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import UploadFile

from .errors import ApiError, error_response, install_error_handlers
from .image_files import decode_upload
from .service import SearchService

__all__ = ["create_app", "SearchRequest", "DEFAULT_MAX_K", "DEFAULT_MAX_UPLOAD_MB", "API_KEY_COOKIE"]

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_K = 100
DEFAULT_MAX_UPLOAD_MB = 10.0
API_KEY_COOKIE = "vlp_api_key"
# Paths that hold no indexed data: served without the API key.
OPEN_PATHS = ("/", "/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/favicon.ico")


class SearchRequest(BaseModel):
    """A query: exactly one of ``text``, ``image`` (base64, or a ``data:`` URL) or ``embedding``."""

    model_config = ConfigDict(extra="forbid")
    text: Optional[str] = None
    image: Optional[str] = None
    embedding: Optional[list[float]] = None
    k: int = 10
    index: Optional[str] = None
    rerank: Optional[int] = None
    rerank_score: Literal["itm", "itm+itc"] = "itm"


class RequestGuard:
    """ASGI middleware: the API key (when set) and the request body limit (413), before any parsing."""

    def __init__(self, app, api_key: Optional[str], max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, int(max_body)

    def _authorized(self, scope) -> bool:
        path = scope.get("path", "")
        if not self.api_key or path in OPEN_PATHS or path.startswith("/static/"):
            return True
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-api-key")
        if given is None and headers.get("authorization", "").lower().startswith("bearer "):
            given = headers["authorization"][7:].strip()
        if given is None:
            for part in headers.get("cookie", "").split(";"):
                name, _, value = part.strip().partition("=")
                if name == API_KEY_COOKIE:
                    given = unquote(value)  # the page stores encodeURIComponent(key)
        return given is not None and hmac.compare_digest(given.encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            return await error_response(401, "unauthorized", "this server needs its API key: send it as the "
                                        "X-API-Key header (or enter it on the page)")(scope, receive, send)
        limit_message = f"the request body is over the server's limit of {self.max_body} bytes (--max-upload-mb)"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                return await error_response(413, "payload_too_large", limit_message)(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:  # a chunked body without Content-Length
                raise ApiError(413, "payload_too_large", limit_message)
            return message

        return await self.app(scope, counted_receive, send)


def _decode_base64(value: str) -> bytes:
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_image", "image: not valid base64 (send the file's bytes base64-encoded, "
                                         "or upload it as multipart form data)") from None


async def _parse_search(request: Request) -> tuple[SearchRequest, Optional[bytes], str]:
    """The query of a JSON or multipart request, the image bytes (if any) and the image's name."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload: Optional[bytes] = None
    name = "image (base64)"
    if content_type == "multipart/form-data":
        form = await request.form()
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in ("image", "file"):
                    raise ApiError(400, "bad_request", f"upload field '{key}': send the image as the field 'image'")
                upload, name = await value.read(), value.filename or key
            elif value != "":
                fields[key] = value
        if "embedding" in fields:
            try:
                fields["embedding"] = json.loads(fields["embedding"])
            except json.JSONDecodeError:
                raise ApiError(400, "bad_request", "embedding: send a JSON list of numbers") from None
    elif content_type in ("application/json", ""):
        try:
            fields = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "bad_request", "the request body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise ApiError(400, "bad_request", "send a JSON object, e.g. {\"text\": \"a smiling cat\", \"k\": 10}")
    else:
        raise ApiError(415, "unsupported_media_type", f"content type '{content_type}': send application/json "
                                                      f"or multipart/form-data")
    try:
        query = SearchRequest.model_validate(fields)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    if query.image is not None and upload is None:
        upload = _decode_base64(query.image)
    return query, upload, name


def _check_limits(query: SearchRequest, given: list[str], max_k: int) -> None:
    if len(given) != 1:
        raise ApiError(400, "bad_query", f"give exactly one of text, image or embedding (got "
                                         f"{', '.join(given) or 'none'})")
    if query.k < 1:
        raise ApiError(400, "bad_k", f"k must be at least 1, got {query.k}")
    if query.k > max_k:
        raise ApiError(400, "k_too_large", f"k={query.k} is over the server's limit of {max_k} (--max-k)")
    if query.rerank is not None and not 1 <= query.rerank <= max_k:
        raise ApiError(400, "bad_rerank", f"rerank must be between 1 and {max_k} (candidates to re-score), "
                                          f"got {query.rerank}")


def _openapi_body() -> dict:
    schema = SearchRequest.model_json_schema()
    form = {"type": "object", "properties": {**schema["properties"], "image": {"type": "string", "format": "binary"}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                          "multipart/form-data": {"schema": form}}}}


def _add_routes(app: FastAPI, service: SearchService, max_k: int, max_body: int, api_key: bool) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health", summary="Liveness: the indexes are loaded")
    async def health() -> dict:
        return {"status": "ok", "indexes": len(service.indexes), "api_key_required": api_key}

    @app.get("/indexes", summary="What each index holds: model, size, kind, measured recall@10")
    async def indexes() -> dict:
        return {"indexes": service.describe(), "limits": {"max_k": max_k, "max_upload_bytes": max_body}}

    @app.get("/image/{index:path}/{image_id}", summary="An indexed image, by the id of its row",
             response_class=Response, responses={200: {"content": {"image/*": {}}}})
    async def image(index: str, image_id: str) -> Response:
        # File reads, tar scans and a first read of on-disk metadata: off the event loop.
        data, media_type = await asyncio.to_thread(service.image, index, image_id)
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/search", summary="Search an index by text, image or embedding", openapi_extra=_openapi_body())
    async def search(request: Request) -> dict:
        start = time.perf_counter()
        query, upload, name = await _parse_search(request)
        given = [n for n, v in (("text", query.text), ("image", upload), ("embedding", query.embedding))
                 if v is not None]
        _check_limits(query, given, max_k)
        served = service.get(query.index)
        if query.text is not None:
            hits = await service.search_text(served.name, query.text, query.k, query.rerank, query.rerank_score)
        elif upload is not None:
            picture = await asyncio.to_thread(decode_upload, upload, name)  # PIL decoding: off the event loop
            hits = await service.search_image(served.name, picture, query.k, query.rerank, query.rerank_score)
        else:
            if query.rerank is not None:
                raise ApiError(400, "bad_rerank", "rerank needs a text or image query, not an embedding: the ITM "
                                                  "head scores the query with each hit")
            hits = await service.search_vector(served.name, query.embedding, query.k)
        return {"index": served.name, "query": given[0], "k": query.k, "hits": hits,
                "took_ms": round(1000 * (time.perf_counter() - start), 2)}


def create_app(indexes: Union[SearchService, Sequence[Any], Mapping[str, Any]], *, api_key: Optional[str] = None,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_k: int = DEFAULT_MAX_K) -> FastAPI:
    """The FastAPI application over ``indexes`` (index folders, ``{name: folder}``, or a loaded
    :class:`SearchService`, which the caller then owns and closes).

    ``max_upload_mb`` bounds any request body (413 above it); ``max_k`` bounds ``k`` and ``rerank``
    (400 above it); ``api_key`` (when given) is needed by /search, /indexes and /image.

    Example:
        >>> app = create_app({"emoji": "runs/demo-emoji/index"}, max_upload_mb=5)
        >>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    if max_k < 1:
        raise ValueError(f"--max-k must be at least 1, got {max_k}")
    if not max_upload_mb > 0:
        raise ValueError(f"--max-upload-mb must be above 0, got {max_upload_mb}")
    owned = not isinstance(indexes, SearchService)
    service = SearchService.load(indexes) if owned else indexes
    max_body = int(max_upload_mb * 1_000_000)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if owned:
            await service.close()

    # docs_url=None: FastAPI's own /docs loads Swagger UI from a CDN, which an offline machine cannot reach;
    # the same page is served below from the package's copy of swagger-ui-dist (static/, Apache-2.0).
    app = FastAPI(title="vlpretrain retrieval service", lifespan=lifespan, docs_url=None,
                  description="Search image-text retrieval indexes built by `vlp index build`. Errors are "
                              "`{\"error\": {\"code\", \"message\"}}`.")
    app.state.service = service
    install_error_handlers(app)
    _add_routes(app, service, int(max_k), max_body, bool(api_key))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API docs",
                                   swagger_js_url="/static/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger-ui.css", swagger_favicon_url="/static/favicon.png")
    app.add_middleware(RequestGuard, api_key=api_key, max_body=max_body)
    return app
