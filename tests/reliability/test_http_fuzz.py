"""The router's HTTP API, fuzzed end to end against a real cluster (1 prefill + 2 decode workers, tiny model).

What this module proves:

* Schemathesis, driven by the OpenAPI document the router serves, with positive and negative data on every
  operation, never gets a 5xx; every answer has a documented status and content type and conforms to its
  documented schema (a streamed answer event by event), and every 4xx is OpenAI's error JSON.
* The same holds with the request schema narrowed to what the router accepts (roles, ranges, short prompts), so
  that most generated requests pass validation and generate tokens, streamed and not.
* A corpus of hand-picked bad requests, built as a table: every field of the chat request with its wrong types
  and out-of-range values, bodies that are not JSON objects, truncated JSON, invalid UTF-8, deep nesting, a body
  over --max-request-bytes, wrong methods, unknown paths and wrong content types, each object body sent both
  unstreamed and streamed. Each gets exactly the 4xx of its class, with OpenAI's error JSON naming the field,
  within the client's timeout; a streamed one is refused with that 4xx before any server-sent event.
* After each group every process is still up, the cluster is idle (the router holds no request, no worker holds
  a KV block) and a greedy request answers exactly what it answered before the fuzzing.

Stateful testing: the document declares no links (every operation is independent: nothing an answer returns is
an input of another operation), so schemathesis's state machine has no transition to follow; the test of that
asserts it, rather than running a "stateful" test that would only repeat the calls above.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import json
import time

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                response_schema_conformance, status_code_conformance)

from router.openai_api import MAX_CHOICES, MAX_STOP_STRINGS, ROLES, ChatCompletionRequest, Message
from tests.support.cluster_harness import assert_all_up, assert_idle

CLIENT_TIMEOUT_S = 30.0  # longer than any answer this cluster takes: a request that needs more is hanging
CHEAP_COMPLETION = 4  # tokens a fuzzed request may generate: every valid request runs the model
VOCAB_SIZE = 512  # tests.support.tiny_models.SERVING_TINY
MAX_REQUEST_BYTES = 4 * 2**20  # the router's --max-request-bytes default
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
GREEDY = {"model": "tiny", "messages": [{"role": "user", "content": "alpha beta gamma"}], "max_tokens": 8,
          "temperature": 0}

# Examples per operation and generation mode; together about 30 s of this module on a 2-core box. The GET
# operations take no input, so hypothesis runs them once whatever the budget.
SERVED_EXAMPLES = 80
NARROWED_EXAMPLES = 80
# no shrinking (a failure's first example is reported as found, in bounded time) and no example database (nothing
# is written into the repository, and a run does not depend on an earlier one)
FUZZ_SETTINGS = hypothesis.settings(deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                                    suppress_health_check=list(HealthCheck), print_blob=False)
SCHEMATHESIS_CONFIG = {"output": {"sanitization": {"enabled": False}}}  # show max_tokens, not "[Filtered]"


# --- what every answer must be --------------------------------------------------------------------------------
def openai_error_problem(status: int, content_type: str | None, body: bytes) -> str | None:
    """Why a 4xx/5xx answer is not OpenAI's error JSON, or None when it is."""
    if not (content_type or "").startswith("application/json"):
        return f"a {status} answered as {content_type!r}, not application/json"
    try:
        page = json.loads(body)
    except ValueError:
        return f"a {status} whose body is not JSON: {body[:200]!r}"
    error = page.get("error") if isinstance(page, dict) else None
    if set(page) != {"error"} or not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"a {status} whose body is not {{'error': {{message, type, param, code}}}}: {page!r:.300}"
    if not (isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)):
        return f"a {status} without a message and a type: {error!r:.300}"
    if not all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")):
        return f"a {status} whose param or code is not a string or null: {error!r:.300}"
    return None


def openai_error_body(ctx, response, case):
    """A schemathesis check: every 4xx and 5xx is OpenAI's error JSON."""
    if response.status_code >= 400:
        problem = openai_error_problem(response.status_code, response.headers.get("content-type", [None])[0],
                                       response.content)
        assert problem is None, problem


def sse_events(body: bytes) -> list[str]:
    return [line[len("data: "):] for line in body.decode().split("\n\n") if line.startswith("data: ")]


def whole_stream(ctx, response, case):
    """A schemathesis check: a streamed 200 ends with [DONE] and carries no error event (the cluster is healthy:
    a failure after the status line is a worker's, not the request's)."""
    if response.status_code != 200 or not response.headers.get("content-type", [""])[0].startswith(
            "text/event-stream"):
        return
    events = sse_events(response.content)
    assert events and events[-1] == "[DONE]", f"the stream does not end with [DONE]: {events[-3:]}"
    errors = [e for e in events[:-1] if "error" in json.loads(e)]
    assert not errors, f"a 200 stream with error events: {errors}"


BASE_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
               openai_error_body, whole_stream]


def cap_generation(case, max_model_len: int):
    """Bound what a generated request may cost without hiding its validation: a request whose completion length
    is unset, or set and valid but long, gets CHEAP_COMPLETION tokens; wrong types and out-of-range lengths are
    left alone (they are what the router must refuse, and cost nothing)."""
    body = case.body
    if not isinstance(body, dict):
        return
    asked = body.get("max_completion_tokens")
    asked = body.get("max_tokens") if asked is None else asked  # the router's precedence
    # a whole float (4.0) is an integer to the router too
    whole = isinstance(asked, (int, float)) and not isinstance(asked, bool) and float(asked).is_integer()
    if asked is None or (whole and CHEAP_COMPLETION < asked <= max_model_len):
        body["max_completion_tokens"] = CHEAP_COMPLETION


def fuzz(operation, mode: GenerationMode, examples: int, base_url: str, session: requests.Session,
         max_model_len: int, checks: list) -> collections.Counter:
    """Run `examples` schemathesis cases of one operation; the count of the statuses they got, by streamed-ness."""
    statuses: collections.Counter = collections.Counter()

    @hypothesis.settings(FUZZ_SETTINGS, max_examples=examples)
    @hypothesis.given(case=operation.as_strategy(mode))
    def run(case):
        cap_generation(case, max_model_len)
        response = case.call(base_url=base_url, session=session, timeout=CLIENT_TIMEOUT_S)
        case.validate_response(response, checks=checks)
        streamed = "stream" if isinstance(case.body, dict) and case.body.get("stream") is True else "plain"
        statuses[streamed, response.status_code] += 1

    run()
    return statuses


# --- the cluster before and after ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster.base_url, timeout=CLIENT_TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def greedy_answer(http) -> str:
    """What the greedy request answers before any fuzzing: afterwards it must answer the same."""
    r = http.post(CHAT, json=GREEDY)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def max_model_len(http) -> int:
    return http.get("/v1/models").json()["data"][0]["max_model_len"]


@pytest.fixture(scope="module")
def document(http) -> dict:
    r = http.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def assert_cluster_recovers(cluster, http, greedy_answer: str):
    """No process died, nothing is left registered or held, and a greedy request answers as before."""
    assert_all_up(cluster)
    assert_idle(cluster)
    r = http.post(CHAT, json=GREEDY)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == greedy_answer and choice["finish_reason"] in ("stop", "length")
    assert_idle(cluster)


# --- schemathesis -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_schemathesis_against_the_served_document(cluster, http, greedy_answer, max_model_len, mode):
    schema = schemathesis.openapi.from_url(cluster.base_url + "/openapi.json",
                                           config=schemathesis.Config.from_dict(SCHEMATHESIS_CONFIG))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == {
        ("GET", "/health"), ("GET", "/ready"), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/cluster"),
        ("GET", "/debug/desired-replicas"), ("POST", "/admin/workers/{worker_id}/drain"), ("POST", CHAT)}
    checks = BASE_CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    with requests.Session() as session:
        for op in operations:
            if mode is GenerationMode.NEGATIVE and op.path != CHAT:
                continue  # no other operation takes a body (the admin one a path id only): nothing to make invalid
            examples = SERVED_EXAMPLES if op.path == CHAT else 3
            statuses = fuzz(op, mode, examples, cluster.base_url, session, max_model_len, checks)
            assert sum(statuses.values()) >= (SERVED_EXAMPLES // 2 if op.path == CHAT else 1), (op.path, statuses)
            if op.path == CHAT and mode is GenerationMode.NEGATIVE:
                assert all(400 <= status < 500 for _, status in statuses), statuses
    assert_cluster_recovers(cluster, http, greedy_answer)


def narrowed_request_schema(document: dict) -> dict:
    """The served document with the chat request narrowed to what the router accepts: known roles, a content for
    every message, values in range, short prompts, a few tokens of completion, no constraint that would not
    compile, top_logprobs only with logprobs. Cross-field rules it does not say (tool_choice needs tools, the
    template's order of roles) are left to chance, so some of these requests are still 400s."""
    doc = copy.deepcopy(document)
    schemas = doc["components"]["schemas"]

    def ref(name: str) -> dict:
        return {"$ref": f"#/components/schemas/{name}"}

    def optional(schema: dict) -> dict:
        return {"anyOf": [schema, {"type": "null"}]}

    def number(low: float, high: float, low_excluded: bool = False) -> dict:
        return {"type": "number", "exclusiveMinimum" if low_excluded else "minimum": low, "maximum": high}

    text = {"type": "string", "maxLength": 40}
    token_id = {"type": "integer", "minimum": 0, "maximum": VOCAB_SIZE - 1}
    schemas["ContentPart"] = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
                              "properties": {"type": {"const": "text"}, "text": text}}
    schemas["Message"] = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
                          "properties": {"role": {"enum": sorted(ROLES)}, "name": optional(text),
                                         "content": {"anyOf": [text, {"type": "array", "items": ref("ContentPart"),
                                                                      "maxItems": 2}]}}}
    parameters = {"const": {"type": "object", "properties": {"city": {"type": "string"}}}}
    schemas["FunctionDef"] = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "pattern": "^[a-z_]{1,12}$"}, "parameters": optional(parameters),
        "strict": optional({"type": "boolean"})}}
    schemas["Tool"] = {"type": "object", "required": ["function"], "additionalProperties": False,
                       "properties": {"type": {"const": "function"}, "function": ref("FunctionDef")}}
    schemas["ResponseFormat"] = {"anyOf": [
        {"type": "object", "required": ["type"], "additionalProperties": False,
         "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "additionalProperties": False,
         "properties": {"type": {"const": "json_schema"}, "json_schema": {
             "type": "object", "required": ["schema"], "additionalProperties": False,
             "properties": {"name": text, "schema": parameters}}}}]}
    request = schemas["ChatCompletionRequest"]
    request["required"] = ["messages", "max_completion_tokens", "stream"]  # stream half the time
    request["dependentRequired"] = {"top_logprobs": ["logprobs"]}
    request["additionalProperties"] = False
    request["properties"].update({
        "messages": {"type": "array", "items": ref("Message"), "minItems": 1, "maxItems": 3},
        "model": optional({"const": "tiny"}),
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": CHEAP_COMPLETION},
        "max_tokens": optional({"type": "integer", "minimum": 1, "maximum": 2 * CHEAP_COMPLETION}),
        "n": optional({"type": "integer", "minimum": 1, "maximum": 3}),
        "temperature": optional(number(0, 2)), "top_p": optional(number(0, 1, low_excluded=True)),
        "top_k": optional({"type": "integer", "minimum": -1, "maximum": 50}), "min_p": optional(number(0, 1)),
        "presence_penalty": optional(number(-2, 2)), "frequency_penalty": optional(number(-2, 2)),
        "repetition_penalty": optional(number(0, 10, low_excluded=True)),
        "logprobs": {"const": True}, "top_logprobs": optional({"type": "integer", "minimum": 0, "maximum": 5}),
        "logit_bias": optional({"type": "object", "maxProperties": 3,
                                "propertyNames": {"pattern": "^(0|[1-9][0-9]?|[1-4][0-9][0-9])$"},  # ids < 500
                                "additionalProperties": number(-100, 100)}),
        "stop": optional({"anyOf": [{"type": "string", "minLength": 1, "maxLength": 8},
                                    {"type": "array", "maxItems": MAX_STOP_STRINGS,
                                     "items": {"type": "string", "minLength": 1, "maxLength": 8}}]}),
        "stop_token_ids": optional({"type": "array", "items": token_id, "maxItems": 3}),
        "tools": optional({"type": "array", "items": ref("Tool"), "maxItems": 2}),
        "tool_choice": optional({"anyOf": [{"enum": ["none", "auto", "required"]}, ref("NamedToolChoice")]}),
        "chat_template_kwargs": {"type": "null"}, "structured_outputs": {"type": "null"},
        "user": optional(text),
    })
    return doc


def test_schemathesis_with_the_request_schema_narrowed_to_what_the_router_accepts(
        cluster, http, greedy_answer, max_model_len, document):
    schema = schemathesis.openapi.from_dict(narrowed_request_schema(document),
                                            config=schemathesis.Config.from_dict(SCHEMATHESIS_CONFIG))
    with requests.Session() as session:
        statuses = fuzz(schema[CHAT]["POST"], GenerationMode.POSITIVE, NARROWED_EXAMPLES, cluster.base_url, session,
                        max_model_len, BASE_CHECKS)
    # the narrowed schema reaches generation, streamed and not; what is refused is refused as invalid
    assert statuses["plain", 200] >= 5 and statuses["stream", 200] >= 5, statuses
    assert {status for _, status in statuses} <= {200, 400}, statuses
    assert_cluster_recovers(cluster, http, greedy_answer)


def test_the_document_gives_stateful_testing_no_links_to_follow(document):
    links = [(path, method, status) for path, item in document["paths"].items() for method, op in item.items()
             for status, answer in op.get("responses", {}).items() if answer.get("links")]
    assert links == []
    machine = schemathesis.openapi.from_dict(document).as_state_machine()
    assert machine.bundles == {}  # no transition between operations, declared or inferred


def test_integers_written_as_whole_floats_are_integers(http):
    """JSON Schema, and so the router's document, counts 4.0 as an integer (schemathesis writes integers so): the
    router serves it as 4, where a fraction stays a 400 (the corpus)."""
    r = http.post(CHAT, json={**GREEDY, "max_tokens": 3.0, "n": 2.0, "seed": 1e0, "top_k": -1.0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    page = r.json()
    assert len(page["choices"]) == 2 and page["usage"]["completion_tokens"] == 2 * 3
    r = http.post(CHAT, json={**GREEDY, "max_completion_tokens": 2.0, "stop_token_ids": [1.0, 2e0], "top_logprobs": 1.0,
                              "logprobs": True})
    assert r.status_code == 200, r.text


# --- the corpus of bad requests ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BadRequest:
    name: str
    body: bytes | None
    status: int
    param: str | None = None  # the OpenAI error's param; checked for every case
    method: str = "POST"
    path: str = CHAT
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    code: str | None = None
    streamed: bool = False  # the body asks for a stream: it must be refused before any event


SAMPLES = {"string": "x", "integer": 7, "number": 0.5, "boolean": True, "array": ["x"], "object": {"k": "v"},
           "null": None}
NULLABLE_TEXT = {"string", "null"}
NULLABLE_BOOL = {"boolean", "null"}
NULLABLE_INT = {"integer", "null"}
NULLABLE_NUMBER = {"integer", "number", "null"}  # a JSON integer is a number
NULLABLE_OBJECT = {"object", "null"}
NULLABLE_ARRAY = {"array", "null"}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def field_types() -> list[tuple[str, set[str]]]:
    """(field, the JSON types it accepts) for every field of the chat request (router.openai_api)."""
    return [
        ("model", NULLABLE_TEXT), ("messages", {"array"}), ("stream", {"boolean"}),
        ("stream_options", NULLABLE_OBJECT), ("max_tokens", NULLABLE_INT), ("max_completion_tokens", NULLABLE_INT),
        ("temperature", NULLABLE_NUMBER), ("top_p", NULLABLE_NUMBER), ("seed", NULLABLE_INT),
        ("stop", {"string", "array", "null"}), ("presence_penalty", NULLABLE_NUMBER),
        ("frequency_penalty", NULLABLE_NUMBER), ("n", NULLABLE_INT), ("logprobs", NULLABLE_BOOL),
        ("top_logprobs", NULLABLE_INT), ("logit_bias", NULLABLE_OBJECT), ("response_format", NULLABLE_OBJECT),
        ("tools", NULLABLE_ARRAY), ("tool_choice", {"string", "object", "null"}),
        ("parallel_tool_calls", NULLABLE_BOOL), ("chat_template_kwargs", NULLABLE_OBJECT),
        ("structured_outputs", NULLABLE_OBJECT), ("user", NULLABLE_TEXT), ("top_k", NULLABLE_INT),
        ("min_p", NULLABLE_NUMBER), ("repetition_penalty", NULLABLE_NUMBER), ("ignore_eos", {"boolean"}),
        ("stop_token_ids", NULLABLE_ARRAY), ("skip_special_tokens", {"boolean"}),
    ]


MESSAGE_FIELD_TYPES = [("role", {"string"}), ("content", {"string", "array", "null"}), ("name", NULLABLE_TEXT),
                       ("tool_calls", NULLABLE_ARRAY), ("tool_call_id", NULLABLE_TEXT),
                       ("reasoning_content", NULLABLE_TEXT), ("reasoning", NULLABLE_TEXT)]


def out_of_range(max_model_len: int) -> list[tuple[str, dict, str | None, int]]:
    """(name, the fields that make a request bad, the param its error names, the status) for values of the right
    type that the router must refuse."""
    def bad(field: str, *values, param: str | None = None, status: int = 400, extra: dict | None = None):
        also = f" with {extra}" if extra else ""
        return [(f"{field}={v!r:.60}{also}", {field: v, **(extra or {})}, param or field, status) for v in values]

    huge_ints = (2**63, -2**63 - 1, 10**30)  # beyond what the workers' msgpack wire carries
    return [
        *bad("model", "gpt-9", "", "TINY", "tiny ", status=404),
        *bad("messages", []),
        *bad("max_tokens", 0, -1, max_model_len, 2**62, *huge_ints),
        *bad("max_tokens", 0.0, 1e300),  # whole floats are integers, and as such out of range
        *bad("n", float(MAX_CHOICES + 1)),
        *bad("max_completion_tokens", 0, -5, max_model_len, *huge_ints),
        *bad("max_completion_tokens", 0, extra={"max_tokens": 4}),  # it wins over max_tokens, and is the param
        *bad("temperature", -0.1, 2.01, 1e308, -1e308),
        *bad("top_p", 0, -0.5, 1.01, 1e308),
        *bad("top_k", -2, -100, *huge_ints),
        *bad("min_p", -0.1, 1.1),
        *bad("presence_penalty", -2.1, 2.1, 1e308),
        *bad("frequency_penalty", -2.1, 2.1, -1e308),
        *bad("repetition_penalty", 0, -1, 10.5),
        *bad("n", 0, -1, MAX_CHOICES + 1, *huge_ints),
        *bad("seed", *huge_ints),
        *bad("top_logprobs", 2),  # without logprobs
        *bad("top_logprobs", -1, 21, 2**63, extra={"logprobs": True}),
        *bad("stop", "", [""], ["a", "b", "c", "d", "e"]),
        *bad("stop_token_ids", [-1], [VOCAB_SIZE], [0, 2**62]),
        *bad("logit_bias", {"x": 1}, {"-1": 1}, {str(VOCAB_SIZE): 1}, {"1": 101}, {"1": -100.5}, {"²": 1},
             {"9" * 20: 1}, {"": 0}),
        *bad("response_format", {"type": "xml"}, {"type": "json_schema"},
             {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
        *bad("structured_outputs", {}, {"regex": "a", "grammar": "b"}, {"regex": "("}, {"grammar": "root ::= "},
             {"json": {"type": "nonsense"}}),
        *bad("tools", [TOOL, TOOL]),  # names must be unique
        *bad("tools", [{"type": "retrieval", "function": {"name": "f"}}], param="tools[0].type"),
        *bad("tools", [{"function": {"name": n}} for n in ("bad name!", "", "x" * 65, "é")],
             param="tools[0].function.name"),
        *bad("tools", [{"function": {"name": "f", "parameters": p}} for p in (
            {"type": "string"}, {"type": "object", "properties": {"a": {"type": "nonsense"}}})],
             param="tools[0].function.parameters"),
        *bad("tool_choice", "sometimes", "auto", "required", {"type": "function", "function": {"name": "f"}}),
        *bad("tool_choice", {"type": "function", "function": {"name": "other"}}, extra={"tools": [TOOL]}),
        *bad("chat_template_kwargs", {"chat_template": "{% for i in range(99999) %}{% for j in range(99999) %}"
                                                       "{% endfor %}{% endfor %}"},
             {"tokenize": True}, {"return_dict": True}, {"tools": []}, {"add_generation_prompt": False},
             {"continue_final_message": True}, {"conversation": []}, {"documents": []}),
        # a template variable nested deeper than the template's rendering recurses: the messages cannot render
        *bad("chat_template_kwargs", {"nested": json.loads("[" * 600 + "]" * 600)}, param="messages"),
    ]


def malformed_fields() -> list[tuple[str, dict, str]]:
    """(name, fields, param) of values whose inner structure is wrong (an element, a nested field)."""
    def case(name: str, param: str, **fields):
        return name, fields, param

    message = USER[0]
    return [
        case("messages=[1]", "messages[0]", messages=[1]),
        case("messages=['hi']", "messages[0]", messages=["hi"]),
        case("messages=[null]", "messages[0]", messages=[None]),
        case("messages=[[]]", "messages[0]", messages=[[]]),
        case("a message without role", "messages[0]", messages=[{"content": "hi"}]),
        *[case(f"role={role!r}", "messages[0].role", messages=[{"role": role, "content": "hi"}])
          for role in ("wizard", "", "USER", "user ", "function")],
        case("the second message's role", "messages[1].role",
             messages=[message, {"role": "nobody", "content": "x"}]),
        *[case(f"a {role} message without content", "messages[0].content", messages=[{"role": role}])
          for role in sorted(ROLES)],
        case("a user message with content null", "messages[0].content",
             messages=[{"role": "user", "content": None}]),
        case("an assistant message with tool_calls []", "messages[1].content",
             messages=[message, {"role": "assistant", "tool_calls": []}]),
        case("an image part", "messages[0].content",
             messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        case("a text part without text", "messages[0].content",
             messages=[{"role": "user", "content": [{"type": "text"}]}]),
        case("a part without type", "messages[0].content[0]", messages=[{"role": "user", "content": [{"text": "x"}]}]),
        case("a part of type 1", "messages[0].content[0].type",
             messages=[{"role": "user", "content": [{"type": 1, "text": "x"}]}]),
        case("a part whose text is 5", "messages[0].content[0].text",
             messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        case("a part that is a string", "messages[0].content[0]", messages=[{"role": "user", "content": ["x"]}]),
        case("a tool call without function", "messages[0].tool_calls[0]",
             messages=[{"role": "assistant", "tool_calls": [{}]}]),
        case("a tool call without arguments", "messages[0].tool_calls[0].function",
             messages=[{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]),
        case("a tool call named 1", "messages[0].tool_calls[0].function.name",
             messages=[{"role": "assistant", "tool_calls": [{"function": {"name": 1, "arguments": "{}"}}]}]),
        case("tool call arguments as an object", "messages[0].tool_calls[0].function.arguments",
             messages=[{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]),
        case("stop=[1]", "stop[0]", stop=[1]),
        case("stop=[null]", "stop[0]", stop=[None]),
        case("stop_token_ids=['1']", "stop_token_ids[0]", stop_token_ids=["1"]),
        case("stop_token_ids=[1.5]", "stop_token_ids[0]", stop_token_ids=[1.5]),
        case("stop_token_ids=[2**63]", "stop_token_ids[0]", stop_token_ids=[2**63]),
        case("logit_bias value 'x'", "logit_bias[...]", logit_bias={"1": "x"}),
        case("logit_bias value null", "logit_bias[...]", logit_bias={"1": None}),
        case("response_format {}", "response_format", response_format={}),
        case("response_format.type 1", "response_format.type", response_format={"type": 1}),
        case("response_format.json_schema 'x'", "response_format.json_schema",
             response_format={"type": "json_schema", "json_schema": "x"}),
        case("response_format.json_schema.schema 5", "response_format.json_schema.schema",
             response_format={"type": "json_schema", "json_schema": {"schema": 5}}),
        case("structured_outputs.regex 1", "structured_outputs.regex", structured_outputs={"regex": 1}),
        case("stream_options.include_usage 'yes'", "stream_options.include_usage",
             stream_options={"include_usage": "yes"}),
        case("stream_options.include_usage null", "stream_options.include_usage",
             stream_options={"include_usage": None}),
        case("tools=[{}]", "tools[0]", tools=[{}]),
        case("tools=[1]", "tools[0]", tools=[1]),
        case("a tool without name", "tools[0].function", tools=[{"function": {}}]),
        case("a tool named 5", "tools[0].function.name", tools=[{"function": {"name": 5}}]),
        case("a tool's parameters 'x'", "tools[0].function.parameters",
             tools=[{"function": {"name": "f", "parameters": "x"}}]),
        case("a tool's strict 'yes'", "tools[0].function.strict", tools=[{"function": {"name": "f", "strict": "y"}}]),
        case("a tool's description 5", "tools[0].function.description",
             tools=[{"function": {"name": "f", "description": 5}}]),
        case("tool_choice {}", "tool_choice", tool_choice={}),
        case("tool_choice without a name", "tool_choice.function", tool_choice={"function": {}}),
    ]


def chat_body(fields: dict, stream: bool | None) -> dict:
    body = {"model": "tiny", "messages": USER, "max_tokens": CHEAP_COMPLETION, "temperature": 0, **fields}
    if stream is not None:
        body["stream"] = stream
    return body


def encoded(body) -> bytes:
    return json.dumps(body, allow_nan=False).encode()


PLACEHOLDER = "@@"


def spliced(fields: dict, stream: bool, raw: bytes) -> bytes:
    """A request body with raw bytes where fields hold PLACEHOLDER (a key or a value): what json.dumps cannot
    write (invalid UTF-8, 1e999, nesting deeper than Python recurses)."""
    body = encoded(chat_body(fields, stream))
    assert body.count(f'"{PLACEHOLDER}"'.encode()) == 1
    return body.replace(f'"{PLACEHOLDER}"'.encode(), raw)


def field_cases(max_model_len: int) -> list[BadRequest]:
    """Every field's wrong types and bad values, each body sent unstreamed and streamed."""
    variants: list[tuple[str, dict, str | None, int]] = []
    for field, accepted in field_types():
        variants += [(f"{field}: {kind}", {field: SAMPLES[kind]}, field, 400)
                     for kind in SAMPLES if kind not in accepted]
    for field, accepted in MESSAGE_FIELD_TYPES:
        variants += [(f"messages[0].{field}: {kind}", {"messages": [{**USER[0], field: SAMPLES[kind]}]},
                      f"messages[0].{field}", 400) for kind in SAMPLES if kind not in accepted]
    variants += out_of_range(max_model_len)
    variants += [(name, fields, param, 400) for name, fields, param in malformed_fields()]
    cases = []
    for name, fields, param, status in variants:
        asked = fields.get("max_completion_tokens", fields.get("max_tokens"))  # the router's precedence
        too_long = isinstance(asked, int) and max_model_len <= asked < 2**63  # in range of the wire, not the model
        code = "model_not_found" if status == 404 else "context_length_exceeded" if too_long else None
        # a field that decides the stream itself is sent as it is; every other body both ways
        streams = [None] if "stream" in fields else [False, True]
        cases += [BadRequest(f"{name} ({'streamed' if stream else 'unstreamed'})", encoded(chat_body(fields, stream)),
                             status, param, code=code, streamed=bool(stream)) for stream in streams]
    return cases


def body_cases() -> list[BadRequest]:
    """Bodies that are not a JSON object of the request: other JSON, broken JSON, bad bytes, deep nesting, too
    many bytes; an object body sent unstreamed and streamed."""
    cases = [BadRequest(f"JSON {text}", text.encode(), 400)
             for text in ("[]", "[1, 2]", '"messages"', "1", "1.5", "true", "false", "null", "{}")]
    good = encoded(chat_body({}, None))
    cases += [BadRequest(f"truncated at byte {n}", good[:n], 400) for n in (0, 1, 10, len(good) // 2, len(good) - 1)]
    cases += [BadRequest(f"not JSON: {text!r}", text, 400) for text in (
        b" ", b"{not json", b"{'messages': []}", b'{"messages": [],}', b'{"messages": NaN}',
        b'{"max_tokens": Infinity}', b'{"messages": [] /* comment */}', good + b" trailing", good + good,
        b"\xef\xbb\xbf" + good, b"messages=hi&max_tokens=4")]
    deep_array, deep_object = b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    user_says = {"messages": [{"role": "user", "content": PLACEHOLDER}]}
    spliced_cases = [  # (name, fields with PLACEHOLDER, what replaces it, param)
        *[(f"invalid UTF-8 {raw!r} in a string", user_says, b'"' + raw + b'"', None) for raw in (
            b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\x80")],
        ("invalid UTF-8 under an unknown key", {"x": PLACEHOLDER}, b'"\xfe"', None),
        ("invalid UTF-8 in a key", {PLACEHOLDER: 1}, b'"\xfe"', None),
        ("a lone surrogate escape", user_says, b'"\\ud800"', None),
        ("NaN", {"temperature": PLACEHOLDER}, b"NaN", None),
        *[(f"{field} 1e999", fields, b"1e999", param) for field, fields, param in [
            ("temperature", {"temperature": PLACEHOLDER}, "temperature"), ("top_p", {"top_p": PLACEHOLDER}, "top_p"),
            ("max_tokens", {"max_tokens": PLACEHOLDER}, "max_tokens"),
            ("a logit_bias value", {"logit_bias": {"1": PLACEHOLDER}}, "logit_bias[...]")]],
        ("arrays nested 100000 deep under an unknown key", {"x": PLACEHOLDER}, deep_array, None),
        ("objects nested 100000 deep under an unknown key", {"x": PLACEHOLDER}, deep_object, None),
        ("arrays nested 100000 deep in chat_template_kwargs", {"chat_template_kwargs": {"a": PLACEHOLDER}},
         deep_array, None),
        ("a tool schema nested 100000 deep", {"tools": [{"function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": PLACEHOLDER}}}}]}, deep_object, None),
        # typed decoding stops at the first element that is not a part, before any recursion
        ("a content list nested 100000 deep", user_says, deep_array, "messages[0].content[0]"),
    ]
    for stream in (False, True):
        how = "streamed" if stream else "unstreamed"
        cases += [BadRequest(f"{name} ({how})", spliced(fields, stream, raw), 400, param, streamed=stream)
                  for name, fields, raw, param in spliced_cases]
        over_limit = encoded(chat_body({"messages": [{"role": "user", "content": "a" * MAX_REQUEST_BYTES}]}, stream))
        cases.append(BadRequest(f"{len(over_limit)} bytes, over --max-request-bytes ({how})", over_limit, 413,
                                streamed=stream))
    return cases


def http_cases() -> list[BadRequest]:
    """Wrong methods, unknown paths, wrong content types (with a valid body, unstreamed and streamed)."""
    good = encoded(chat_body({}, None))
    cases = [BadRequest(f"{method} {CHAT}", good if method in ("PUT", "PATCH") else None, 405, method=method)
             for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS")]
    cases += [BadRequest(f"{method} {path}", good, 405, method=method, path=path)
              for method, path in [("POST", "/v1/models"), ("PUT", "/v1/models"), ("DELETE", "/v1/models"),
                                   ("POST", "/health"), ("POST", "/metrics"), ("POST", "/cluster"),
                                   ("DELETE", "/cluster")]]
    cases += [BadRequest(f"POST {path}", good, 404, path=path) for path in (
        "/v1/completions", "/v1/chat/completion", CHAT + "/x", "/v2/chat/completions", "/V1/chat/completions",
        "/v1/embeddings", "/v1/responses", "/", "/v1", "/v1/models/tiny", "//v1/chat/completions", CHAT + "%00")]
    cases += [BadRequest(f"GET {path}", None, 404, method="GET", path=path)
              for path in ("/v1/models/tiny", "/openapi.yaml", "/v1/health")]
    for stream in (False, True):
        body = encoded(chat_body({}, stream))
        cases += [BadRequest(f"Content-Type {ctype} ({'streamed' if stream else 'unstreamed'})", body, 415,
                             headers=(("content-type", ctype),), streamed=stream)
                  for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                "application/xml", "application/octet-stream", "text/json", "application/jsonx",
                                "json")]
    return cases


def corpus(max_model_len: int) -> list[BadRequest]:
    return field_cases(max_model_len) + body_cases() + http_cases()


def problems_of(case: BadRequest, r: httpx.Response, elapsed: float) -> list[str]:
    """What is wrong with the answer to a bad request (nothing when it is the refusal its class must get)."""
    found = []
    if r.status_code != case.status:
        found.append(f"status {r.status_code}, not {case.status}")
    if case.streamed and r.headers.get("content-type", "").startswith("text/event-stream"):
        found.append("answered with a stream of events")
    problem = openai_error_problem(r.status_code, r.headers.get("content-type"), r.content)
    if problem:
        return found + [problem]
    error = r.json()["error"]
    if error["param"] != case.param:
        found.append(f"param {error['param']!r}, not {case.param!r}")
    if error["code"] != case.code:
        found.append(f"code {error['code']!r}, not {case.code!r}")
    expected_type = "not_found_error" if case.status == 404 and case.path != CHAT else "invalid_request_error"
    if error["type"] != expected_type:
        found.append(f"type {error['type']!r}, not {expected_type!r}")
    if case.status == 405 and not r.headers.get("allow"):
        found.append("a 405 without Allow")
    if elapsed > CLIENT_TIMEOUT_S / 2:  # a refusal takes milliseconds: one this slow waited on something
        found.append(f"answered after {elapsed:.1f} s")
    return [f"{p} ({error['message'][:120]!r})" for p in found]


def test_every_bad_request_of_the_corpus_gets_its_4xx(cluster, http, greedy_answer, max_model_len):
    # every field of the request and of a message has its wrong types in the table
    assert sorted(f for f, _ in field_types()) == sorted(ChatCompletionRequest.__struct_fields__)
    assert sorted(f for f, _ in MESSAGE_FIELD_TYPES) == sorted(Message.__struct_fields__)
    cases = corpus(max_model_len)
    assert len(cases) >= 300 and len({c.name for c in cases}) == len(cases)
    failures = []
    for case in cases:
        started = time.monotonic()
        try:
            r = http.request(case.method, case.path, content=case.body, headers=dict(case.headers))
        except httpx.HTTPError as e:  # a timeout is a hang; a dropped connection is no answer
            failures.append(f"{case.name}: {type(e).__name__}: {e}")
            continue
        failures += [f"{case.name}: {p}" for p in problems_of(case, r, time.monotonic() - started)]
    assert not failures, f"{len(failures)} of {len(cases)} bad requests were answered wrongly:\n" + "\n".join(
        failures)
    assert_cluster_recovers(cluster, http, greedy_answer)
