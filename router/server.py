"""The HTTP front: middleware (auth, size limit, X-Request-Id), error bodies, the routes (/health, /ready,
/v1/models, /metrics, /cluster, /debug/desired-replicas (router.planner), POST /admin/workers/{id}/drain, and
/v1/chat/completions: router.serving_chat), the OpenAPI document, the server's limits on slow or too many
connections, and its drain on SIGTERM (serve)."""
from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import signal
import time

import h11
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from router import openai_api as api
from router import planner
from router.cluster import RETRY_AFTER_S, Cluster
from router.metrics import CONTENT_TYPE, RouterMetrics, pool_signals
from router.serving_chat import ChatCompletions

log = logging.getLogger("nano_pd.router")


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                   headers: dict | None = None):
    return JSONResponse(api.error_body(message, type, param, code), status_code=status, headers=headers)


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

    # no redirect to the slash-less path (an empty 307 a POST client cannot follow): routes answer on both
    app = FastAPI(title="nano-pd router", lifespan=lifespan, redirect_slashes=False)
    app.state.drain = RouterDrain()
    _add_access_middleware(app, api_key, max_request_bytes)
    app.add_middleware(DrainGate, drain=app.state.drain)
    _add_error_handlers(app)
    _add_routes(app, cluster, model_name, metrics, chat, max_request_bytes)
    _document(app)
    return app


@dataclasses.dataclass
class RouterDrain:
    """The router's own drain: from its start (SIGTERM), new /v1 requests get a 503 and /ready fails; the server
    exits once the API requests still open (streams included) are done, or at the drain timeout."""
    draining: bool = False
    since: float = 0.0
    open_requests: int = 0  # /v1 requests being answered, counted until their last byte is sent

    def begin(self):
        if not self.draining:
            self.draining, self.since = True, time.monotonic()


class DrainGate:
    """Pure ASGI middleware: counts the open /v1 requests and refuses new ones while the router drains. An http
    middleware returns before a stream's body is sent, so only an ASGI one sees a stream end."""

    def __init__(self, app, drain: RouterDrain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        if self.drain.draining:
            response = error_response(503, "the router is shutting down; send the request to another replica",
                                      "service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S), **CLOSE})
            return await response(scope, receive, send)
        self.drain.open_requests += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.open_requests -= 1


def _add_access_middleware(app: FastAPI, api_key: str | None, max_request_bytes: int):
    @app.middleware("http")
    async def access(request: Request, call_next):
        """Bearer auth on /v1 routes, the size limit before the body is read, X-Request-Id echoed."""
        request_id = request.headers.get("x-request-id")
        response = None
        if api_key and request.url.path.startswith(("/v1", "/admin")):
            if not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}"):
                response = error_response(401, "Incorrect or missing API key (Authorization: Bearer ...).",
                                          code="invalid_api_key")
        declared = request.headers.get("content-length", "")
        if response is None and declared.isdigit() and int(declared) > max_request_bytes:
            response = error_response(413, f"the request body has {declared} bytes; the limit is "
                                           f"{max_request_bytes}", headers=CLOSE)
        if response is None:
            response = await call_next(request)
        if request_id:
            response.headers["X-Request-Id"] = request_id
        return response


# on an answer given before the whole body was read: the connection cannot carry another request
CLOSE = {"Connection": "close"}


def _add_error_handlers(app: FastAPI):
    @app.exception_handler(api.APIError)
    async def _api_error(_request, e: api.APIError):
        headers = CLOSE if e.status == 413 else {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        # e.headers carries a 405's Allow
        return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                              "invalid_request_error", headers=e.headers)


def _route(app: FastAPI, method: str, path: str, **doc):
    """Register a handler at path and, undocumented, at path + "/" (clients that add a slash get the same answer,
    where redirect_slashes would give them an empty 307)."""
    def register(handler):
        app.add_api_route(path, handler, methods=[method], **doc)
        app.add_api_route(path + "/", handler, methods=[method], include_in_schema=False)
        return handler
    return register


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


ERRORS_DOC = {status: {"description": what, "content": {"application/json": {"schema": _ref("ErrorResponse")}}}
              for status, what in [(400, "invalid request"), (401, "missing or wrong API key"),
                                   (404, "unknown model"), (408, "request not received in time"),
                                   (413, "body over --max-request-bytes"),
                                   (415, "a Content-Type other than application/json"),
                                   (429, "overloaded (--max-queued-requests, --admit-timeout): retry after the "
                                         "Retry-After header's seconds"), (503, "the cluster cannot serve")]}
DRAIN_DOC = {202: {"description": "the worker drains: no new work goes to it; it finishes what it holds, then exits",
                   "content": {"application/json": {"schema": {
                       "type": "object", "required": ["worker_id", "status"],
                       "properties": {"worker_id": {"type": "string"}, "status": {"const": "draining"}}}}}},
             401: ERRORS_DOC[401],
             404: {"description": "no live worker has this id",
                   "content": {"application/json": {"schema": _ref("ErrorResponse")}}}}
# A validator that reads server-sent events (OpenAPI 3.2's itemSchema, a 3.1 schema by schemathesis's reading)
# checks each event against the stream's schema: it describes the event, whose data is a chunk's JSON, the JSON
# error that ends a failed stream, or the closing [DONE]. A chunk's schema there would fail every event.
CHAT_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "if": {"const": "[DONE]"},
    "else": {"contentMediaType": "application/json",
             "contentSchema": {"anyOf": [_ref("ChatCompletionChunk"), _ref("ErrorResponse")]}}}}}
CHAT_OK = {"description": "a chat.completion; with stream, server-sent chat.completion.chunk events",
           "content": {"application/json": {"schema": _ref("ChatCompletion")},
                       "text/event-stream": {"schema": CHAT_EVENT}}}
CHAT_DOC = {"openapi_extra": {"requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("ChatCompletionRequest")}}}},
            "responses": {200: CHAT_OK, **ERRORS_DOC}}


def _add_routes(app: FastAPI, cluster: Cluster, model_name: str, metrics: RouterMetrics, chat: ChatCompletions,
                max_request_bytes: int):
    workers = cluster.registry

    @_route(app, "GET", "/health")
    async def health():
        if workers.healthy:
            return {"status": "ok"}
        return error_response(503, workers.missing_roles(), "service_unavailable")

    @_route(app, "GET", "/ready")
    async def ready():
        """For load balancers: 200 only while this router takes new requests (not draining, and /health ok)."""
        if app.state.drain.draining:
            return error_response(503, "the router is draining: it finishes its open requests and takes no new "
                                       "ones", "service_unavailable")
        return await health()

    @_route(app, "POST", "/admin/workers/{worker_id}/drain", status_code=202, responses=DRAIN_DOC)
    async def drain_worker(worker_id: str):
        """Ask a worker to drain: it gets no new work from now on, finishes what it holds, and exits."""
        worker = workers.workers.get(worker_id)
        if worker is None or not worker.alive:
            return error_response(404, f"no live worker {worker_id!r} (see /cluster)", "not_found_error")
        await cluster.drain(worker)
        return JSONResponse({"worker_id": worker_id, "status": "draining"}, status_code=202)

    @_route(app, "GET", "/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": api.now(),
                                            "owned_by": "nano-pd", "max_model_len": workers.max_model_len}]}

    @_route(app, "GET", "/metrics", response_class=PlainTextResponse)  # documented as text/plain
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @_route(app, "GET", "/cluster")
    async def cluster_page():
        return {"healthy": workers.healthy, "requests": len(cluster.requests), "workers": workers.snapshot(),
                "starting": sorted(workers.starting_roles()), "draining": app.state.drain.draining,
                "open_requests": app.state.drain.open_requests}

    window = planner.MetricWindow()

    @_route(app, "GET", "/debug/desired-replicas")
    async def desired_replicas(request: Request):
        """The planner's replicas per role (router.planner); every call adds a sample of the pools to its window."""
        try:
            config = planner.PlannerConfig.from_query(dict(request.query_params))
        except ValueError as e:
            return error_response(400, str(e))
        now = time.monotonic()
        window.add(planner.Sample.of(now, pool_signals(workers), config))
        decisions = planner.desired_replicas(window.samples, now, config)
        return {"roles": {role: d.to_json() for role, d in decisions.items()},
                "samples": len(window.samples), "scale_down_window_s": config.scale_down_window_s}

    @_route(app, "POST", "/v1/chat/completions", **CHAT_DOC)
    async def chat_completions(request: Request):
        try:
            body = await _read_body(request, max_request_bytes)
        except ClientDisconnect:  # gone (or cut off by --body-timeout) mid-body: nobody is left to answer
            log.info("%s:%s sent part of a request body, then its connection ended", *(request.client or ("?", 0)))
            return Response(status_code=400)
        _check_json_content_type(request.headers.get("content-type"))  # the body read: the connection stays usable
        return await chat.create(body)


def _check_json_content_type(content_type: str | None):
    """A 415 (vLLM's answer too) for a body declared as anything but JSON (a form, text): parsed as JSON anyway it
    was served, so a client's mistake went unnoticed. No Content-Type is read as JSON, as clients that send raw
    bytes (tests, scripts) mean it."""
    if content_type is None:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise api.APIError(415, f"Content-Type must be application/json, got {content_type[:100]!r}")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read no further than limit: a chunked body declares no length for the middleware to check."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise api.APIError(413, f"the request body has more than {limit} bytes, the limit")
    return bytes(body)


def _document(app: FastAPI):
    """The OpenAPI document with the request, answer and error schemas (msgspec's JSON Schema of the structs the
    handler decodes with), which FastAPI cannot see since the handler reads the raw body."""
    generate, components = app.openapi, api.openapi_components()

    def openapi() -> dict:
        doc = generate()  # FastAPI's, cached
        doc.setdefault("components", {}).setdefault("schemas", {}).update(components)
        return doc

    app.openapi = openapi


# --- connection limits ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HTTPLimits:
    header_timeout_s: float = 10.0  # to send a request head, from connecting or from the previous response
    body_timeout_s: float = 30.0  # to send the rest of the body, from the end of its head
    keep_alive_s: float = 5.0  # an idle connection is closed after this
    max_connections: int = 1000  # open at once; a request on one more gets a 503


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines for reading a request and a cap on open connections. uvicorn arms its
    keep-alive timer only after a response, and every byte received disarms it, so without these a client that
    sends nothing, or a request a byte at a time, holds its connection forever. The deadlines run from the start
    of what the client owes (a head, then a body) and are not reset by data."""
    limits = HTTPLimits()  # a subclass per server (serve) sets its own

    def connection_made(self, transport):
        super().connection_made(transport)
        self._timer, self._owed = None, None
        if len(self.connections) > self.limits.max_connections:
            self.app = _too_many_connections  # answers this connection's request, then closes it
        self._watch()

    def handle_events(self):
        super().handle_events()
        self._watch()

    def on_response_complete(self):
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc):
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str):
        # uvicorn's answer to malformed HTTP, in OpenAI's error JSON rather than plain text
        self.transport.write(_raw_response(400, "Bad Request", msg))
        self.transport.close()

    def _watch(self):
        """Arm the deadline for what the client owes now (a request head, the rest of a body, or nothing)."""
        owed = {h11.IDLE: "head", h11.SEND_BODY: "body"}.get(self.conn.their_state)
        if owed == self._owed or self.transport.is_closing():
            return
        if self._timer is not None:
            self._timer.cancel()
        self._owed, self._timer = owed, None
        if owed is not None:
            limit = self.limits.header_timeout_s if owed == "head" else self.limits.body_timeout_s
            self._timer = self.loop.call_later(limit, self._too_slow, limit)

    def _too_slow(self, limit: float):
        # a 408 for a request begun and not yet answered; an idle connection is closed without one, since its
        # client may be sending a request right now and would take the 408 for that request's answer
        begun = self.conn.trailing_data[0] if self._owed == "head" else not self.cycle.response_started
        if begun:
            self.transport.write(_raw_response(408, "Request Timeout", f"the request's {self._owed} did not "
                                                                      f"arrive within {limit:g} s"))
        self.transport.close()


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps(api.error_body(message)).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


async def _too_many_connections(scope, receive, send):
    response = error_response(503, "the server has too many open connections; try again later",
                              "service_unavailable", headers=CLOSE)
    await response(scope, receive, send)


# after a drain (or at its timeout) uvicorn closes the connections: this long for the last bytes to go out
FINAL_SHUTDOWN_S = 5


def serve(app: FastAPI, host: str, port: int, limits: HTTPLimits = HTTPLimits(), drain_timeout_s: float = 120.0):
    """Serve app until SIGTERM or SIGINT: then drain (app.state.drain) for at most drain_timeout_s and exit; a
    second signal stops at once."""
    import uvicorn

    drain: RouterDrain = app.state.drain

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame):
            # uvicorn's own stops listening at once and re-raises the signal after shutdown (exit status -15)
            if drain.draining:
                log.warning("%s during the drain: stopping now", signal.Signals(sig).name)
                self.should_exit = self.force_exit = True
                return
            log.info("%s: draining (%d requests open, at most %g s)", signal.Signals(sig).name,
                     drain.open_requests, drain_timeout_s)
            drain.begin()

        async def on_tick(self, counter: int) -> bool:
            if drain.draining and not self.should_exit:
                waited = time.monotonic() - drain.since
                if drain.open_requests == 0 or waited >= drain_timeout_s:
                    log.info("drained after %.1f s (%d requests still open); exiting", waited, drain.open_requests)
                    self.should_exit = True
            return await super().on_tick(counter)

    protocol = type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits})
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=FINAL_SHUTDOWN_S,
                            http=protocol, ws="none", timeout_keep_alive=limits.keep_alive_s)
    DrainingServer(config).run()
