"""Tool calls in model output, turned into OpenAI ``tool_calls``, streamed or not.

A parser class takes no arguments and has ``feed(delta) -> list[Delta]``, ``finish() -> list[Delta]`` and
``parse(text) -> (content, [ToolCall])``; ``TOOL_PARSERS`` maps format names to such classes.

Hermes / Qwen format: ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>``, possibly several.

Streaming commits to a call once its name is known and its arguments have begun (or the object closed without
any, which means ``"{}"``); from then on argument text goes out as it arrives, exactly as the model wrote it.
Before that the call is held back, and a body that turns out not to be a call (not an object, no name, a name
that is not a string, arguments that are not an object, broken syntax) is passed through as content, tags and
all. A problem found *after* commit (bad JSON inside the arguments, junk after the object, a stream that stops
mid-arguments) can't be taken back from a stream: the call stays, with the text the model wrote. ``parse()``
runs the same machine and then checks each committed call with ``json.loads``, putting a call that fails back
into content, so streamed and non-streamed results are identical whenever every call is well-formed JSON.

A call whose JSON object is complete but whose ``</tool_call>`` never comes (the model stopped at its end token,
or went straight to the next ``<tool_call>``) is accepted. Content is stripped at both ends, as a whole: the
streamed content deltas hold back trailing whitespace until more text follows.
"""
from __future__ import annotations

import json
import re
import secrets

import msgspec

from router.text.reasoning import partial_tag_len

_WS = " \t\r\n"


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolCall(msgspec.Struct):
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ContentDelta(msgspec.Struct):
    text: str

    def to_openai(self) -> dict:
        """The ``delta`` object of a chat.completion.chunk choice."""
        return {"content": self.text}


class ToolCallDelta(msgspec.Struct):
    index: int
    arguments: str = ""
    id: str | None = None      # set on the first delta of a call only, together with name
    name: str | None = None

    def to_openai(self) -> dict:
        """The ``delta`` object of a chat.completion.chunk choice."""
        if self.id is None:
            entry = {"index": self.index, "function": {"arguments": self.arguments}}
        else:
            entry = {"index": self.index, "id": self.id, "type": "function",
                     "function": {"name": self.name, "arguments": self.arguments}}
        return {"tool_calls": [entry]}


Delta = ContentDelta | ToolCallDelta


_IN_STRING = re.compile(r'["\\]')
_IN_CONTAINER = re.compile(r'["{}\[\]]')
_AFTER_SCALAR = re.compile(r'[,}\]\s]')


class _ValueEnd:
    """Finds where one JSON value ends in text that arrives piecewise. Structure is counted, not validated."""

    def __init__(self):
        self.started = False
        self.scalar = False      # number, true, false, null: ends at the next delimiter, which is not part of it
        self.in_string = False
        self.escaped = False
        self.depth = 0

    def scan(self, s: str) -> tuple[int, bool]:
        """How much of ``s`` belongs to the value, and whether the value ends there."""
        i = 0
        if not self.started:
            self.started = True
            c = s[0]
            self.in_string = c == '"'
            self.depth = int(c in "{[")
            self.scalar = not (self.in_string or self.depth)
            i = 1
        while i < len(s):
            if self.escaped:
                self.escaped = False
                i += 1
                continue
            pattern = _IN_STRING if self.in_string else _AFTER_SCALAR if self.scalar else _IN_CONTAINER
            m = pattern.search(s, i)
            if m is None:
                return len(s), False
            i, c = m.start(), m.group()
            if self.scalar:
                return i, True
            i += 1
            if self.in_string:
                if c == "\\":
                    self.escaped = True
                else:
                    self.in_string = False
                    if self.depth == 0:
                        return i, True
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 0:
                    return i, True
        return i, False


# Where the scanner of a call's object is: what it expects next.
_OBJECT, _KEY, _COLON, _VALUE, _NEXT, _AFTER = range(6)


class _Call:
    def __init__(self, opening: str):
        self.raw = opening  # all the model wrote for it, to give back as content when it isn't a call
        self.state = _OBJECT
        self.scanner: _ValueEnd | None = None  # set while inside a key or a value
        self.key: str | None = None  # the key whose value is read; None for values that are skipped
        self.text = ""  # the key or name string being read
        self.name: str | None = None
        self.args = ""
        self.args_seen = False
        self.object_span = (0, 0)  # of the JSON object within raw
        self.complete = False  # the object closed and nothing but the closing tag followed
        self.index: int | None = None  # set on commit
        self.id = ""

    def to_tool_call(self) -> ToolCall | None:
        if not self.complete:
            return None
        try:
            obj = json.loads(self.raw[slice(*self.object_span)])
        except ValueError:
            return None
        if not isinstance(obj.get("arguments", {}), dict):
            return None
        return ToolCall(self.id, self.name, self.args)


class HermesToolParser:
    OPEN = "<tool_call>"
    CLOSE = "</tool_call>"

    _TEXT, _CALL, _PASS, _SKIP = range(4)  # _PASS: a failed call, given as content; _SKIP: junk after commit

    def __init__(self):
        self._mode = self._TEXT
        self._buf = ""
        self._call: _Call | None = None
        self._committed: list[_Call] = []
        self._content_started = False
        self._pending_ws = ""

    def feed(self, delta: str) -> list[Delta]:
        return self._trim(self._scan(delta, final=False))

    def finish(self) -> list[Delta]:
        """Flush at the end of the stream. A call cut off before commit becomes content; one cut off after keeps
        the argument text sent so far (not valid JSON; the finish reason tells the client why)."""
        deltas = self._trim(self._scan("", final=True))
        self._pending_ws = ""
        return deltas

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        parser = type(self)()
        pieces: list[str] = []
        calls: list[ToolCall] = []
        for delta in parser._scan(text, final=True):
            if isinstance(delta, ContentDelta):
                pieces.append(delta.text)
            elif delta.id is not None:
                call = parser._committed[delta.index]
                tool_call = call.to_tool_call()
                if tool_call is None:
                    pieces.append(call.raw)
                else:
                    calls.append(tool_call)
        return "".join(pieces).strip(), calls

    def _trim(self, deltas: list[Delta]) -> list[Delta]:
        """Strip content as a whole, though it arrives in pieces: whitespace waits until text follows it."""
        out: list[Delta] = []
        for delta in deltas:
            if isinstance(delta, ContentDelta):
                text = self._pending_ws + delta.text if self._content_started else delta.text.lstrip()
                body = text.rstrip()
                self._pending_ws = text[len(body):]
                if body:
                    self._content_started = True
                    out.append(ContentDelta(body))
            else:
                out.append(delta)
        return out

    def _scan(self, text: str, final: bool) -> list[Delta]:
        self._buf += text
        out: list[Delta] = []
        while self._buf:
            if self._mode == self._TEXT:
                i = self._buf.find(self.OPEN)
                if i < 0:
                    self._content(out, self._take_ready(final, (self.OPEN,)))
                    break
                self._content(out, self._take(i))
                self._take(len(self.OPEN))
                self._call = _Call(self.OPEN)
                self._mode = self._CALL
            elif self._mode == self._CALL:
                if not self._step_call(out, final):
                    break
            else:
                # Look for the close tag, or for a new call if the model never closed this one.
                hits = [i for tag in (self.CLOSE, self.OPEN) if (i := self._buf.find(tag)) >= 0]
                if not hits:
                    self._junk(out, self._take_ready(final, (self.CLOSE, self.OPEN)))
                    break
                i = min(hits)
                if self._buf.startswith(self.CLOSE, i):
                    i += len(self.CLOSE)
                self._junk(out, self._take(i))
                self._call = None
                self._mode = self._TEXT
        if final and self._mode == self._CALL:
            if self._call.index is None:
                self._content(out, self._call.raw)
            self._call = None
            self._mode = self._TEXT
        return out

    def _take(self, n: int) -> str:
        head, self._buf = self._buf[:n], self._buf[n:]
        return head

    def _take_ready(self, final: bool, tags: tuple[str, ...]) -> str:
        return self._take(len(self._buf) - (0 if final else partial_tag_len(self._buf, tags)))

    def _content(self, out: list[Delta], text: str) -> None:
        if text:
            out.append(ContentDelta(text))

    def _junk(self, out: list[Delta], text: str) -> None:
        if self._mode == self._PASS:
            self._content(out, text)
        else:
            self._call.raw += text

    def _step_call(self, out: list[Delta], final: bool) -> bool:
        """Consume some of the buffer for the open call; False when it needs more text."""
        call = self._call
        if call.state == _AFTER:
            return self._after_object(out, final)
        if call.scanner is None:  # between keys and values: whitespace and punctuation
            n = len(self._buf) - len(self._buf.lstrip(_WS))
            if n:
                call.raw += self._take(n)
                return True
            c = self._buf[0]
            if call.state == _VALUE:
                return self._value_start(out, c)
            if (call.state, c) == (_OBJECT, "{"):
                call.object_span = (len(call.raw), 0)
                call.state = _KEY
            elif (call.state, c) == (_KEY, '"'):
                call.scanner = _ValueEnd()
                return True
            elif (call.state, c) == (_COLON, ":"):
                call.state = _VALUE
            elif (call.state, c) == (_NEXT, ","):
                call.state = _KEY
            elif (call.state, c) == (_NEXT, "}"):
                call.raw += self._take(1)
                call.object_span = (call.object_span[0], len(call.raw))
                return self._object_end(out)
            else:
                return self._fail(out)
            call.raw += self._take(1)
            return True

        n, done = call.scanner.scan(self._buf)
        piece = self._take(n)
        call.raw += piece
        if call.state == _KEY:
            call.text += piece
            if done:
                key = self._decode(call.text)
                if not isinstance(key, str):
                    return self._fail(out)
                call.key, call.text, call.scanner, call.state = key, "", None, _COLON
            return True
        if call.key == "name":
            call.text += piece
        elif call.key == "arguments":
            call.args += piece
            if call.index is not None and piece:
                out.append(ToolCallDelta(call.index, piece))
        if done:
            call.scanner, call.state = None, _NEXT
            if call.key == "name":
                name, call.text = self._decode(call.text), ""
                if not (isinstance(name, str) and name):
                    return self._fail(out)
                call.name = name
                if call.args_seen:  # arguments came first and are done
                    self._commit(out)
        return True

    def _value_start(self, out: list[Delta], c: str) -> bool:
        call = self._call
        if call.key == "name" and call.name is None:
            if c != '"':
                return self._fail(out)
        elif call.key == "arguments" and not call.args_seen:
            if c != "{":
                return self._fail(out)
            call.args_seen = True
            if call.name is not None:
                self._commit(out)
        elif c in ",:]}":
            return self._fail(out)
        else:
            call.key = None  # a key we don't use, or a repeated one: its value is skipped over
        call.scanner = _ValueEnd()
        return True

    def _object_end(self, out: list[Delta]) -> bool:
        call = self._call
        if call.name is None:
            return self._fail(out)
        if call.index is None:  # a call with no arguments at all
            call.args = "{}"
            self._commit(out)
        call.complete = True
        call.state = _AFTER
        return True

    def _after_object(self, out: list[Delta], final: bool) -> bool:
        call = self._call
        n = len(self._buf) - len(self._buf.lstrip(_WS))
        if n:
            call.raw += self._take(n)
            return True
        s = self._buf
        if s.startswith(self.CLOSE) or (final and self.CLOSE.startswith(s)):
            call.raw += self._take(len(self.CLOSE))
        elif s.startswith(self.OPEN) or (final and self.OPEN.startswith(s)):
            pass  # no closing tag: the next call, or content, starts here
        elif self.CLOSE.startswith(s) or self.OPEN.startswith(s):
            return False
        else:
            call.complete = False
            self._mode = self._SKIP
            return True
        self._call = None
        self._mode = self._TEXT
        return True

    def _commit(self, out: list[Delta]) -> None:
        call = self._call
        call.index, call.id = len(self._committed), new_call_id()
        self._committed.append(call)
        out.append(ToolCallDelta(call.index, "", call.id, call.name))
        if call.args:
            out.append(ToolCallDelta(call.index, call.args))

    def _fail(self, out: list[Delta]) -> bool:
        if self._call.index is None:  # nothing of it went out: it is just text
            self._content(out, self._call.raw)
            self._call = None
            self._mode = self._PASS
        else:
            self._call.complete = False
            self._mode = self._SKIP
        return True

    @staticmethod
    def _decode(text: str):
        try:
            return json.loads(text)
        except ValueError:
            return None


TOOL_PARSERS: dict[str, type[HermesToolParser]] = {"hermes": HermesToolParser}


def get_tool_parser(name: str) -> type[HermesToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}") from None
