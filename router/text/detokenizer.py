"""Incremental detokenization with OpenAI-style stop strings.

Each call decodes only a small window of recent ids: ``[prefix, read)`` is
text that was already emitted, kept as left context so that tokenizers whose
pieces depend on their neighbours (leading spaces, byte-level fragments)
decode exactly as they would inside the full sequence; ``[read, end)`` is new.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stops = [s for s in (stop or []) if s]
        self.text = ""
        self.stopped = False
        self.stop_reason: str | None = None
        # The decode window: _ids[:_read] was emitted and is kept only as left
        # context; older ids are dropped since their text is final.
        self._ids: list[int] = []
        self._read = 0
        # Decoded text not emitted yet because it may be the start of a stop string.
        self._pending = ""

    def add(self, token_ids: list[int]) -> str:
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[: self._read])
        full = self._decode(self._ids)
        # A trailing U+FFFD is most likely a multi-byte character cut between
        # tokens: wait for the rest of it rather than emit a replacement char.
        if len(full) <= len(prefix_text) or full.endswith(_REPLACEMENT):
            return ""
        new = full[len(prefix_text) :]
        # The decoded text ends on a complete character, so the byte stream
        # splits cleanly here and the old context can be dropped.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return self._emit(new, final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        prefix_text = self._decode(self._ids[: self._read])
        new = self._decode(self._ids)[len(prefix_text) :]
        self._ids, self._read = [], 0
        return self._emit(new, final=True)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        # Clean-up of tokenization spaces looks across window edges, so it
        # cannot be applied incrementally (and is a no-op for BPE tokenizers).
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _emit(self, new: str, final: bool) -> str:
        pending = self._pending + new
        hit = self._find_stop(pending)
        if hit is not None:
            pos, stop = hit
            out = pending[:pos]
            self.stopped, self.stop_reason = True, stop
            self._pending, self._ids = "", []
        else:
            keep = 0 if final else self._partial_stop_len(pending)
            out = pending[: len(pending) - keep]
            self._pending = pending[len(pending) - keep :]
        self.text += out
        return out

    def _find_stop(self, s: str) -> tuple[int, str] | None:
        # The stop that completes first wins, as generation would have ended
        # there; for overlapping stops this is not always the one that starts
        # first, and it keeps the result independent of how ids are chunked.
        hits = [(i + len(stop), i, stop) for stop in self.stops if (i := s.find(stop)) >= 0]
        if not hits:
            return None
        _, start, stop = min(hits)
        return start, stop

    def _partial_stop_len(self, s: str) -> int:
        """Length of the longest suffix of ``s`` that a stop string starts with."""
        longest = max((len(x) for x in self.stops), default=1)
        for k in range(min(len(s), longest - 1), 0, -1):
            tail = s[-k:]
            if any(stop.startswith(tail) for stop in self.stops):
                return k
        return 0
