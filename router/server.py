"""The HTTP front: OpenAI chat completions (streamed and not), models, health, metrics, and a cluster page."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import InvalidRequestError
from common.sampling_params import GrammarSpec
from router import openai_api as api
from router.cluster import Cluster, ClusterError, RequestState
from router.detokenizer import IncrementalDetokenizer
from router.output import OutputParser
from router.reasoning import get_reasoning_parser
from router.tool_parsers import get_tool_parser
from router.router_metrics import RouterMetrics

log = logging.getLogger("nano_pd.router")


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
    return JSONResponse(api.error_body(message, type, param, code), status_code=status)


def create_app(cluster: Cluster, tokenizer, model_name: str, metrics: RouterMetrics,
               request_timeout_s: float = 600.0, api_key: str | None = None,
               max_request_bytes: int = 4 * 2**20, vocab_size: int | None = None,
               reasoning_parser: str | None = None, tool_parser: str = "hermes") -> FastAPI:
    vocab_size = vocab_size or len(tokenizer)
    reasoning_cls = get_reasoning_parser(reasoning_parser) if reasoning_parser else None
    tool_cls = get_tool_parser(tool_parser)
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await cluster.start()
        yield
        await cluster.stop()

    app = FastAPI(title="nano-pd router", lifespan=lifespan)

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

    @app.exception_handler(api.APIError)
    async def _api_error(_request, e: api.APIError):
        if e.status >= 500:
            metrics.request_errors.labels(status=e.status).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                              "invalid_request_error")

    @app.get("/health")
    async def health():
        if cluster.healthy:
            return {"status": "ok"}
        return error_response(503, cluster.missing_roles(), "service_unavailable")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": api.now(),
                                            "owned_by": "nano-pd", "max_model_len": cluster.max_model_len}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(cluster), media_type="text/plain; version=0.0.4")

    @app.get("/cluster")
    async def cluster_page():
        return {"healthy": cluster.healthy, "workers": cluster.snapshot()}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await request.body()
        if len(body) > max_request_bytes:
            raise api.APIError(413, f"the request body has {len(body)} bytes; the limit is {max_request_bytes}")
        req = api.parse_chat_request(body)
        if req.model is not None and req.model != model_name:
            raise api.APIError(404, f"The model `{req.model}` does not exist.", param="model",
                               code="model_not_found")
        max_model_len = cluster.max_model_len
        if max_model_len is None or not cluster.healthy:
            raise api.APIError(503, cluster.missing_roles(), "service_unavailable")
        use_tools = api.tools_active(req)
        try:
            prompt = tokenizer.apply_chat_template(
                api.chat_messages(req), tools=api.tool_dicts(req) if use_tools else None,
                add_generation_prompt=True, tokenize=False, **(req.chat_template_kwargs or {}))
        except Exception as e:  # jinja raises for conversations a template refuses (e.g. role order)
            raise api.APIError(400, f"the chat template cannot render these messages: {e}", param="messages")
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        params = api.sampling_params(req, len(prompt_ids), max_model_len)
        grammar = await request_grammar(req)
        if grammar is not None:
            params = dataclasses.replace(params, grammar=grammar)
        request_id = api.completion_id()
        try:
            first = await cluster.submit(f"{request_id}-0", prompt_ids, params)
        except ClusterError as e:
            raise api.APIError(503, str(e), "service_unavailable") from None
        states = [first] + [cluster.fork(first, f"{request_id}-{i}", api.choice_params(params, i))
                            for i in range(1, req.n or 1)]
        runs = [Generation(cluster, metrics, s, IncrementalDetokenizer(tokenizer, api.stop_strings(req),
                                                                       req.skip_special_tokens), request_timeout_s)
                for s in states]
        parsers = [OutputParser(reasoning_cls.for_prompt(prompt) if reasoning_cls else None,
                                tool_cls() if use_tools else None) for _ in states]
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        created = api.now()
        if not req.stream:
            try:
                results = await asyncio.gather(*(run.collect() for run in runs))
            finally:
                for run in runs:
                    run.close()
            choices = []
            for i, (run, parser, (text, ids, entries)) in enumerate(zip(runs, parsers, results)):
                message = parser.message(text)
                choices.append(api.choice(i, message, parser.finish_reason(run.finish_reason), None if top_n is None
                                          else api.logprob_entries(tokenizer, ids, entries, top_n)))
            return api.completion(request_id, model_name, created, choices, usage(runs))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(stream(runs, parsers, request_id, created, include_usage, top_n),
                                 media_type="text/event-stream")

    async def request_grammar(req) -> GrammarSpec | None:
        """The output constraint of a request: response_format / structured_outputs, or the tool-call syntax that
        tool_choice enforces; a 400 if it does not compile, before any worker spends compute."""
        grammar, param = api.grammar_spec(req), "response_format"
        mode = api.tool_grammar_mode(req)
        if mode is not None:
            if grammar is not None:
                raise api.APIError(400, "response_format cannot be combined with tool_choice required, a named "
                                        "function or strict tools", param="response_format")
            from common.grammar import structural_tag_for_tools

            try:
                grammar, param = structural_tag_for_tools(api.tool_dicts(req), mode), "tools"
            except InvalidRequestError as e:
                raise api.APIError(400, str(e), param="tools") from None
        if grammar is not None:
            await check_grammar(grammar, param)
        return grammar

    async def check_grammar(spec, param: str):
        """A grammar that does not compile is the client's 400, found before any worker spends compute."""
        from common.grammar import validate

        try:
            await asyncio.to_thread(validate, spec, tokenizer, vocab_size)
        except InvalidRequestError as e:
            raise api.APIError(400, str(e), param=param) from None

    def usage(runs: list["Generation"]) -> dict:
        first = runs[0].state
        return api.usage(len(first.prompt_ids), sum(len(r.state.output_ids) for r in runs), first.num_cached_tokens)

    async def stream(runs: list["Generation"], parsers: list[OutputParser], request_id: str, created: int,
                     include_usage: bool, top_n):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(index: int, delta: dict, finish_reason=None, logprobs=None) -> str:
            return sse(api.chunk(request_id, model_name, created, index, delta, finish_reason, logprobs))

        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, run: Generation):
            try:
                async for item in run.deltas():
                    await merged.put((index, item))
                await merged.put((index, None))
            except api.APIError as e:
                await merged.put((index, e))

        tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
        try:
            for i in range(len(runs)):
                yield chunk(i, {"role": "assistant", "content": ""})
            pending = len(runs)
            while pending:
                index, item = await merged.get()
                if isinstance(item, api.APIError):
                    yield sse(item.body())
                    yield "data: [DONE]\n\n"
                    return
                parser = parsers[index]
                if item is None:
                    pending -= 1
                    for delta in parser.finish():
                        yield chunk(index, delta)
                    yield chunk(index, {}, parser.finish_reason(runs[index].finish_reason))
                    continue
                text, ids, entries = item
                logprobs = None if top_n is None else api.logprob_entries(tokenizer, ids, entries, top_n)
                deltas = parser.feed(text) if text else []
                if logprobs is not None and not deltas:
                    deltas = [{"content": ""}]  # the tokens' logprobs go out even while their text is held back
                for j, delta in enumerate(deltas):
                    yield chunk(index, delta, logprobs=logprobs if j == 0 else None)
            if include_usage:
                yield sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                           "model": model_name, "choices": [], "usage": usage(runs)})
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
            for run in runs:
                run.close()

    return app


class Generation:
    """One request's tokens turned into text: detokenization, stop strings, timing metrics, and cleanup."""

    def __init__(self, cluster: Cluster, metrics: RouterMetrics, state: RequestState, detok: IncrementalDetokenizer,
                 timeout_s: float):
        self.cluster, self.metrics, self.state, self.detok, self.timeout_s = cluster, metrics, state, detok, timeout_s
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.num_tokens = 0

    async def deltas(self):
        """(text, token ids, logprobs entries) as text becomes safe to emit (the ids and entries of tokens whose
        text is held back come with a later delta); raises APIError if the cluster fails the request."""
        state = self.state
        while self.finish_reason is None:
            try:
                event = await asyncio.wait_for(state.events.get(), self.timeout_s)
            except asyncio.TimeoutError:
                await self.cluster.abort(state)
                raise api.APIError(504, f"no tokens for {self.timeout_s:.0f} s", "timeout") from None
            if event[0] == "error":
                self.metrics.request_errors.labels(status=event[2]).inc()
                raise api.APIError(event[2], event[1], "service_unavailable" if event[2] >= 500 else
                                   "invalid_request_error")
            _, token_ids, reason, logprobs = event
            self._observe(len(token_ids))
            text = self.detok.add(token_ids)
            if self.detok.stopped:
                self.finish_reason = "stop"
                await self.cluster.abort(state)
            elif reason is not None:
                self.finish_reason = reason
                text += self.detok.flush()
            if text or logprobs:
                yield text, token_ids, logprobs or []
        self._finished()

    async def collect(self) -> tuple[str, list[int], list[dict]]:
        """The whole text, and the token ids with their logprobs entries (when asked for)."""
        text, ids, entries = [], [], []
        async for t, i, e in self.deltas():
            text.append(t)
            ids.extend(i)
            entries.extend(e)
        return "".join(text), ids, entries

    def _observe(self, n: int):
        now = time.monotonic()
        if n == 0:
            return
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.ttft.observe(now - self.state.arrival)
        else:
            self.metrics.itl.observe(now - self.last_token_at)
        self.last_token_at = now
        self.num_tokens += n
        self.metrics.generation_tokens.inc(n)

    def _finished(self):
        now = time.monotonic()
        self.metrics.e2e.observe(now - self.state.arrival)
        if self.num_tokens > 1:
            self.metrics.tpot.observe((now - self.first_token_at) / (self.num_tokens - 1))
        self.metrics.finished(self.finish_reason, len(self.state.prompt_ids), self.state.num_draft_tokens,
                              self.state.num_accepted_tokens)

    def close(self):
        """Whatever ended the response (done, error, client gone), the workers must stop spending on it.
        Scheduled rather than awaited: this also runs while the response task is being cancelled."""
        if not self.state.done:
            asyncio.get_running_loop().create_task(self.cluster.abort(self.state))
