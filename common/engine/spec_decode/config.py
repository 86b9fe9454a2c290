"""What speculative decoding is asked to do (speculative_config), and how many drafts a sequence may verify."""
from __future__ import annotations

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
