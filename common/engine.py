"""The engine core: a scheduler, a block manager and a model runner stepping together.

The same core serves every role; this module is the colocated form (prefill and decode in one process), which
is the offline LLM and the baseline that disaggregation is measured against.
"""
import os

from common.block_manager import BlockManager
from common.config import EngineConfig
from common.errors import InvalidRequestError
from common.model_runner import ModelRunner
from common.sampling_params import SamplingParams
from common.scheduler import Scheduler
from common.sequence import Sequence


def eos_token_ids(folder: str, hf_config) -> set[int]:
    from transformers import GenerationConfig

    ids = None
    if os.path.isfile(os.path.join(folder, "generation_config.json")):
        ids = GenerationConfig.from_pretrained(folder).eos_token_id
    if ids is None:
        ids = getattr(hf_config, "eos_token_id", None)
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {ids}


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner = ModelRunner(config)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_ids = eos_token_ids(config.model, config.hf_config)
        self.vocab_size = config.hf_config.vocab_size
        self.num_prefill_tokens_computed = 0
        self.num_decode_tokens_computed = 0

    def add_request(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        max_len = self.config.max_model_len
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(token_ids) >= max_len:
            raise InvalidRequestError(f"the prompt has {len(token_ids)} tokens, but the context length is "
                                      f"{max_len}: it must leave room for at least one new token")
        longest = min(len(token_ids) + (params.max_tokens or max_len), max_len)
        if self.block_manager.blocks_needed(longest) > self.block_manager.num_blocks:
            raise InvalidRequestError(f"a sequence of {longest} tokens does not fit in the KV cache "
                                      f"({self.block_manager.num_blocks} blocks of {self.config.block_size})")
        seq = Sequence(token_ids, params, request_id)
        self.scheduler.add(seq)
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Sequence]:
        """One forward pass over the next batch; returns the sequences that finished in it."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        seqs, tokens, logprobs = self.runner.run(scheduled)
        for seq, n in scheduled:
            is_decode = n == 1 and seq.num_output_tokens > 0 and seq.num_computed_tokens + 1 == seq.num_tokens
            if is_decode:
                self.num_decode_tokens_computed += 1
            else:
                self.num_prefill_tokens_computed += n
            seq.num_computed_tokens += n
            self.block_manager.publish_computed(seq)
        finished = []
        for seq, token, entry in zip(seqs, tokens, logprobs):
            seq.token_ids.append(token)
            if seq.logprobs is not None:
                seq.logprobs.append(entry)
            reason = self._finish_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return "stop"
        if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) \
                or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hit_tokens": bm.prefix_hits,
            "num_prefill_tokens_computed": self.num_prefill_tokens_computed,
            "num_decode_tokens_computed": self.num_decode_tokens_computed,
            "free_blocks": bm.num_free_blocks,
            "total_blocks": bm.num_blocks,
            "num_waiting": len(self.scheduler.waiting),
            "num_running": len(self.scheduler.running),
        }
