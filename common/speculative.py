"""Speculative decoding: propose a few tokens per running decode, and let one forward pass of the target check them.

Two proposers: n-gram prompt lookup (the tokens that followed the latest earlier occurrence of the sequence's last n
tokens; below) and a smaller draft model run greedily (common/draft_model.py).

Verification is exact by construction: every position is sampled exactly as plain decoding would sample it (the
same logits, and for seeded requests the same per-position noise), and a draft token is kept only while it equals
that sample. Greedy and seeded output are therefore identical to decoding without speculation, and unseeded
sampling follows the target distribution: both proposals are deterministic functions of the tokens so far, so they
need no rejection-sampling correction. (vLLM's rejection sampler accepts more often at temperature > 0 for a draft
model, by using the draft's probabilities, but its output cannot equal a seeded plain run.)
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass

from common.errors import InvalidRequestError

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 3
    model: str | None = None  # the draft model (method draft_model): an HF folder or .gguf with the target's vocab
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    # on CPU verifying k drafts costs about k tokens of compute, which only pays while the batch is small
    disable_by_batch_size: int | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "SpeculativeConfig | None":
        if d is None:
            return None
        if not isinstance(d, dict):
            raise InvalidRequestError("speculative_config must be a dict (JSON object)")
        if "method" not in d and d.get("model") is not None:
            d = {**d, "method": "draft_model"}  # as vLLM infers it from a draft model without a method
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidRequestError(f"unknown speculative_config keys {sorted(unknown)}")
        cfg = cls(**d)
        if cfg.method not in METHODS:
            raise InvalidRequestError(f"speculative method {cfg.method!r} is not supported ({', '.join(METHODS)})")
        if cfg.method == "draft_model" and not (isinstance(cfg.model, str) and cfg.model):
            raise InvalidRequestError('speculative method draft_model needs "model": the draft model\'s path')
        if cfg.method != "draft_model" and cfg.model is not None:
            raise InvalidRequestError(f'speculative "model" is only used by method draft_model, not {cfg.method}')
        if not (isinstance(cfg.num_speculative_tokens, int) and 1 <= cfg.num_speculative_tokens <= 16):
            raise InvalidRequestError("num_speculative_tokens must be in [1, 16]")
        if not 1 <= cfg.prompt_lookup_min <= cfg.prompt_lookup_max:
            raise InvalidRequestError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        if cfg.disable_by_batch_size is not None and cfg.disable_by_batch_size < 1:
            raise InvalidRequestError("disable_by_batch_size must be >= 1")
        return cfg


def draft_room(seq, num_speculative_tokens: int, max_model_len: int) -> int:
    """How many draft tokens seq may verify this step: 0 unless it is a running decode that plain sampling treats
    position by position (no penalties, logprobs or grammar, which depend on the tokens before them being final),
    and never more than its max_tokens and the context length leave room for."""
    p = seq.params
    if seq.num_output_tokens == 0 or seq.num_computed_tokens + 1 != seq.num_tokens or p.has_penalties \
            or p.logprobs is not None or seq.grammar is not None:
        return 0
    room = min((p.max_tokens or max_model_len) - seq.num_output_tokens, max_model_len - seq.num_tokens) - 1
    return max(0, min(num_speculative_tokens, room))


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
