"""Tool calling and reasoning through a real 1P1D cluster, on a tiny model whose chat template (written here, in
the Qwen3 style) renders tools, assistant tool calls, tool results and thinking."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.support.cluster_harness import LocalCluster
from tests.support.tiny_models import SERVING_TINY
from tests.engine.test_grammar import PARAMS, TOOLS, check

TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}Tools you may call, one <tool_call>{"name": ..., "arguments": ...}</tool_call> per call:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}<|im_start|>assistant
{% if message.reasoning_content %}<think>
{{ message.reasoning_content }}
</think>

{% endif %}{{ message.content or '' }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {% if call.function.arguments is string %}\
{{ call.function.arguments }}{% else %}{{ call.function.arguments | tojson }}{% endif %}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role != 'system' %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking %}<think>
{% endif %}{% endif %}"""

ASK = [{"role": "user", "content": "weather in paris please"}]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-tools")
    shutil.copytree(tiny_model_factory(SERVING_TINY), folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return str(folder)


@pytest.fixture(scope="module")
def cluster(model_dir):
    with LocalCluster(model_dir, 1, 1, transport="zmq", router_args=("--reasoning-parser", "qwen3")) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    return cluster.openai()


def streamed(client, **kw) -> dict:
    """Reassemble a streamed response the way OpenAI clients do."""
    content, reasoning, calls, finish = [], [], {}, None
    for chunk in client.chat.completions.create(model="tiny", stream=True, **kw):
        for c in chunk.choices:
            d = c.delta
            content.append(d.content or "")
            reasoning.append(getattr(d, "reasoning_content", None) or "")
            for tc in d.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    assert call["id"] is None, "id and name come once, first"
                    call["id"], call["name"] = tc.id, tc.function.name
                call["arguments"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    return {"content": "".join(content), "reasoning": "".join(reasoning),
            "calls": [calls[i] for i in sorted(calls)], "finish": finish}


def calls_of(message) -> list[dict]:
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_validate_and_stream_the_same(client, tool_choice):
    for seed in range(4):
        # one call: a random model never chooses to stop after its calls, so "several" would run to max_tokens
        kw = dict(messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=seed, max_tokens=400,
                  parallel_tool_calls=False)
        got = client.chat.completions.create(model="tiny", **kw)
        choice = got.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = calls_of(choice.message)
        assert calls and not choice.message.content
        for call in calls:
            assert call["id"].startswith("call_")
            check(json.loads(call["arguments"]), PARAMS[call["name"]])
            if isinstance(tool_choice, dict):
                assert call["name"] == "add"
        assert len(calls) == 1
        s = streamed(client, **kw)
        assert s["finish"] == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in s["calls"]] == [(c["name"], c["arguments"]) for c in calls]


def test_tool_choice_none_never_calls(client):
    for seed in range(3):
        got = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                             temperature=1.0, seed=seed, max_tokens=40)
        assert got.choices[0].message.tool_calls is None and got.choices[0].finish_reason != "tool_calls"


def test_tool_history_renders_through_the_template(client, model_dir):
    from transformers import AutoTokenizer

    history = ASK + [
        {"role": "assistant", "content": "", "reasoning_content": "they want weather",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    got = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4, temperature=0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    for m in history:
        for c in m.get("tool_calls", []):
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    rendered = tok.apply_chat_template(history, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "21 degrees" in rendered and '"city": "paris"' in rendered and "they want weather" in rendered
    assert got.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))


@pytest.mark.parametrize("thinking_in_prompt, pattern", [
    (True, r"[a-z ]{4,20}</think>\n\n[a-z ]{4,20}"),  # the template opened <think> (R1 style)
    (False, r"<think>[a-z ]{4,20}</think>\n[a-z ]{4,20}"),  # the output opens it itself
])
def test_reasoning_is_split_streamed_and_not(client, thinking_in_prompt, pattern):
    kw = dict(messages=ASK, temperature=1.0, seed=5, max_tokens=200,
              extra_body={"chat_template_kwargs": {"enable_thinking": thinking_in_prompt},
                          "structured_outputs": {"regex": pattern}})
    got = client.chat.completions.create(model="tiny", **kw).choices[0].message
    reasoning = got.reasoning_content
    assert reasoning and got.content
    assert "think>" not in got.content and "think>" not in reasoning
    assert getattr(got, "reasoning", None) == reasoning  # both names clients look for
    s = streamed(client, **kw)
    assert (s["reasoning"].strip(), s["content"].strip()) == (reasoning.strip(), got.content.strip())
    assert "think>" not in s["content"]


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}], "tool_choice": "required"},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS + TOOLS}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
])
def test_bad_tool_definitions(cluster, body, param):
    status, _, got = cluster.post("/v1/chat/completions", {"model": "tiny", "messages": ASK, **body})
    assert status == 400 and got["error"]["param"] == param, got
