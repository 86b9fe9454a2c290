"""A choice's generated text as OpenAI message fields: reasoning split off first, then tool calls parsed out of
what remains. Streamed text goes through feed()/finish() as delta dicts; a whole text through message()."""
from __future__ import annotations

from router.text.reasoning import ThinkReasoningParser
from router.text.tool_parsers import ContentDelta


class OutputParser:
    def __init__(self, reasoning: ThinkReasoningParser | None, tools):
        self.reasoning, self.tools = reasoning, tools  # either may be None: that part is not parsed
        self.made_tool_calls = False

    def feed(self, text: str) -> list[dict]:
        return self._deltas(*(self.reasoning.feed(text) if self.reasoning else ("", text)), final=False)

    def finish(self) -> list[dict]:
        return self._deltas(*(self.reasoning.finish() if self.reasoning else ("", "")), final=True)

    def _deltas(self, reasoning: str, content: str, final: bool) -> list[dict]:
        out = [{"reasoning_content": reasoning, "reasoning": reasoning}] if reasoning else []
        if self.tools is None:
            return out + ([{"content": content}] if content else [])
        parsed = self.tools.feed(content) if content else []
        if final:
            parsed += self.tools.finish()
        for delta in parsed:
            if not isinstance(delta, ContentDelta):
                self.made_tool_calls = True
            out.append(delta.to_openai())
        return out

    def message(self, text: str) -> dict:
        """The assistant message of a non-streamed response."""
        reasoning, content = self.reasoning.parse(text) if self.reasoning else (None, text)
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = message["reasoning"] = reasoning
        if self.tools is not None:
            content, calls = self.tools.parse(content)
            message["content"] = content or None
            if calls:
                self.made_tool_calls = True
                message["tool_calls"] = [c.to_openai() for c in calls]
        return message

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return "tool_calls" if self.made_tool_calls and engine_reason == "stop" else engine_reason
