"""POST /v1/chat/completions: parse, render the chat template and tokenize, check the grammar, submit to the
cluster, then collect the whole response or stream it as server-sent events (n choices merged in one stream)."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import logging
import time

import msgspec
from fastapi.responses import StreamingResponse

from common.errors import InvalidRequestError
from common.sampling_params import GrammarSpec, SamplingParams
from router import openai_api as api
from router.cluster import Cluster, ClusterError, RequestState
from router.metrics import RouterMetrics
from router.text.detokenizer import IncrementalDetokenizer
from router.text.output import OutputParser
from router.text.reasoning import get_reasoning_parser
from router.text.tool_parsers import get_tool_parser

log = logging.getLogger("nano_pd.router")

SCHEMA_CACHE_SIZE = 1024


class ChatCompletions:
    """The chat-completions handler of one router: its tokenizer, model name, output parsers, metrics and cluster."""

    def __init__(self, cluster: Cluster, tokenizer, model_name: str, metrics: RouterMetrics,
                 request_timeout_s: float = 600.0, max_request_bytes: int = 4 * 2**20, vocab_size: int | None = None,
                 reasoning_parser: str | None = None, tool_parser: str = "hermes"):
        self.cluster, self.tokenizer, self.model_name, self.metrics = cluster, tokenizer, model_name, metrics
        self.request_timeout_s, self.max_request_bytes = request_timeout_s, max_request_bytes
        self.vocab_size = vocab_size or len(tokenizer)
        self.reasoning_cls = get_reasoning_parser(reasoning_parser) if reasoning_parser else None
        self.tool_cls = get_tool_parser(tool_parser)
        self._schema_errors: dict[bytes, str | None] = {}  # tool schema verdicts by digest, oldest first
        self._template_arguments = _template_arguments(tokenizer)

    async def create(self, body: bytes):
        """The response to a request body: a chat.completion dict, or a StreamingResponse of chunks."""
        if len(body) > self.max_request_bytes:
            raise api.APIError(413, f"the request body has {len(body)} bytes; the limit is {self.max_request_bytes}")
        req = api.parse_chat_request(body, self.vocab_size)
        if req.model is not None and req.model != self.model_name:
            raise api.APIError(404, f"The model `{req.model}` does not exist.", param="model",
                               code="model_not_found")
        await self._check_tool_schemas(req)
        try:  # a cluster still starting gets --migrate-wait to be ready: a client polling /v1/models loses nothing
            await self.cluster.wait_until_healthy()
        except ClusterError as e:
            self.metrics.request_errors.labels(status=503).inc()
            raise api.APIError(503, str(e), "service_unavailable") from None
        max_model_len = self.cluster.registry.max_model_len
        # jinja and the tokenizer take milliseconds for a long conversation: off the event loop, which meanwhile
        # keeps streaming everyone else's tokens
        prompt, prompt_ids = await asyncio.to_thread(self._render_and_tokenize, req)
        params = api.sampling_params(req, len(prompt_ids), max_model_len)
        grammar = await self._grammar(req)
        if grammar is not None:
            params = dataclasses.replace(params, grammar=grammar)
        reply = await self._submit(req, prompt, prompt_ids, params)
        if not req.stream:
            return await self._collect(reply)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        try:  # the status line waits for the first token: a failure before it is an HTTP error, not a 200
            await reply.runs[0].started()
        except BaseException:
            reply.close()
            raise
        return StreamingResponse(self._stream(reply, include_usage), media_type="text/event-stream")

    def _render_and_tokenize(self, req: api.ChatCompletionRequest) -> tuple[str, list[int]]:
        # chat_template_kwargs are the template's variables, not apply_chat_template's own arguments: a client's
        # chat_template would run its code here (nested loops that never end hold a render thread for good, and a
        # few of them every request's rendering), and tokenize, return_dict, tools... change what comes back
        arguments = sorted(self._template_arguments.intersection(req.chat_template_kwargs or {}))
        if arguments:
            raise api.APIError(400, f"chat_template_kwargs cannot set {', '.join(arguments)}: they are arguments "
                                    "of the chat template's rendering, not variables of the template",
                               param="chat_template_kwargs")
        try:
            prompt = self.tokenizer.apply_chat_template(
                api.chat_messages(req), tools=api.tool_dicts(req) if api.tools_active(req) else None,
                add_generation_prompt=True, tokenize=False, **(req.chat_template_kwargs or {}))
        except Exception as e:  # jinja raises for conversations a template refuses (e.g. role order)
            raise api.APIError(400, f"the chat template cannot render these messages: {e}", param="messages")
        return prompt, self.tokenizer.encode(prompt, add_special_tokens=False)

    async def _grammar(self, req: api.ChatCompletionRequest) -> GrammarSpec | None:
        """The output constraint of a request: response_format / structured_outputs, or the tool-call syntax that
        tool_choice enforces; a 400 if it does not compile, before any worker spends compute."""
        # the param of a grammar that does not compile: the field that asked for it
        param = "response_format" if req.structured_outputs is None else "structured_outputs"
        grammar = api.grammar_spec(req)
        mode = api.tool_grammar_mode(req)
        if mode is not None:
            if grammar is not None:
                raise api.APIError(400, "response_format cannot be combined with tool_choice required, a named "
                                        "function or strict tools", param="response_format")
            from common.grammar import structural_tag_for_tools

            try:
                grammar, param = structural_tag_for_tools(api.tool_dicts(req), mode), "tools"
            except (InvalidRequestError, RecursionError) as e:
                raise api.APIError(400, str(e), param="tools") from None
        if grammar is not None:
            await self._check_grammar(grammar, param)
        return grammar

    async def _check_grammar(self, spec: GrammarSpec, param: str):
        """A grammar that does not compile is the client's 400, found before any worker spends compute."""
        from common.grammar import validate

        try:
            await asyncio.to_thread(validate, spec, self.tokenizer, self.vocab_size)
        except InvalidRequestError as e:
            raise api.APIError(400, str(e), param=param) from None

    async def _check_tool_schemas(self, req: api.ChatCompletionRequest):
        """A 400 for a tool whose parameter schema does not compile, whether or not a grammar will enforce it.
        Verdicts are kept by the schema text's digest (bounded memory whatever the schemas' size): clients send
        the same tools with every request, and those then cost a hash and a look-up."""
        for param, text in api.tool_schemas(req):
            key = hashlib.sha256(text.encode()).digest()
            if key in self._schema_errors:
                error = self._schema_errors[key]
            else:
                error = await asyncio.to_thread(_schema_error, text)
                if len(self._schema_errors) >= SCHEMA_CACHE_SIZE:
                    self._schema_errors.pop(next(iter(self._schema_errors)))  # the oldest
                self._schema_errors[key] = error
            if error:
                raise api.APIError(400, f"{param}: {error}", param=param)

    async def _submit(self, req: api.ChatCompletionRequest, prompt: str, prompt_ids: list[int],
                      params: SamplingParams) -> Reply:
        """The request's n choices in the cluster, each with its Generation and OutputParser."""
        request_id = api.completion_id()
        try:
            first = await self.cluster.submit(f"{request_id}-0", prompt_ids, params)
        except ClusterError as e:
            self.metrics.request_errors.labels(status=e.status).inc()
            raise api.APIError(e.status, str(e), api.error_type(e.status)) from None
        states = [first] + [self.cluster.fork(first, f"{request_id}-{i}", api.choice_params(params, i))
                            for i in range(1, req.n or 1)]
        runs = [Generation(self.cluster, self.metrics, s, IncrementalDetokenizer(
                    self.tokenizer, api.stop_strings(req), req.skip_special_tokens), self.request_timeout_s)
                for s in states]
        use_tools = api.tools_active(req)
        parsers = [OutputParser(self.reasoning_cls.for_prompt(prompt) if self.reasoning_cls else None,
                                self.tool_cls() if use_tools else None) for _ in states]
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        return Reply(request_id, api.now(), runs, parsers, top_n)

    def _logprobs(self, reply: Reply, ids: list[int], entries: list[dict]) -> list[dict] | None:
        return None if reply.top_n is None else api.logprob_entries(self.tokenizer, ids, entries, reply.top_n)

    async def _collect(self, reply: Reply) -> dict:
        try:
            results = await asyncio.gather(*(run.collect() for run in reply.runs))
        finally:
            reply.close()
        choices = []
        for i, (run, parser, (text, ids, entries)) in enumerate(zip(reply.runs, reply.parsers, results)):
            message = parser.message(text)
            choices.append(api.choice(i, message, parser.finish_reason(run.finish_reason),
                                      self._logprobs(reply, ids, entries)))
        return api.completion(reply.request_id, self.model_name, reply.created, choices, reply.usage())

    def _chunk(self, reply: Reply, index: int, delta: dict, finish_reason=None, logprobs=None) -> bytes:
        return sse(api.chunk(reply.request_id, self.model_name, reply.created, index, delta, finish_reason, logprobs))

    async def _stream(self, reply: Reply, include_usage: bool):
        """The SSE body: each choice's role chunk, then the choices' deltas as they come, each choice's finish
        chunk, the usage chunk if asked for, [DONE]. An error ends the stream with an error event."""
        merged: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(_pump(i, run, merged)) for i, run in enumerate(reply.runs)]
        try:
            for i in range(len(reply.runs)):
                yield self._chunk(reply, i, {"role": "assistant", "content": ""})
            pending = len(reply.runs)
            while pending:
                index, item = await merged.get()
                if isinstance(item, api.APIError):
                    yield sse(item.body())
                    yield b"data: [DONE]\n\n"
                    return
                if item is None:
                    pending -= 1
                for chunk in self._choice_chunks(reply, index, item):
                    yield chunk
            if include_usage:
                yield sse({"id": reply.request_id, "object": "chat.completion.chunk", "created": reply.created,
                           "model": self.model_name, "choices": [], "usage": reply.usage()})
            yield b"data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
            reply.close()

    def _choice_chunks(self, reply: Reply, index: int, item) -> list[bytes]:
        """The chunks of one choice's delta (text, token ids, logprobs entries), or of its end (item None)."""
        parser = reply.parsers[index]
        if item is None:
            chunks = [self._chunk(reply, index, delta) for delta in parser.finish()]
            return chunks + [self._chunk(reply, index, {}, parser.finish_reason(reply.runs[index].finish_reason))]
        text, ids, entries = item
        logprobs = self._logprobs(reply, ids, entries)
        deltas = parser.feed(text) if text else []
        if logprobs is not None and not deltas:
            deltas = [{"content": ""}]  # the tokens' logprobs go out even while their text is held back
        return [self._chunk(reply, index, delta, logprobs=logprobs if j == 0 else None)
                for j, delta in enumerate(deltas)]


def _template_arguments(tokenizer) -> frozenset[str]:
    """The named parameters of the tokenizer's apply_chat_template (conversation, chat_template, tokenize, ...)."""
    try:
        parameters = inspect.signature(tokenizer.apply_chat_template).parameters.values()
    except (AttributeError, TypeError, ValueError):  # no introspectable signature: at least the template itself
        return frozenset({"chat_template"})
    named = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return frozenset(named | {"chat_template"})


def _schema_error(text: str) -> str | None:
    """Why a JSON schema does not compile, or None. Called in a thread: the first call imports xgrammar, and with
    it torch, which takes seconds."""
    try:
        from common.grammar import check_json_schema
    except ImportError:  # a router without torch (tests/test_layout.py) serves unconstrained requests unchecked
        log.warning("xgrammar cannot be imported: tool schemas are not checked")
        return None
    try:
        check_json_schema(text)
    except InvalidRequestError as e:
        return str(e)
    return None


def sse(obj) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


async def _pump(index: int, run: Generation, merged: asyncio.Queue):
    """run's deltas into merged as (index, delta), then (index, None); (index, APIError) if it fails."""
    try:
        async for item in run.deltas():
            await merged.put((index, item))
        await merged.put((index, None))
    except api.APIError as e:
        await merged.put((index, e))


@dataclasses.dataclass
class Reply:
    """One response under way: its id and creation time, and per choice a Generation and an OutputParser."""
    request_id: str
    created: int
    runs: list[Generation]
    parsers: list[OutputParser]
    top_n: int | None  # logprobs alternatives per token; None: no logprobs

    def usage(self) -> dict:
        first = self.runs[0].state
        return api.usage(len(first.prompt_ids), sum(len(r.state.output_ids) for r in self.runs),
                         first.num_cached_tokens)

    def close(self):
        for run in self.runs:
            run.close()


class Generation:
    """One request's tokens turned into text: detokenization, stop strings, timing metrics, and cleanup."""

    def __init__(self, cluster: Cluster, metrics: RouterMetrics, state: RequestState, detok: IncrementalDetokenizer,
                 timeout_s: float):
        self.cluster, self.metrics, self.state, self.detok, self.timeout_s = cluster, metrics, state, detok, timeout_s
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.num_tokens = 0
        self._peeked: tuple | None = None  # the first tokens event, awaited by started() and not consumed yet

    async def started(self):
        """Wait for the request's first tokens; an error before them (overloaded, no worker, refused by one) raises
        APIError here, so a stream answers it with its status instead of a 200 and an error event."""
        self._peeked = await self._tokens_event()

    async def _tokens_event(self) -> tuple:
        """The next ("tokens", ids, finish_reason, logprobs) event; APIError for an error event or timeout_s
        without one."""
        if self._peeked is not None:
            event, self._peeked = self._peeked, None
            return event
        try:
            event = await asyncio.wait_for(self.state.events.get(), self.timeout_s)
        except asyncio.TimeoutError:
            await self.cluster.abort(self.state)
            self.metrics.request_errors.labels(status=504).inc()
            raise api.APIError(504, f"no tokens for {self.timeout_s:.0f} s", "timeout") from None
        if event[0] == "error":
            self.metrics.request_errors.labels(status=event[2]).inc()
            raise api.APIError(event[2], event[1], api.error_type(event[2]))
        return event

    async def deltas(self):
        """(text, token ids, logprobs entries) as text becomes safe to emit (the ids and entries of tokens whose
        text is held back come with a later delta); raises APIError if the cluster fails the request."""
        state = self.state
        while self.finish_reason is None:
            _, token_ids, reason, logprobs = await self._tokens_event()
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
