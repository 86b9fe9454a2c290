"""Structured output: grammar specs, their compilation (xgrammar) and per-request token masks.

A GrammarSpec is plain data so it can ride the msgpack wire from router to decode worker to
prefill worker; each process compiles it against its own tokenizer (compilation is cached).
A GrammarMatcher's state is never sent: the receiver rebuilds it by replaying the tokens
generated so far, which is also how it survives a migration.
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict

import torch
import xgrammar as xgr

from common.errors import InvalidRequestError
from common.sampling_params import GrammarSpec

KINDS = ("json_schema", "json_object", "structural_tag", "regex", "ebnf")

# A small model can emit newlines forever while still "obeying" a JSON grammar; capping the run
# of whitespace between JSON elements keeps room for pretty-printing but not for that loop.
MAX_WHITESPACE = 16

TOOL_CALL_BEGIN = "<tool_call>"
TOOL_CALL_END = "}\n</tool_call>"


class CompiledGrammar:
    """An xgrammar grammar plus the token filters our matcher applies on top of its mask."""

    def __init__(self, grammar: xgr.CompiledGrammar, allowed: torch.Tensor, stop_row: torch.Tensor):
        self.grammar = grammar
        self.allowed = allowed  # int32 bitmask row of tokens the grammar may ever offer
        self.stop_row = stop_row  # int32 bitmask row of the stop tokens


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer, with a bounded LRU cache keyed by the spec."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids=(), cache_size: int = 256,
                 max_threads: int | None = None):
        # The mask only allows a stop token once the grammar is complete, so xgrammar must know
        # every id that ends generation (tokenizer eos plus e.g. generation_config's eos list).
        stops = list(dict.fromkeys([*_ids(tokenizer.eos_token_id), *stop_token_ids]))
        self._info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stops or None)
        # xgrammar's own cache is unbounded by default; ours bounds entries and keeps identity.
        self._compiler = xgr.GrammarCompiler(
            self._info, max_threads=max_threads or min(4, os.cpu_count() or 1), cache_enabled=False)
        self.vocab_size = vocab_size
        self.stop_token_ids = list(self._info.stop_token_ids)
        self._stops = _token_set(vocab_size, self.stop_token_ids)
        self._stop_row = _pack(self._stops)
        # xgrammar offers control tokens (<|im_start|>, <repo_name>, ...) as their literal text,
        # but the detokenizer drops them, so the client would see text the grammar never checked.
        specials = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self._no_specials = ~_token_set(vocab_size, specials | set(tokenizer.all_special_ids)) | self._stops
        self._text_allowed = _pack(self._no_specials)
        # xgrammar 0.2.8 lets strings with minLength/maxLength hold raw control characters, which
        # is invalid JSON (mlc-ai/xgrammar#800). No JSON text needs a raw C0 byte other than \n or
        # \r (tab indentation is the only loss), so JSON-only grammars never offer those tokens.
        control = _token_set(vocab_size, [i for i, b in enumerate(self._info.decoded_vocab) if _has_control(b)])
        self._json_allowed = _pack(self._no_specials & ~control | self._stops)
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        # outside the lock: compiling can take a while
        compiled = CompiledGrammar(self._compile(spec), self._allowed_for(spec), self._stop_row)
        with self._lock:
            compiled = self._cache.setdefault(spec, compiled)
            self._cache.move_to_end(spec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _allowed_for(self, spec: GrammarSpec) -> torch.Tensor:
        return self._json_allowed if _json_only(spec) else self._text_allowed

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        c = self._compiler
        try:
            if spec.kind == "json_schema":
                return c.compile_json_schema(spec.spec, strict_mode=spec.strict,
                                             max_whitespace_cnt=MAX_WHITESPACE)
            if spec.kind == "json_object":
                # the builtin JSON grammar allows any value; json_object promises an object
                return c.compile_json_schema('{"type": "object"}', strict_mode=False,
                                             max_whitespace_cnt=MAX_WHITESPACE)
            if spec.kind == "structural_tag":
                return c.compile_structural_tag(spec.spec)
            if spec.kind == "regex":
                return c.compile_regex(spec.spec)
            if spec.kind == "ebnf":
                return c.compile_grammar(spec.spec)
        except (RuntimeError, ValueError, TypeError) as e:
            # xgrammar reports every bad input as a RuntimeError from its C++ core
            raise InvalidRequestError(f"invalid {spec.kind}: {_clean_error(e)}") from None
        raise InvalidRequestError(f"unknown grammar kind {spec.kind!r}; expected one of {', '.join(KINDS)}")


_shared: dict[tuple, tuple] = {}
_shared_lock = threading.Lock()


def shared_compiler(tokenizer, vocab_size: int, stop_token_ids=()) -> GrammarCompiler:
    """The process-wide compiler for this tokenizer (building one costs ~0.5 s for a 50k vocab)."""
    # id() is a safe key only while the tokenizer lives, so the entry keeps it alive
    key = (id(tokenizer), vocab_size, tuple(stop_token_ids))
    with _shared_lock:
        entry = _shared.get(key)
        if entry is None:
            entry = _shared[key] = (tokenizer, GrammarCompiler(tokenizer, vocab_size, stop_token_ids))
        return entry[1]


def validate(spec: GrammarSpec, tokenizer, vocab_size: int) -> None:
    """Raise InvalidRequestError if spec does not compile (lets the router answer 400 early)."""
    shared_compiler(tokenizer, vocab_size).compile(spec)


def check_json_schema(schema: str) -> None:
    """Raise InvalidRequestError if a JSON schema does not convert to a grammar: the tokenizer-free first step of
    compiling it, where xgrammar finds every schema error, in well under a millisecond (compiling against a
    vocabulary takes far longer), so the router can check schemas that no grammar will enforce (tools under auto)."""
    try:
        xgr.Grammar.from_json_schema(schema, max_whitespace_cnt=MAX_WHITESPACE)
    except (RuntimeError, ValueError, TypeError) as e:
        raise InvalidRequestError(f"invalid json_schema: {_clean_error(e)}") from None


class GrammarMatcher:
    """The grammar state of one request."""

    def __init__(self, compiled: CompiledGrammar):
        self._compiled = compiled
        self._m = xgr.GrammarMatcher(compiled.grammar)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if self._m.is_terminated():
            # xgrammar refuses to fill after the stop token; sampling once more may only stop again
            bitmask[row] = self._compiled.stop_row
            return
        self._m.fill_next_token_bitmask(bitmask, row)
        bitmask[row].bitwise_and_(self._compiled.allowed)

    def accept(self, token_id: int) -> bool:
        return self._m.accept_token(token_id)

    def is_terminated(self) -> bool:
        return self._m.is_terminated()

    def replay(self, token_ids) -> None:
        for i, t in enumerate(token_ids):
            if not self._m.accept_token(t):
                raise ValueError(f"replayed token {t} at position {i} does not match the grammar")


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """An int32 [batch, ceil(vocab_size / 32)] CPU bitmask, all tokens allowed."""
    return xgr.allocate_token_bitmask(batch, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> None:
    """Set the logits of disallowed tokens to -inf in place, only in `rows` when given."""
    if rows is not None and not rows:
        return
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)


def structural_tag_for_tools(tools: list[dict], mode: str) -> GrammarSpec:
    """The grammar for Hermes/Qwen3 tool calls:
    <tool_call>\\n{"name": "<name>", "arguments": <args>}\\n</tool_call>

    mode: "auto" (free text; any <tool_call> must be well formed), "required" (only calls, at
    least one, whitespace between them), "required_one" (exactly one call, of any tool: OpenAI's
    parallel_tool_calls=false) or "named:<fn>" (exactly one call of fn).
    """
    tags = {}
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidRequestError('each tool must be {"type": "function", "function": {"name": ..., ...}}')
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise InvalidRequestError(f"parameters of tool {name!r} must be a JSON schema object")
        tags[name] = {
            "type": "tag",
            "begin": f'{TOOL_CALL_BEGIN}\n{{"name": {json.dumps(name)}, "arguments": ',
            "content": {"type": "json_schema", "json_schema": params, "max_whitespace_cnt": MAX_WHITESPACE},
            "end": TOOL_CALL_END,
        }
    if not tags:
        raise InvalidRequestError("tool_choice needs at least one tool")

    if mode == "auto":
        fmt = {"type": "triggered_tags", "triggers": [TOOL_CALL_BEGIN], "tags": list(tags.values())}
    elif mode == "required_one":
        fmt = {"type": "or", "elements": list(tags.values())}
    elif mode == "required":
        # triggered_tags with at_least_one would still allow free text around the calls, so this
        # is a call followed by any number of (whitespace, call); whitespace is spelled with
        # literals rather than a regex so _json_only recognises the result
        call = {"type": "or", "elements": list(tags.values())}
        space = {"type": "repeat", "min": 0, "max": MAX_WHITESPACE, "content": {"type": "or", "elements": [
            {"type": "const_string", "value": c} for c in (" ", "\n")]}}
        more = {"type": "sequence", "elements": [space, call]}
        fmt = {"type": "sequence", "elements": [call, {"type": "star", "content": more}]}
    elif mode.startswith("named:"):
        name = mode.removeprefix("named:")
        if name not in tags:
            raise InvalidRequestError(f"tool_choice names function {name!r}, which is not in tools")
        fmt = tags[name]
    else:
        raise InvalidRequestError(f"unknown tool mode {mode!r}; expected auto, required, required_one or named:<fn>")
    return GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}))


def _ids(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple, set)) else [x]


def _has_control(text: bytes) -> bool:
    """A C0 control character other than newline / carriage return."""
    return any(c < 0x20 and c not in b"\n\r" for c in text)


# structural-tag formats whose output is JSON or literal text, never free text
_JSON_ONLY_FORMATS = {"structural_tag", "json_schema", "const_string", "tag", "sequence", "or",
                      "optional", "plus", "star", "repeat", "tags_with_separator"}


def _json_only(spec: GrammarSpec) -> bool:
    """Whether every output of spec is JSON plus control-free literals (why: GrammarCompiler.__init__)."""
    if spec.kind in ("json_schema", "json_object"):
        return True
    if spec.kind != "structural_tag":
        return False
    try:
        return _json_only_format(json.loads(spec.spec))
    except ValueError:
        return False  # compile reports it


def _json_only_format(node) -> bool:
    if isinstance(node, list):
        return all(_json_only_format(x) for x in node)
    if isinstance(node, str):
        return not _has_control(node.encode())
    if not isinstance(node, dict):
        return True
    if node.get("type") not in _JSON_ONLY_FORMATS or node.get("style", "json") != "json":
        return False
    return all(_json_only_format(v) for k, v in node.items() if k != "json_schema")


def _token_set(vocab_size: int, ids) -> torch.Tensor:
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[[i for i in ids if 0 <= i < vocab_size]] = True
    return mask


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """bool [vocab] -> int32 bitmask row in xgrammar's layout (token i is bit i % 32 of word i // 32)."""
    bits = torch.nn.functional.pad(mask, (0, -len(mask) % 32)).view(-1, 32).long()
    words = (bits << torch.arange(32)).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


_LOG_PREFIX = re.compile(r"^\[[\d:.]+\]\s+\S+:\d+:\s*")
_CHECK_FAILED = re.compile(r"Check failed: \(.*?\) is false:\s*")


def _clean_error(e: Exception, limit: int = 500) -> str:
    """xgrammar's message minus its C++ log location and assertion text."""
    msg = _CHECK_FAILED.sub("", _LOG_PREFIX.sub("", str(e).strip()))
    return msg if len(msg) <= limit else msg[:limit] + "..."
