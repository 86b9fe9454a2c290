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
        # leading tokens whose draft-model KV (draft_model speculation) sits in the draft pool's copy of this
        # sequence's blocks; the num_computed_tokens setter rolls it back
        self.num_draft_kv_tokens = 0
        # tokens whose KV is in the cache; the rest of token_ids still has to go through the model
        self._num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit of the latest admission
        self.block_table: list[int] = []
        self.num_registered_blocks = 0  # leading full blocks already published to the prefix cache
        self._hashes: list[int] = []
        self.finish_reason: str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.grammar = None  # common.grammar.GrammarMatcher when params.grammar is set
        self.num_draft = 0  # speculative tokens at the end of token_ids, not yet verified
        self.num_new_tokens = 0  # tokens the latest step appended (several when drafts were accepted)
        self.num_spec_draft_tokens = 0  # speculative tokens this request verified
        self.num_spec_accepted_tokens = 0  # of which kept

    @property
    def num_computed_tokens(self) -> int:
        return self._num_computed_tokens

    @num_computed_tokens.setter
    def num_computed_tokens(self, n: int):
        # the count only falls when the blocks are given back (preemption, finish): the draft model's KV lived in
        # those same blocks, so it is gone too. (Rejected drafts never counted as computed; the engine trims the
        # draft count for those itself.)
        if n < self._num_computed_tokens:
            self.num_draft_kv_tokens = min(self.num_draft_kv_tokens, n)
        self._num_computed_tokens = n

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
