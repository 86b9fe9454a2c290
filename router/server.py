"""The HTTP front: middleware (auth, size limit, X-Request-Id), error bodies, and the routes: /health, /v1/models,
/metrics, /cluster, and /v1/chat/completions (router.serving_chat)."""
from __future__ import annotations

import contextlib
import hmac

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from router import openai_api as api
from router.cluster import Cluster
from router.metrics import CONTENT_TYPE, RouterMetrics
from router.serving_chat import ChatCompletions


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
    return JSONResponse(api.error_body(message, type, param, code), status_code=status)


def create_app(cluster: Cluster, tokenizer, model_name: str, metrics: RouterMetrics,
               request_timeout_s: float = 600.0, api_key: str | None = None,
               max_request_bytes: int = 4 * 2**20, vocab_size: int | None = None,
               reasoning_parser: str | None = None, tool_parser: str = "hermes") -> FastAPI:
    chat = ChatCompletions(cluster, tokenizer, model_name, metrics, request_timeout_s=request_timeout_s,
                           max_request_bytes=max_request_bytes, vocab_size=vocab_size,
                           reasoning_parser=reasoning_parser, tool_parser=tool_parser)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await cluster.start()
        yield
        await cluster.stop()

    app = FastAPI(title="nano-pd router", lifespan=lifespan)
    _add_access_middleware(app, api_key, max_request_bytes)
    _add_error_handlers(app, metrics)
    _add_routes(app, cluster, model_name, metrics, chat)
    return app


def _add_access_middleware(app: FastAPI, api_key: str | None, max_request_bytes: int):
    @app.middleware("http")
    async def access(request: Request, call_next):
        """Bearer auth on /v1 routes, the size limit before the body is read, X-Request-Id echoed."""
        request_id = request.headers.get("x-request-id")
        response = None
        if api_key and request.url.path.startswith("/v1"):
            if not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}"):
                response = error_response(401, "Incorrect or missing API key (Authorization: Bearer ...).",
                                          code="invalid_api_key")
        declared = request.headers.get("content-length", "")
        if response is None and declared.isdigit() and int(declared) > max_request_bytes:
            response = error_response(413, f"the request body has {declared} bytes; the limit is "
                                           f"{max_request_bytes}")
        if response is None:
            response = await call_next(request)
        if request_id:
            response.headers["X-Request-Id"] = request_id
        return response


def _add_error_handlers(app: FastAPI, metrics: RouterMetrics):
    @app.exception_handler(api.APIError)
    async def _api_error(_request, e: api.APIError):
        if e.status >= 500:
            metrics.request_errors.labels(status=e.status).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                              "invalid_request_error")


def _add_routes(app: FastAPI, cluster: Cluster, model_name: str, metrics: RouterMetrics, chat: ChatCompletions):
    workers = cluster.registry

    @app.get("/health")
    async def health():
        if workers.healthy:
            return {"status": "ok"}
        return error_response(503, workers.missing_roles(), "service_unavailable")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": api.now(),
                                            "owned_by": "nano-pd", "max_model_len": workers.max_model_len}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/cluster")
    async def cluster_page():
        return {"healthy": workers.healthy, "workers": workers.snapshot()}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await chat.create(await request.body())
