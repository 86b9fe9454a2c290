"""One request's tokens and progress through the engine."""
import enum
import itertools

from common.block_hash import block_hashes
from common.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    _ids = itertools.count()

    def __init__(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        # tokens whose KV is in the cache; the rest of token_ids still has to go through the model
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit of the latest admission
        self.block_table: list[int] = []
        self.num_registered_blocks = 0  # leading full blocks already published to the prefix cache
        self._hashes: list[int] = []
        self.finish_reason: str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.grammar = None  # common.grammar.GrammarMatcher when params.grammar is set
        self.num_draft = 0  # speculative tokens at the end of token_ids, not yet verified
        self.num_new_tokens = 0  # tokens the latest step appended (several when drafts were accepted)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_running(self) -> bool:
        return self.status == SequenceStatus.RUNNING

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def full_block_hashes(self, block_size: int) -> list[int]:
        """Hash chain of the full blocks of token_ids, extended incrementally as tokens are appended."""
        if len(self._hashes) < len(self.token_ids) // block_size:
            self._hashes = block_hashes(self.token_ids, block_size, self._hashes)
        return self._hashes

    def block_tokens(self, index: int, block_size: int) -> list[int]:
        return self.token_ids[index * block_size:(index + 1) * block_size]
