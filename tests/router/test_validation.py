"""Request validation against a healthy cluster stand-in (no workers, no sockets): what the router refuses with a
400 before dispatch, streamed or not, and that what it accepts is what the wire to the workers can carry."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from common.cluster.protocol import Admit, encode
from router import serving_chat
from router.cluster import RequestState
from router.metrics import RouterMetrics
from router.server import create_app
from tests.support.tiny_models import make_tokenizer

VOCAB = 512
USER = [{"role": "user", "content": "hi"}]


class FakeCluster:
    """Healthy, and answers every choice with one token. What it is given is encoded as the real cluster encodes
    an Admit, so a value the msgpack wire cannot carry fails here as it would at dispatch."""

    def __init__(self):
        self.registry = SimpleNamespace(healthy=True, max_model_len=256, missing_roles=lambda: "",
                                        snapshot=lambda: [])
        self.admitted: list[bytes] = []

    def _state(self, request_id, prompt_ids, params) -> RequestState:
        self.admitted.append(encode(Admit(request_id=f"{request_id}#0", token_ids=prompt_ids, params=params)))
        state = RequestState(request_id, prompt_ids, params, asyncio.Queue())
        state.events.put_nowait(("tokens", [prompt_ids[-1]], "length", None))
        return state

    async def wait_until_healthy(self):
        pass

    async def submit(self, request_id, prompt_ids, params):
        return self._state(request_id, prompt_ids, params)

    def fork(self, parent, request_id, params):
        return self._state(request_id, parent.prompt_ids, params)

    async def abort(self, state):
        state.done = True


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(VOCAB)


@pytest.fixture
def cluster():
    return FakeCluster()


@pytest.fixture
def client(cluster, tokenizer):
    metrics = RouterMetrics("tiny")
    app = create_app(cluster, tokenizer=tokenizer, model_name="tiny", metrics=metrics, vocab_size=VOCAB)
    return TestClient(app, raise_server_exceptions=False)


def post(client, body: dict | bytes, stream: bool = False):
    if isinstance(body, dict):
        body = json.dumps({"messages": USER, "max_tokens": 4, "stream": stream, **body}).encode()
    return client.post("/v1/chat/completions", content=body)


def assert_refused(r, cluster: FakeCluster, param: str | None):
    """A 400 with OpenAI's error body naming param (when given), and nothing sent to a worker."""
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
    assert cluster.admitted == []


def test_a_good_request_is_admitted(client, cluster):
    for stream in (False, True):
        r = post(client, {}, stream)
        assert r.status_code == 200, r.text
    assert len(cluster.admitted) == 2


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field, value", [
    ("seed", 1180591620717411303424), ("seed", -2**70), ("seed", 2**63),
    ("max_tokens", 2**64), ("max_completion_tokens", -2**64), ("n", 2**64), ("top_k", 2**64),
    ("stop_token_ids", [2**64]),
])
def test_integers_beyond_64_bits_are_a_400_naming_the_field(client, cluster, field, value, stream):
    assert_refused(post(client, {field: value}, stream), cluster, field)


def test_top_logprobs_beyond_64_bits(client, cluster):
    assert_refused(post(client, {"logprobs": True, "top_logprobs": 2**64}), cluster, "top_logprobs")


def test_64_bit_extremes_reach_the_wire(client, cluster):
    for seed in (2**63 - 1, -2**63):
        r = post(client, {"seed": seed, "n": 3, "top_k": 2**63 - 1, "temperature": 1.0})
        assert r.status_code == 200, r.text
    assert len(cluster.admitted) == 6


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("bias", [{str(VOCAB): 5}, {"99999999999999999999": 1}, {"\u00b2": 1}, {"-1": 1},
                                  {"1" * 5000: 1}])
def test_logit_bias_outside_the_vocabulary_is_refused_before_dispatch(client, cluster, bias, stream):
    assert_refused(post(client, {"logit_bias": bias}, stream), cluster, "logit_bias")


def test_logit_bias_and_stop_token_ids_inside_the_vocabulary(client, cluster):
    r = post(client, {"logit_bias": {str(VOCAB - 1): 5, "0": -100}, "stop_token_ids": [0, VOCAB - 1]})
    assert r.status_code == 200, r.text
    assert len(cluster.admitted) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_stop_token_ids_outside_the_vocabulary(client, cluster, stream):
    assert_refused(post(client, {"stop_token_ids": [1, VOCAB]}, stream), cluster, "stop_token_ids")


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "system"}, *USER], "messages[0].content"),
    ([{"role": "developer"}, *USER], "messages[0].content"),
    ([*USER, {"role": "assistant"}, *USER], "messages[1].content"),
    ([*USER, {"role": "tool", "tool_call_id": "x"}], "messages[1].content"),
])
def test_messages_without_content(client, cluster, messages, param):
    assert_refused(post(client, {"messages": messages}), cluster, param)


def test_assistant_tool_calls_may_omit_content(client, cluster):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    messages = [*USER, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "2"}]
    r = post(client, {"messages": messages})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body", [
    b'{"messages": [{"role": "user", "content": "hi"}], "unknown": "\xff\xfe"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "x\xc3": 1}',
    b'{"messages": [{"role": "user", "content": "hi \xed\xa0\x80"}]}',  # an encoded surrogate
    b'{"messages": [{"role": "user", "content": "hi"}], "extra": {"k": ["\xc0\xaf"]}}',  # an overlong "/"
])
def test_a_body_that_is_not_utf8_anywhere_is_a_400(client, cluster, body):
    assert_refused(post(client, body), cluster, None)


TOOL = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}


def tool_with(prop: dict) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": prop}}}}


@pytest.mark.parametrize("tool_choice", [None, "auto", "none", "required"])
@pytest.mark.parametrize("tool", [tool_with({"$ref": "#/nope"}), tool_with({"type": "string", "pattern": "(("}),
                                  tool_with({"type": "strin"})])
def test_a_tool_schema_that_does_not_compile_is_a_400_whatever_tool_choice(client, cluster, tool, tool_choice):
    body = {"tools": [TOOL, tool], **({"tool_choice": tool_choice} if tool_choice else {})}
    r = post(client, body)
    assert_refused(r, cluster, "tools[1].function.parameters")
    assert "invalid json_schema" in r.json()["error"]["message"]


def test_tool_schemas_are_compiled_once(client, cluster, monkeypatch):
    compiled = []
    real = serving_chat._schema_error
    monkeypatch.setattr(serving_chat, "_schema_error", lambda text: compiled.append(text) or real(text))
    bad = tool_with({"type": "string", "pattern": "(("})
    for _ in range(3):
        assert post(client, {"tools": [TOOL]}).status_code == 200
        assert post(client, {"tools": [TOOL, bad]}).status_code == 400
    assert len(compiled) == 2  # one per distinct schema: the verdicts, good and bad, are kept
    assert len(cluster.admitted) == 3


def test_required_tools_still_compile_and_run(client, cluster):
    r = post(client, {"tools": [TOOL], "tool_choice": "required"})
    assert r.status_code == 200, r.text
    assert len(cluster.admitted) == 1


def test_nesting_beyond_the_decoder_is_a_400(client, cluster):
    deep = '{"a":' * 5000 + "1" + "}" * 5000
    body = ('{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", '
            '"json_schema": {"schema": ' + deep + "}}}").encode()
    assert_refused(post(client, body), cluster, None)
