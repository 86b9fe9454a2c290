"""The OpenAI chat-completions request schema, its validation, and the response / error bodies.

Requests are decoded with msgspec against a strict schema: a wrong type or a missing field is a 400 that names the
field; unknown fields are ignored, as OpenAI does.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Annotated

import msgspec

from common.errors import InvalidRequestError
from common.sampling_params import MAX_LOGPROBS, GrammarSpec, SamplingParams

MAX_STOP_STRINGS = 4
MAX_CHOICES = 16
# Every integer a request carries is bounded at decode to what msgpack (the workers' wire) can encode, so a huge
# value is the client's 400 naming the field, never an encoding failure at dispatch; tighter ranges come after.
Int64 = Annotated[int, msgspec.Meta(ge=-2**63, le=2**63 - 1)]


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_type(status: int) -> str:
    """OpenAI's error type for a status the cluster answers with (its 429s say "requests", as OpenAI's do)."""
    return "requests" if status == 429 else "service_unavailable" if status >= 500 else "invalid_request_error"


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str


class MessageToolCall(msgspec.Struct):
    function: FunctionCall
    id: str | None = None
    type: str = "function"


class Message(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # earlier thoughts, under either name clients use
    reasoning: str | None = None


class FunctionDef(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(msgspec.Struct):
    function: FunctionDef
    type: str = "function"


class NamedFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    function: NamedFunction
    type: str = "function"


class StructuredOutputs(msgspec.Struct):
    """vLLM's extension for constraints response_format cannot say."""
    regex: str | None = None
    json: dict | None = None
    grammar: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class JsonSchemaFormat(msgspec.Struct):
    name: str | None = None
    schema: dict | bool | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct):
    type: str
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(msgspec.Struct):
    messages: list[Message]
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Int64 | None = None
    max_completion_tokens: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: Int64 | None = None
    logprobs: bool | None = None
    top_logprobs: Int64 | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict | None = None
    structured_outputs: StructuredOutputs | None = None
    user: str | None = None
    # extensions vLLM accepts too
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Int64] | None = None
    skip_special_tokens: bool = True


_decoder = msgspec.json.Decoder(ChatCompletionRequest)


def _integer_fields() -> tuple[frozenset[str], frozenset[str]]:
    """The request's integer fields, and its lists of integers, by JSON name."""
    def kinds(t) -> tuple:
        return t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)

    fields = msgspec.inspect.type_info(ChatCompletionRequest).fields
    ints = {f.encode_name for f in fields if any(isinstance(k, msgspec.inspect.IntType) for k in kinds(f.type))}
    lists = {f.encode_name for f in fields if any(isinstance(k, msgspec.inspect.ListType) and isinstance(
        k.item_type, msgspec.inspect.IntType) for k in kinds(f.type))}
    return frozenset(ints), frozenset(lists)


INTEGER_FIELDS, INTEGER_LIST_FIELDS = _integer_fields()


def _decode(body: bytes) -> ChatCompletionRequest:
    """The request. An integer may be written as a whole float (4.0): JSON Schema, and so the OpenAPI document,
    counts it as an integer, and vLLM's parser takes it; msgspec does not. Such a body is decoded once more with
    the whole floats of the integer fields as ints (every other body takes the one strict pass)."""
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as e:
        if "got `float`" not in str(e):
            raise
    page = msgspec.json.decode(body)
    if isinstance(page, dict):
        for name in INTEGER_FIELDS & page.keys():
            page[name] = _whole(page[name])
        for name in INTEGER_LIST_FIELDS & page.keys():
            if isinstance(page[name], list):
                page[name] = [_whole(v) for v in page[name]]
    return msgspec.convert(page, ChatCompletionRequest)


def _whole(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


ROLES = {"system", "developer", "user", "assistant", "tool"}


CONTENT_OPTIONAL = {"assistant"}  # and only with tool_calls, as OpenAI has it


def parse_chat_request(body: bytes, vocab_size: int | None = None) -> ChatCompletionRequest:
    """The request, or APIError(400) naming what is wrong; with vocab_size, token ids are checked against it."""
    try:
        # msgspec checks UTF-8 only in the strings it keeps; bytes under an unknown key would slip through
        str(body, "utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the body is not valid UTF-8 (byte {e.start})") from None
    try:
        req = _decode(body)
    except msgspec.ValidationError as e:
        raise APIError(400, f"invalid request: {e}", param=_param_of(str(e))) from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the body is nested too deeply") from None
    if not req.messages:
        raise APIError(400, "messages must contain at least one message", param="messages")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {sorted(ROLES)}, got {m.role!r}",
                           param=f"messages[{i}].role")
        if m.content is None and not (m.role in CONTENT_OPTIONAL and m.tool_calls):
            raise APIError(400, f"messages[{i}].content is required for a {m.role} message"
                                + (" without tool_calls" if m.role in CONTENT_OPTIONAL else ""),
                           param=f"messages[{i}].content")
        if isinstance(m.content, list) and any(p.type != "text" or p.text is None for p in m.content):
            raise APIError(400, f"messages[{i}].content: only text parts are supported",
                           param=f"messages[{i}].content")
    if req.n is not None and not 1 <= req.n <= MAX_CHOICES:
        raise APIError(400, f"n must be in [1, {MAX_CHOICES}], got {req.n}", param="n")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                           param="top_logprobs")
    vocab = f"[0, {vocab_size})" if vocab_size else "[0, 2**63)"
    for key, value in (req.logit_bias or {}).items():
        if _token_id(key, vocab_size) is None or not -100 <= value <= 100:
            raise APIError(400, f"logit_bias maps token ids in {vocab} (as strings) to values in [-100, 100]; "
                                f"got {key[:40]!r}: {value}", param="logit_bias")
    for t in req.stop_token_ids or []:
        if not 0 <= t < (vocab_size or 2**63):
            raise APIError(400, f"stop_token_ids must be token ids in {vocab}, got {t}", param="stop_token_ids")
    _check_tools(req)
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    return req


def _token_id(key: str, vocab_size: int | None) -> int | None:
    """A logit_bias key as a token id, or None if it is not one. ASCII digits only (str.isdigit also takes '²',
    which int() refuses), and few enough that int() is cheap and the id fits the wire."""
    if not (key.isascii() and key.isdigit() and len(key) <= 19):
        return None
    token = int(key)
    return token if token < (vocab_size or 2**63) else None


TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _check_tools(req: ChatCompletionRequest):
    names = []
    for i, tool in enumerate(req.tools or []):
        fn = tool.function
        if tool.type != "function":
            raise APIError(400, f"tools[{i}].type must be 'function'", param=f"tools[{i}].type")
        if not TOOL_NAME.match(fn.name):
            raise APIError(400, f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'",
                           param=f"tools[{i}].function.name")
        if fn.parameters is not None and fn.parameters.get("type", "object") != "object":
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema of an object",
                           param=f"tools[{i}].function.parameters")
        names.append(fn.name)
    if len(set(names)) != len(names):
        raise APIError(400, "tool names must be unique", param="tools")
    choice = req.tool_choice
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise APIError(400, f"tool_choice must be none, auto, required or a named function, got {choice!r}",
                       param="tool_choice")
    if choice is not None and choice != "none" and not names:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                       param="tool_choice")


def tool_schemas(req: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(param, JSON text) of every tool's parameter schema, enforced by a grammar or not: OpenAI refuses a schema
    that does not compile whatever tool_choice says, and so do we (router.serving_chat compiles them)."""
    params = [(f"tools[{i}].function.parameters", t.function.parameters) for i, t in enumerate(req.tools or [])]
    return [(param, _json_text(schema, param)) for param, schema in params if schema is not None]


def _json_text(obj, param: str) -> str:
    try:
        return json.dumps(obj)
    except RecursionError:  # decoded just below the limit, re-encoded from a deeper stack
        raise APIError(400, f"{param} is nested too deeply", param=param) from None


def tools_active(req: ChatCompletionRequest) -> bool:
    return bool(req.tools) and req.tool_choice != "none"


def tool_grammar_mode(req: ChatCompletionRequest) -> str | None:
    """How tool calls are enforced: "required" ("required_one" without parallel calls), "named:<fn>", "auto"
    (calls that appear must be valid; asked for with strict tools), or None (not enforced)."""
    if not tools_active(req):
        return None
    if isinstance(req.tool_choice, NamedToolChoice):
        return f"named:{req.tool_choice.function.name}"
    if req.tool_choice == "required":
        return "required_one" if req.parallel_tool_calls is False else "required"
    return "auto" if any(t.function.strict for t in req.tools) else None


def tool_dicts(req: ChatCompletionRequest) -> list[dict]:
    """Tools as the client wrote them (fields it left out stay out of the rendered prompt)."""
    return [{"type": t.type, "function": {k: v for k, v in msgspec.to_builtins(t.function).items() if v is not None}}
            for t in req.tools or []]


def _param_of(validation_message: str) -> str | None:
    """msgspec says '... - at `$.messages[0].role`'; OpenAI's param is 'messages[0].role'."""
    _, sep, where = validation_message.rpartition("- at `$.")
    return where.rstrip("`") if sep else None


def grammar_spec(req: ChatCompletionRequest) -> GrammarSpec | None:
    """The output constraint response_format (or vLLM's structured_outputs) asks for; not yet checked to compile
    (see common.grammar.validate)."""
    so = req.structured_outputs
    if so is not None:
        given = [k for k in ("regex", "json", "grammar") if getattr(so, k) is not None]
        if len(given) != 1:
            raise APIError(400, "structured_outputs takes exactly one of regex, json, grammar",
                           param="structured_outputs")
        if so.regex is not None:
            return GrammarSpec("regex", so.regex)
        if so.json is not None:
            return GrammarSpec("json_schema", _json_text(so.json, "structured_outputs"), strict=False)
        return GrammarSpec("ebnf", so.grammar)
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_object", "")
    if fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        return GrammarSpec("json_schema", _json_text(fmt.json_schema.schema, "response_format"),
                           strict=bool(fmt.json_schema.strict))
    raise APIError(400, f"response_format.type must be text, json_object or json_schema, got {fmt.type!r}",
                   param="response_format")


def stop_strings(req: ChatCompletionRequest) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    """Messages as chat templates expect them: text parts joined, tool-call arguments as objects (templates
    serialise them themselves), earlier reasoning as reasoning_content."""
    out = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        msg = {"role": m.role, "content": content or ""}
        for key in ("name", "tool_call_id"):
            if getattr(m, key) is not None:
                msg[key] = getattr(m, key)
        if m.reasoning_content is not None or m.reasoning is not None:
            msg["reasoning_content"] = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function)}}
                                 for c in m.tool_calls]
        out.append(msg)
    return out


def _arguments(fn: FunctionCall):
    try:
        return json.loads(fn.arguments)
    except ValueError:
        return fn.arguments  # not JSON: the template gets the text as the client sent it


def sampling_params(req: ChatCompletionRequest, prompt_len: int, max_model_len: int) -> SamplingParams:
    """Engine sampling params; raises APIError(400) for values the engine would refuse or that cannot fit."""
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    # the param of an error is the field the client sent (max_completion_tokens wins when both are)
    max_tokens_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but the messages "
                            f"have {prompt_len} tokens; nothing is left for the completion.",
                       param="messages", code="context_length_exceeded")
    if max_tokens is not None:
        if max_tokens < 1:
            raise APIError(400, f"{max_tokens_field} must be at least 1, got {max_tokens}", param=max_tokens_field)
        if max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
                                f"{max_tokens} in the completion).", param=max_tokens_field,
                           code="context_length_exceeded")
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise APIError(400, f"temperature must be in [0, 2], got {req.temperature}", param="temperature")
    values = {"temperature": 1.0 if req.temperature is None else req.temperature, "max_tokens": max_tokens or room,
              "ignore_eos": req.ignore_eos, "seed": req.seed, "stop_token_ids": req.stop_token_ids or [],
              "logprobs": (req.top_logprobs or 0) if req.logprobs else None,
              "logit_bias": {int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None}
    for name in ("top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty"):
        if getattr(req, name) is not None:
            values[name] = getattr(req, name)
    try:
        return SamplingParams(**values)
    except InvalidRequestError as e:
        # SamplingParams names the field first ("top_p must be in (0, 1], got 0.0"); OpenAI's param says which
        field = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), param=field if field in values else None) from None


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of an n > 1 request: with a seed, its own derived seed, so the choices differ yet repeat."""
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=(params.seed * 1_000_003 + index) % 2**63)


def completion_id() -> str:
    import uuid
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chunk(request_id: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None = None,
          logprobs: list[dict] | None = None) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta,
                         "logprobs": None if logprobs is None else {"content": logprobs},
                         "finish_reason": finish_reason}]}


def completion(request_id: str, model: str, created: int, choices: list[dict], usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage_}


def choice(index: int, message: dict, finish_reason: str, logprobs: list[dict] | None) -> dict:
    return {"index": index, "message": message,
            "logprobs": None if logprobs is None else {"content": logprobs}, "finish_reason": finish_reason}


def logprob_entries(tokenizer, token_ids: list[int], entries: list[dict[int, float]], top_n: int) -> list[dict]:
    """OpenAI's logprobs.content items: the sampled token, its logprob, and the top_n alternatives."""
    def item(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}

    out = []
    for token_id, entry in zip(token_ids, entries):
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
        out.append({**item(token_id, entry.get(token_id, float("-inf"))),
                    "top_logprobs": [item(t, lp) for t, lp in top]})
    return out


def now() -> int:
    return int(time.time())


# --- response bodies: built as dicts above; these structs describe them in the OpenAPI document ----------------
class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    """Every 4xx and 5xx answer."""
    error: ErrorDetail


class ToolCall(msgspec.Struct):
    id: str
    type: str
    function: FunctionCall


class ResponseMessage(msgspec.Struct):
    role: str
    content: str | None
    reasoning_content: str | None = None  # with --reasoning-parser; `reasoning` holds the same text
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprob]


class Choice(msgspec.Struct):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletion(msgspec.Struct):
    """The answer to a request without stream."""
    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChunkChoice(msgspec.Struct):
    index: int
    delta: dict  # role, content, reasoning_content / reasoning, tool_calls (index, id, type, function fragments)
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(msgspec.Struct):
    """One `data:` event of a streamed answer (the stream ends with `data: [DONE]`)."""
    id: str
    object: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only in the last chunk, with stream_options.include_usage


def openapi_components() -> dict[str, dict]:
    """JSON Schemas of the request, the answers and the error body, as OpenAPI components."""
    _, components = msgspec.json.schema_components(
        [ChatCompletionRequest, ChatCompletion, ChatCompletionChunk, ErrorResponse],
        ref_template="#/components/schemas/{name}")
    return components
