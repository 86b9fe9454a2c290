"""Per-request sampling settings, validated at construction so bad values never reach a worker."""
from dataclasses import dataclass, field

import msgspec

from common.errors import InvalidRequestError

MAX_LOGPROBS = 20


class GrammarSpec(msgspec.Struct, frozen=True):
    """A constraint on the output (structured outputs, forced tool calls), compiled by common.grammar where used;
    plain data here so it rides the wire and the router can hold one without importing xgrammar."""
    kind: str  # "json_schema" | "json_object" | "structural_tag" | "regex" | "ebnf"
    spec: str  # schema / structural-tag JSON / regex / EBNF text; "" for json_object
    strict: bool = True  # json_schema: properties not in the schema are not allowed


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    min_p: float = 0.0
    max_tokens: int | None = 16  # None: up to the context length
    ignore_eos: bool = False
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # top-N logprobs per generated token
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI: -100..100)
    grammar: GrammarSpec | None = None  # the output must match it (token masks while sampling)

    def __post_init__(self):
        def check(ok: bool, msg: str):
            if not ok:
                raise InvalidRequestError(msg)

        check(isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 100.0,
              f"temperature must be in [0, 100], got {self.temperature!r}")
        check(isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
              f"top_p must be in (0, 1], got {self.top_p!r}")
        check(isinstance(self.top_k, int) and self.top_k >= -1, f"top_k must be -1, 0 or positive, got {self.top_k!r}")
        check(isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p <= 1.0,
              f"min_p must be in [0, 1], got {self.min_p!r}")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids must be non-negative integers")
        check(isinstance(self.presence_penalty, (int, float)) and -2.0 <= self.presence_penalty <= 2.0,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        check(isinstance(self.frequency_penalty, (int, float)) and -2.0 <= self.frequency_penalty <= 2.0,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        check(isinstance(self.repetition_penalty, (int, float)) and 0.0 < self.repetition_penalty <= 10.0,
              f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
              f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        check(self.logit_bias is None or all(isinstance(t, int) and t >= 0 and isinstance(b, (int, float))
                                             and -100 <= b <= 100 for t, b in self.logit_bias.items()),
              "logit_bias maps token ids to values in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
