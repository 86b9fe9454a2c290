"""Splitting ``<think>…</think>`` reasoning from the answer, streamed or not.

Whether a response *starts* inside reasoning is decided by the rendered prompt, not by the output: DeepSeek-R1
templates end with ``<｜Assistant｜><think>\\n`` and Qwen3 ones may open the block too, so the model never writes
the opening tag and its output begins with reasoning that ends at ``</think>``. With Qwen3's
``enable_thinking=False`` the template writes a closed, empty block, so the output is plain content.

Whitespace, as clients expect it: reasoning is stripped at both ends (the newlines templates put around it are
layout, not text), and content loses its leading whitespace, which covers the newline(s) after ``</think>``.
Trailing whitespace of content is passed through.

Content never contains a think tag: the output may open a block only at its very start (after whitespace); a tag
that shows up later in content is dropped, keeping the text around it, rather than swallowing the rest of the
answer into reasoning.

Typical use::

    parser = get_reasoning_parser("qwen3")(prompt_opens_reasoning(prompt_text))
    for delta in deltas:
        reasoning, content = parser.feed(delta)
    reasoning, content = parser.finish()
"""
from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def prompt_opens_reasoning(prompt_text: str, start: str = THINK_START, end: str = THINK_END) -> bool:
    """True when the rendered prompt leaves a think block open, so the response begins inside reasoning."""
    return prompt_text.rfind(start) > prompt_text.rfind(end)


def partial_tag_len(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could grow into one of ``tags``: the part to hold back."""
    for n in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        tail = text[-n:]
        if any(tag.startswith(tail) for tag in tags):
            return n
    return 0


class ThinkReasoningParser:
    def __init__(self, starts_in_reasoning: bool, start: str = THINK_START, end: str = THINK_END):
        self.starts_in_reasoning = starts_in_reasoning
        self.start, self.end = start, end
        self._in_reasoning = starts_in_reasoning
        self._at_output_start = True     # the output may still open its own block here
        self._at_section_start = True    # leading whitespace of reasoning and of content is dropped
        self._buf = ""                   # text held back: a possible partial tag, or whitespace that may be trailing

    @classmethod
    def for_prompt(cls, prompt_text: str) -> ThinkReasoningParser:
        return cls(prompt_opens_reasoning(prompt_text))

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning_delta, content_delta) for one streamed text delta; either may be empty."""
        return self._run(delta, final=False)

    def finish(self) -> tuple[str, str]:
        """Flush what was held back; a stream that ends inside reasoning leaves it all as reasoning."""
        return self._run("", final=True)

    def parse(self, text: str) -> tuple[str | None, str]:
        """(reasoning or None, content) of a whole response, by the same state machine as streaming."""
        parser = type(self)(self.starts_in_reasoning, self.start, self.end)
        r1, c1 = parser.feed(text)
        r2, c2 = parser.finish()
        return (r1 + r2) or None, c1 + c2

    def _run(self, delta: str, final: bool) -> tuple[str, str]:
        self._buf += delta
        reasoning: list[str] = []
        content: list[str] = []
        while self._buf:
            if self._at_output_start:
                # Leading whitespace goes either way: it would be stripped from reasoning and from content alike.
                self._buf = self._buf.lstrip()
                if self._buf.startswith(self.start):
                    self._buf = self._buf[len(self.start):]
                    self._in_reasoning = True
                elif not final and self.start.startswith(self._buf):
                    break
                self._at_output_start = False
            elif self._in_reasoning:
                i = self._buf.find(self.end)
                if i >= 0:
                    self._emit(reasoning, self._buf[:i].rstrip())
                    self._buf = self._buf[i + len(self.end):]
                    self._in_reasoning = False
                    self._at_section_start = True
                elif final:
                    self._emit(reasoning, self._buf.rstrip())
                    self._buf = ""
                else:
                    # Whitespace may turn out to be the end of reasoning, which is stripped, so it waits too.
                    ready = self._buf[:len(self._buf) - partial_tag_len(self._buf, (self.end,))].rstrip()
                    self._emit(reasoning, ready)
                    self._buf = self._buf[len(ready):]
                    break
            else:
                i, tag = self._find_tag()
                if i >= 0:
                    self._emit(content, self._buf[:i])
                    self._buf = self._buf[i + len(tag):]
                else:
                    hold = 0 if final else partial_tag_len(self._buf, (self.start, self.end))
                    self._emit(content, self._buf[:len(self._buf) - hold])
                    self._buf = self._buf[len(self._buf) - hold:]
                    break
        return "".join(reasoning), "".join(content)

    def _find_tag(self) -> tuple[int, str]:
        hits = [(i, tag) for tag in (self.start, self.end) if (i := self._buf.find(tag)) >= 0]
        return min(hits) if hits else (-1, "")

    def _emit(self, parts: list[str], text: str) -> None:
        if self._at_section_start:
            text = text.lstrip()
        if text:
            self._at_section_start = False
            parts.append(text)


# Both families use the same tags; what differs (whether the prompt opens the block) comes from the prompt.
REASONING_PARSERS: dict[str, type[ThinkReasoningParser]] = {
    "deepseek_r1": ThinkReasoningParser,
    "qwen3": ThinkReasoningParser,
}


def get_reasoning_parser(name: str) -> type[ThinkReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(sorted(REASONING_PARSERS))}") from None
