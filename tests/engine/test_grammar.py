"""Structured output (common/grammar.py): random walks through the token masks always end in valid
output, tool-call grammars force the Hermes syntax, bad specs are refused, matchers replay."""
import json
import random
import re
import time

import msgspec
import numpy as np
import pytest
import torch

from common.errors import InvalidRequestError
from common.grammar import (GrammarCompiler, GrammarMatcher, GrammarSpec, allocate_bitmask, apply_bitmask,
                            structural_tag_for_tools, validate)
from tests.support.tiny_models import make_tokenizer

# a model vocab padded past the tokenizer's 512 entries, as real checkpoints often are
TINY_VOCAB = 544

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6},
                           "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "role"],
}

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "weather in a city", "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                       "b": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
        "required": ["a"]}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def tiny():
    tok = make_tokenizer(512)
    return tok, GrammarCompiler(tok, TINY_VOCAB)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    with open(f"{smollm2_dir}/config.json") as f:
        vocab_size = json.load(f)["vocab_size"]
    t = time.perf_counter()
    compiler = GrammarCompiler(tok, vocab_size, stop_token_ids=[2])
    print(f"SmolLM2 GrammarCompiler built in {time.perf_counter() - t:.2f} s")
    return tok, compiler


@pytest.fixture(params=["tiny", "smol"])
def tokenizer_and_compiler(request):
    return request.getfixturevalue(request.param)


def check(value, schema, path="$"):
    """Validate value against the JSON-schema subset used here (strict: no unknown properties)."""
    if "enum" in schema:
        assert value in schema["enum"], path
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), path
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= value.keys(), path
        assert value.keys() <= props.keys(), path
        for k, v in value.items():
            check(v, props[k], f"{path}.{k}")
    elif kind == "array":
        assert isinstance(value, list) and len(value) <= schema.get("maxItems", len(value)), path
        for i, v in enumerate(value):
            check(v, schema["items"], f"{path}[{i}]")
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", len(value)), path
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), path
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), path
    elif kind == "boolean":
        assert isinstance(value, bool), path


def walk(compiled, tok, compiler, seed, n=4, max_steps=600, close_p=0.0, prefix=()):
    """Random walks of n matchers sharing one bitmask: each step takes the argmax of uniform random
    logits after masking, i.e. a uniform pick among the allowed tokens. With probability close_p a
    step instead picks uniformly among allowed "closing" tokens (quotes, brackets, stop), so grammars
    with unbounded strings end too. Returns the decoded texts (stop token excluded)."""
    vocab_size, tokenizer_size = compiler.vocab_size, len(tok)  # len() of an HF tokenizer is slow
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    closing = np.zeros(vocab_size, dtype=bool)
    pieces = tok.convert_ids_to_tokens(list(range(tokenizer_size)))
    closing[[i for i, t in enumerate(pieces) if set(t) <= set('"}]')]] = True
    closing[compiler.stop_token_ids] = True
    matchers = [GrammarMatcher(compiled) for _ in range(n)]
    for m in matchers:
        m.replay(prefix)
    outs = [list(prefix) for _ in range(n)]
    bitmask = allocate_bitmask(n, vocab_size)
    for _ in range(max_steps):
        live = [i for i, m in enumerate(matchers) if not m.is_terminated()]
        if not live:
            break
        for i in live:
            matchers[i].fill_bitmask(bitmask, i)
        logits = torch.rand(n, vocab_size, generator=gen)
        apply_bitmask(logits, bitmask, live)
        # numpy for the per-row checks: small torch ops stall on a busy 2-core box (thread wake-ups)
        scores = logits.numpy()
        allowed = np.isfinite(scores)
        for i in range(n):
            if i not in live:
                assert allowed[i].all()  # rows not asked for are left alone
                continue
            if rng.random() < close_p and (allowed[i] & closing).any():
                scores[i][~closing] = -np.inf
            token = int(scores[i].argmax())
            assert allowed[i, token] and token < tokenizer_size
            assert matchers[i].accept(token)
            if not matchers[i].is_terminated():
                outs[i].append(token)
    assert all(m.is_terminated() for m in matchers), "a walk did not end within max_steps"
    return [tok.decode(o, clean_up_tokenization_spaces=False) for o in outs]


def test_spec_travels_over_msgpack():
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA), strict=False)
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=GrammarSpec)
    assert back == spec and hash(back) == hash(spec)
    assert GrammarSpec("json_object", "").strict is True


def test_json_schema_random_walk(tokenizer_and_compiler):
    tok, compiler = tokenizer_and_compiler
    compiled = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    for seed in range(4):
        for text in walk(compiled, tok, compiler, seed):
            check(json.loads(text), SCHEMA)


def test_json_object_gives_an_object(tokenizer_and_compiler):
    tok, compiler = tokenizer_and_compiler
    compiled = compiler.compile(GrammarSpec("json_object", ""))
    texts = walk(compiled, tok, compiler, seed=3, close_p=0.2)
    assert all(isinstance(json.loads(t), dict) for t in texts)


def tool_calls(text):
    """[(name, arguments)] of the <tool_call> blocks in text, and the text outside them."""
    block = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.S)
    calls = [json.loads(b) for b in block.findall(text)]
    assert all(list(c) == ["name", "arguments"] for c in calls)
    return [(c["name"], c["arguments"]) for c in calls], block.sub("", text)


def test_tools_required_gives_only_valid_calls(tokenizer_and_compiler):
    tok, compiler = tokenizer_and_compiler
    compiled = compiler.compile(structural_tag_for_tools(TOOLS, "required"))
    for text in walk(compiled, tok, compiler, seed=4, close_p=0.3):
        calls, rest = tool_calls(text)
        assert calls and not rest.strip(), text
        for name, args in calls:
            check(args, PARAMS[name])


def test_tools_named_gives_one_call_of_that_function(tokenizer_and_compiler):
    tok, compiler = tokenizer_and_compiler
    compiled = compiler.compile(structural_tag_for_tools(TOOLS, "named:add"))
    for text in walk(compiled, tok, compiler, seed=5, close_p=0.3):
        calls, rest = tool_calls(text)
        assert len(calls) == 1 and calls[0][0] == "add" and rest == "", text
        check(calls[0][1], PARAMS["add"])


def test_tools_auto_constrains_calls_inside_free_text(tiny):
    tok, compiler = tiny
    compiled = compiler.compile(structural_tag_for_tools(TOOLS, "auto"))
    prefix = tok.encode("Let me check. <tool_call>")
    for text in walk(compiled, tok, compiler, seed=6, close_p=0.3, prefix=prefix):
        calls, _ = tool_calls(text)
        assert calls, text
        for name, args in calls:
            check(args, PARAMS[name])
    m = GrammarMatcher(compiled)
    assert all(m.accept(t) for t in tok.encode("plain text is fine"))
    bad = tok.encode('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>')
    assert not all(m.accept(t) for t in bad)


def test_control_tokens_are_never_offered(tiny):
    tok, compiler = tiny
    m = GrammarMatcher(compiler.compile(structural_tag_for_tools(TOOLS, "auto")))
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    m.fill_bitmask(bitmask, 0)
    logits = torch.zeros(1, compiler.vocab_size)
    apply_bitmask(logits, bitmask, None)
    allowed = torch.isfinite(logits[0])
    im_start, endoftext, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|endoftext|>", "<|im_end|>"])
    assert not allowed[im_start] and not allowed[endoftext]
    assert allowed[im_end]  # the stop token: free text may end here
    assert not allowed[512:].any()  # padded ids


@pytest.mark.parametrize("spec, needle", [
    (GrammarSpec("json_schema", "{not json"), "Failed to parse JSON"),
    (GrammarSpec("json_schema", '{"type": "wat"}'), "wat"),
    (GrammarSpec("json_schema", '{"type": "string", "minLength": 5, "maxLength": 2}'), "minLength"),
    (GrammarSpec("regex", "a(b"), "parenthesis"),
    (GrammarSpec("ebnf", "root ::= missing"), "missing"),
    (GrammarSpec("structural_tag", '{"type": "structural_tag", "format": {"type": "nope"}}'), "nope"),
    (GrammarSpec("yaml", ""), "unknown grammar kind"),
])
def test_invalid_specs_are_invalid_requests(tiny, spec, needle):
    tok, compiler = tiny
    with pytest.raises(InvalidRequestError, match=re.escape(needle)) as e:
        compiler.compile(spec)
    assert "Check failed" not in str(e.value) and ".cc:" not in str(e.value)
    with pytest.raises(InvalidRequestError):
        validate(spec, tok, TINY_VOCAB)


def test_bad_tools_are_invalid_requests(tiny):
    tok, _ = tiny
    with pytest.raises(InvalidRequestError, match="not in tools"):
        structural_tag_for_tools(TOOLS, "named:nope")
    with pytest.raises(InvalidRequestError, match="unknown tool mode"):
        structural_tag_for_tools(TOOLS, "sometimes")
    with pytest.raises(InvalidRequestError):
        structural_tag_for_tools([{"type": "function", "function": {}}], "auto")
    bad_params = [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}]
    with pytest.raises(InvalidRequestError, match="wat"):
        validate(structural_tag_for_tools(bad_params, "required"), tok, TINY_VOCAB)


def test_compile_cache(tiny):
    tok, _ = tiny
    compiler = GrammarCompiler(tok, TINY_VOCAB, cache_size=2)
    a = GrammarSpec("json_schema", json.dumps(SCHEMA))
    first = compiler.compile(a)
    assert compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA))) is first
    assert compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA), strict=False)) is not first
    compiler.compile(GrammarSpec("regex", "[ab]+"))  # evicts the least recently used: a
    assert compiler.compile(a) is not first


def test_replay_gives_the_same_mask(tiny):
    tok, compiler = tiny
    compiled = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    text = walk(compiled, tok, compiler, seed=7, n=1)[0]
    tokens = tok.encode(text)  # a different tokenization of the same text is still a valid path
    bitmask = allocate_bitmask(2, compiler.vocab_size)
    for cut in (0, 1, len(tokens) // 2, len(tokens) - 1, len(tokens)):
        original = GrammarMatcher(compiled)
        for t in tokens[:cut]:
            assert original.accept(t)
        replayed = GrammarMatcher(compiled)
        replayed.replay(tokens[:cut])
        original.fill_bitmask(bitmask, 0)
        replayed.fill_bitmask(bitmask, 1)
        assert torch.equal(bitmask[0], bitmask[1]), cut
    with pytest.raises(ValueError, match="position 0"):
        GrammarMatcher(compiled).replay(tok.encode("]"))


def test_only_stop_tokens_once_complete(tiny):
    tok, _ = tiny
    extra_stop = tok.convert_tokens_to_ids("<|endoftext|>")
    compiler = GrammarCompiler(tok, TINY_VOCAB, stop_token_ids=[extra_stop])
    stops = {tok.eos_token_id, extra_stop}
    m = GrammarMatcher(compiler.compile(GrammarSpec("regex", "yes|no")))
    m.replay(tok.encode("yes"))
    bitmask = allocate_bitmask(1, TINY_VOCAB)
    for _ in range(2):  # before and after the stop token is accepted
        m.fill_bitmask(bitmask, 0)
        logits = torch.zeros(1, TINY_VOCAB)
        apply_bitmask(logits, bitmask)
        assert set(torch.isfinite(logits[0]).nonzero().flatten().tolist()) == stops
        if not m.is_terminated():
            assert m.accept(extra_stop) and m.is_terminated()
    assert not m.accept(tok.encode("y")[0])


def test_compile_time_of_a_typical_schema(smol):
    _, compiler = smol
    schema = dict(SCHEMA, title=f"fresh-{time.time_ns()}")  # not in the cache yet
    t = time.perf_counter()
    compiler.compile(GrammarSpec("json_schema", json.dumps(schema)))
    print(f"SmolLM2: compiling a typical JSON schema took {1000 * (time.perf_counter() - t):.1f} ms")
