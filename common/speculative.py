"""Speculative decoding by n-gram prompt lookup: propose the tokens that followed the latest earlier occurrence of
the sequence's last n tokens, and let one forward pass check them all.

Verification is exact by construction: every position is sampled exactly as plain decoding would sample it (the
same logits, and for seeded requests the same per-position noise), and a draft token is kept only while it equals
that sample. Greedy and seeded output are therefore identical to decoding without speculation, and unseeded
sampling follows the target distribution (a deterministic proposal needs no rejection-sampling correction).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass

from common.errors import InvalidRequestError


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    # on CPU verifying k drafts costs about k tokens of compute, which only pays while the batch is small
    disable_by_batch_size: int | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "SpeculativeConfig | None":
        if d is None:
            return None
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidRequestError(f"unknown speculative_config keys {sorted(unknown)}")
        cfg = cls(**d)
        if cfg.method != "ngram":
            raise InvalidRequestError(f"speculative method {cfg.method!r} is not supported (ngram)")
        if not (isinstance(cfg.num_speculative_tokens, int) and 1 <= cfg.num_speculative_tokens <= 16):
            raise InvalidRequestError("num_speculative_tokens must be in [1, 16]")
        if not 1 <= cfg.prompt_lookup_min <= cfg.prompt_lookup_max:
            raise InvalidRequestError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        if cfg.disable_by_batch_size is not None and cfg.disable_by_batch_size < 1:
            raise InvalidRequestError("disable_by_batch_size must be >= 1")
        return cfg


def propose_ngram(token_ids: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens (longest n first)."""
    if k <= 0:
        return []
    # bytes.rfind does the search in C; matches are only valid at item boundaries
    raw = array("q", token_ids).tobytes()
    width = 8
    for n in range(min(n_max, len(token_ids) - 1), n_min - 1, -1):
        suffix = raw[-n * width:]
        limit = len(raw) - width  # the match must end before the last token, i.e. start before the suffix
        while True:
            pos = raw.rfind(suffix, 0, limit)
            if pos < 0:
                break
            if pos % width == 0:
                start = pos // width + n
                return token_ids[start:start + k]
            limit = pos + len(suffix) - 1  # a misaligned hit: look for one starting further left
    return []
