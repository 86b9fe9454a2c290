"""HermesToolParser: streamed deltas, however the text is chunked, reassemble to exactly parse()."""
from __future__ import annotations

import json
import re

import pytest

from router.text.tool_parsers import (TOOL_PARSERS, ContentDelta, HermesToolParser, ToolCall, ToolCallDelta,
                                 get_tool_parser)
from tests.router.test_reasoning import chunkings

NESTED_ARGS = ('{"q": {"deep": [1, [2, {"x": "}]{["}], {}], "t": true, "n": null, "f": -1.5e3},'
               ' "s": "she said \\"hi\\" then </tool_call> and <tool_call> {", "b": "back\\\\slash\\\\"}')
UNICODE_ARGS = '{"city": "東京", "note": "naïve café 🎉 \\u00e9 𝔘", "emoji": ["✓", "Ω≈ç"]}'
SPACY_ARGS = '{ "a" :  1 ,\n\t"b": [ ] ,"c":{}}'

# (model output, expected content, expected [(name, arguments)])
CASES = [
    ("No tools needed here.", "No tools needed here.", []),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.", [("get_weather", '{"city": "Paris"}')]),
    ('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": '
     '{"y": [2]}}\n</tool_call>', "", [("a", '{"x": 1}'), ("b", '{"y": [2]}')]),
    (f'<tool_call>{{"name": "deep", "arguments": {NESTED_ARGS}}}</tool_call>', "", [("deep", NESTED_ARGS)]),
    (f'<tool_call>{{"name": "geo", "arguments": {UNICODE_ARGS}}}</tool_call>', "", [("geo", UNICODE_ARGS)]),
    (f'<tool_call>{{"name":"s","arguments":{SPACY_ARGS} }}</tool_call>', "", [("s", SPACY_ARGS)]),
    ('<tool_call>{"arguments": {"k": "v"}, "name": "late_name"}</tool_call>', "", [("late_name", '{"k": "v"}')]),
    ('<tool_call>{"name": "noargs"}</tool_call>', "", [("noargs", "{}")]),
    ('<tool_call>{"id": 7, "name": "extra", "meta": [1, {"a": "}"}], "arguments": {"z": 0}, "w": null}</tool_call>',
     "", [("extra", '{"z": 0}')]),
    ('<tool_call>{"name": "esc\\u00e9\\"q", "arguments": {}}</tool_call>', "", [('escé"q', "{}")]),
    # The model stopped (end token) without the closing tag, or went straight on to the next call.
    ('<tool_call>\n{"name": "eos", "arguments": {"a": 1}}\n', "", [("eos", '{"a": 1}')]),
    ('<tool_call>{"name": "a", "arguments": {}}<tool_call>{"name": "b", "arguments": {}}</tool_call>', "",
     [("a", "{}"), ("b", "{}")]),
    ('Before.\n\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\nAfter  <b>text</b> \n',
     "Before.\n\n\n\nAfter  <b>text</b>", [("f", "{}")]),
    # Not calls: kept as content, tags and all.
    ("<tool_call>not json</tool_call> ok", "<tool_call>not json</tool_call> ok", []),
    ('<tool_call>{"arguments": {"a": 1}}</tool_call>', '<tool_call>{"arguments": {"a": 1}}</tool_call>', []),
    ('<tool_call>{"name": 3, "arguments": {}}</tool_call>x', '<tool_call>{"name": 3, "arguments": {}}</tool_call>x',
     []),
    ('<tool_call>{"name": "f", "arguments": "{}"}</tool_call>',
     '<tool_call>{"name": "f", "arguments": "{}"}</tool_call>', []),
    ('<tool_call>{"name" "f"}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>',
     '<tool_call>{"name" "f"}</tool_call>', [("g", "{}")]),
    ("<tool_call>{bad <tool_call>{\"name\": \"g\"}</tool_call>", "<tool_call>{bad", [("g", "{}")]),
    ("stray </tool_call> and <tool_ca", "stray </tool_call> and <tool_ca", []),
    # Cut off before the call could be committed: what the model wrote is content.
    ('Hmm <tool_call>{"arguments": {"a": 1}, "na', 'Hmm <tool_call>{"arguments": {"a": 1}, "na', []),
    ("", "", []),
]


def assemble(deltas) -> tuple[str, list[tuple[str, str]]]:
    """Rebuild content and calls from streamed deltas, checking the OpenAI streaming shape on the way."""
    content, calls = "", []
    for d in deltas:
        if isinstance(d, ContentDelta):
            assert d.text
            content += d.text
            continue
        entry = d.to_openai()["tool_calls"][0]
        assert entry["index"] == d.index
        if d.id is not None:
            assert d.index == len(calls)
            assert re.fullmatch(r"call_[0-9a-f]{24}", d.id)
            assert entry == {"index": d.index, "id": d.id, "type": "function",
                             "function": {"name": d.name, "arguments": ""}}
            calls.append([d.name, ""])
        else:
            assert d.index < len(calls) and d.arguments
            assert entry == {"index": d.index, "function": {"arguments": d.arguments}}
            calls[d.index][1] += d.arguments
    return content, [tuple(c) for c in calls]


def stream(chunks: list[str]) -> tuple[str, list[tuple[str, str]]]:
    parser = HermesToolParser()
    deltas = [d for chunk in chunks for d in parser.feed(chunk)]
    return assemble(deltas + parser.finish())


def parsed(text: str) -> tuple[str, list[tuple[str, str]]]:
    content, calls = HermesToolParser().parse(text)
    return content, [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_parse(text, content, calls):
    assert parsed(text) == (content, calls)
    for name, arguments in calls:
        assert isinstance(json.loads(arguments), dict)


@pytest.mark.parametrize("text,content,calls", CASES)
def test_stream_matches_parse_for_every_chunking(text, content, calls):
    for i, chunks in enumerate(chunkings(text, seed=len(text))):
        assert stream(chunks) == (content, calls), (i, chunks)


def test_well_formed_calls_never_leave_tags_in_content():
    for text, content, calls in CASES[:13]:
        for chunks in chunkings(text, n_random=5):
            streamed_content = stream(chunks)[0]
            assert "<tool_call>" not in streamed_content and "</tool_call>" not in streamed_content


def test_arguments_stream_before_the_call_closes():
    parser = HermesToolParser()
    head = parser.feed('Sure. <tool_call>\n{"name": "f", "arguments": {"a": "x}y')
    assert assemble(head) == ("Sure.", [("f", '{"a": "x}y')])
    assert head[-1] == ToolCallDelta(0, '{"a": "x}y')
    assert parser.feed('z"') == [ToolCallDelta(0, 'z"')]
    assert parser.feed("}}\n</tool") == [ToolCallDelta(0, "}")]
    assert parser.feed("_call>") == []
    assert parser.finish() == []


def test_name_after_arguments_releases_both():
    parser = HermesToolParser()
    assert parser.feed('<tool_call>{"arguments": {"a": [1, 2]}, ') == []
    first, rest = parser.feed('"name": "f"')
    assert (first.index, first.name, first.arguments) == (0, "f", "")
    assert rest == ToolCallDelta(0, '{"a": [1, 2]}')
    assert parser.feed("}</tool_call>") == []


def test_content_whitespace_waits_for_text():
    parser = HermesToolParser()
    assert parser.feed("  hi \n") == [ContentDelta("hi")]
    assert parser.feed("\n") == []
    assert parser.feed(" there ") == [ContentDelta(" \n\n there")]
    assert parser.finish() == []


def test_cut_off_after_commit_keeps_what_was_streamed():
    """The stream can't take back a call, but parse() gives the unfinished call back as content."""
    text = 'Ok <tool_call>{"name": "f", "arguments": {"city": "Par'
    for chunks in chunkings(text, n_random=5):
        assert stream(chunks) == ("Ok", [("f", '{"city": "Par')])
    assert parsed(text) == (text, [])


@pytest.mark.parametrize("text,streamed_calls", [
    ('<tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call>', [("f", '{"a": tru}')]),
    ('<tool_call>{"name": "f", "arguments": {"a": 1}} junk</tool_call>', [("f", '{"a": 1}')]),
    ('<tool_call>{"name": "f", "arguments": {"a": 1}, }</tool_call>', [("f", '{"a": 1}')]),
])
def test_bad_json_after_commit(text, streamed_calls):
    for chunks in chunkings(text, n_random=5):
        assert stream(chunks) == ("", streamed_calls)
    assert parsed(text) == (text, [])
    # A good call after the broken one is still found and numbered from 0 by parse().
    content, calls = HermesToolParser().parse(text + '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    assert (content, [(c.name, c.arguments) for c in calls]) == (text, [("g", "{}")])


def test_openai_shapes():
    call = ToolCall("call_" + "0" * 24, "f", '{"a": 1}')
    assert call.to_openai() == {"id": call.id, "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert ContentDelta("hi").to_openai() == {"content": "hi"}
    _, calls = HermesToolParser().parse('<tool_call>{"name": "f", "arguments": {}}</tool_call>'
                                        '<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    assert calls[0].id != calls[1].id


def test_registry():
    assert TOOL_PARSERS == {"hermes": HermesToolParser}
    assert get_tool_parser("hermes") is HermesToolParser
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("mistral")
