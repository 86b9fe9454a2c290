"""The engine core: a scheduler, a block manager and a model runner stepping together.

The same core serves every role. Colocated (the offline LLM, and the baseline that disaggregation is measured
against) uses add_request + step. A prefill worker also uses hold_finished: a sequence that has sampled its first
token keeps its blocks until release(), because the KV transfer still reads them. A decode worker reserves blocks
for a request before any prefill is spent (reserve), then starts decoding once the KV has landed (start_decoding),
or computes the prompt itself (start_prefill: a mixed worker, or a short uncached tail).
"""
import os
import time

from common.engine.block_manager import BlockManager
from common.engine.config import EngineConfig
from common.errors import InvalidRequestError
from common.engine.model_runner import ModelRunner
from common.sampling_params import SamplingParams
from common.engine.scheduler import Scheduler
from common.engine.sequence import Sequence, SequenceStatus
from common.engine.spec_decode.config import draft_room
from common.engine.spec_decode.ngram import propose_ngram


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
    def __init__(self, config: EngineConfig, hold_finished: bool = False):
        self.config = config
        self.hold_finished = hold_finished
        spec = config.speculative
        # a prefill worker (hold_finished) never decodes past the first token, so it has nothing to draft for
        self.drafter = None
        if spec is not None and spec.method == "draft_model" and not hold_finished:
            from common.engine.spec_decode.draft_model import DraftProposer
            self.drafter = DraftProposer(config, spec)  # checks the draft's config before the target loads
        self.runner = ModelRunner(config)
        if self.drafter is not None:
            self.drafter.load(self.runner.kv.num_blocks)
        self.block_manager = BlockManager(self.runner.kv.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_ids = eos_token_ids(config.model, config.hf_config)
        self.vocab_size = config.hf_config.vocab_size
        self.num_prefill_tokens_computed = 0
        self.num_decode_tokens_computed = 0
        self.prefill_seconds = 0.0  # wall time of the steps that computed prompt tokens (the prefill speed's divisor)
        self._grammar_compiler = None  # made on the first request with a grammar (loads the tokenizer)
        self.num_draft_tokens = 0  # speculative tokens proposed and checked
        self.num_accepted_tokens = 0  # of which kept
        self.num_verify_steps = 0  # (sequence, step) pairs that verified at least one draft

    def add_request(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        seq = self.new_sequence(token_ids, params, request_id)
        self.scheduler.add(seq)
        return seq

    def new_sequence(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     num_generated: int = 0) -> Sequence:
        """A validated sequence, not yet queued: raises InvalidRequestError for anything the engine cannot run.
        num_generated: the last tokens of token_ids are output generated earlier (a migrated request), so
        max_tokens, penalties and seeded draws continue exactly where they were."""
        max_len = self.config.max_model_len
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if params.logit_bias and max(params.logit_bias) >= self.vocab_size:
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {self.vocab_size})")
        if len(token_ids) >= max_len:
            raise InvalidRequestError(f"the prompt has {len(token_ids)} tokens, but the context length is "
                                      f"{max_len}: it must leave room for at least one new token")
        if not 0 <= num_generated < len(token_ids):
            raise InvalidRequestError(f"num_generated must be in [0, {len(token_ids)})")
        longest = min(len(token_ids) - num_generated + (params.max_tokens or max_len), max_len)
        if self.block_manager.blocks_needed(longest) > self.block_manager.num_blocks:
            raise InvalidRequestError(f"a sequence of {longest} tokens does not fit in the KV cache "
                                      f"({self.block_manager.num_blocks} blocks of {self.config.block_size})")
        seq = Sequence(token_ids, params, request_id)
        seq.num_prompt_tokens -= num_generated
        if params.grammar is not None:
            seq.grammar = self._grammar_matcher(params.grammar, seq.output_token_ids)
        return seq

    def _grammar_matcher(self, spec, generated: list[int]):
        from common.grammar import GrammarCompiler, GrammarMatcher

        if self._grammar_compiler is None:
            from transformers import AutoTokenizer
            self._grammar_compiler = GrammarCompiler(AutoTokenizer.from_pretrained(self.config.model),
                                                     self.vocab_size, sorted(self.eos_ids))
        matcher = GrammarMatcher(self._grammar_compiler.compile(spec))
        try:
            matcher.replay(generated)  # a migrated request resumes its grammar where it was
        except ValueError as e:
            raise InvalidRequestError(f"the tokens generated so far do not fit the grammar: {e}") from None
        return matcher

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Sequence]:
        """One forward pass over the next batch; returns the sequences that sampled in it, each with
        num_new_tokens set (several when speculative tokens were accepted; finished ones have is_finished set)."""
        drafted = self._propose_drafts()
        scheduled = self.scheduler.schedule()
        self._trim_drafts(drafted, scheduled)
        if self.drafter is not None:
            kept = [seq for seq in drafted if seq.num_draft]
            if kept:
                self.drafter.propose(kept)
        if not scheduled:
            return []
        started = time.perf_counter()
        seqs, tokens, logprobs = self.runner.run(scheduled)
        elapsed = time.perf_counter() - started
        prefilled = self.num_prefill_tokens_computed
        for seq, n in scheduled:
            is_decode = seq.num_output_tokens > 0 and seq.num_computed_tokens + n == seq.num_tokens \
                and n == 1 + seq.num_draft
            if is_decode:
                self.num_decode_tokens_computed += n
            else:
                self.num_prefill_tokens_computed += n
            # KV computed for a rejected draft stays in its slot unpublished, and is overwritten later
            seq.num_computed_tokens += n - seq.num_draft
        if self.num_prefill_tokens_computed > prefilled:
            self.prefill_seconds += elapsed
        sampled = []
        i = 0
        while i < len(seqs):
            seq = seqs[i]
            rows = 1 + seq.num_draft
            self._accept(seq, tokens[i:i + rows], logprobs[i:i + rows])
            # the draft model's KV for rejected positions is stale: recomputed when it catches up
            seq.num_draft_kv_tokens = min(seq.num_draft_kv_tokens, seq.num_computed_tokens)
            sampled.append(seq)
            i += rows
        for seq, _ in scheduled:
            self.block_manager.publish_computed(seq)
        return sampled

    def _accept(self, seq: Sequence, tokens: list[int], logprobs: list):
        """Keep the sampled tokens up to and including the first that differs from its draft."""
        drafts = seq.token_ids[len(seq.token_ids) - seq.num_draft:] if seq.num_draft else []
        del seq.token_ids[len(seq.token_ids) - seq.num_draft:]
        if drafts:
            self.num_verify_steps += 1
            self.num_draft_tokens += len(drafts)
            seq.num_spec_draft_tokens += len(drafts)
        seq.num_draft = seq.num_new_tokens = 0
        for j, token in enumerate(tokens):
            self._append(seq, token)
            seq.num_new_tokens += 1
            if seq.logprobs is not None:
                seq.logprobs.append(logprobs[j])
            accepted = j < len(drafts) and token == drafts[j]
            if accepted:
                self.num_accepted_tokens += 1
                seq.num_spec_accepted_tokens += 1
                seq.num_computed_tokens += 1  # the draft's KV is this token's: keep it
            reason = self._finish_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason, free=not self.hold_finished)
                return
            if not accepted:
                return

    def _propose_drafts(self) -> list[Sequence]:
        """Drafts for the running decodes that may verify some (see draft_room): n-gram drafts, or for a draft
        model placeholders, which reserve the drafts' slots in the scheduler and are filled after it ran."""
        spec = self.config.speculative
        if spec is None or (spec.method == "draft_model" and self.drafter is None):  # a prefill worker
            return []
        if spec.disable_by_batch_size is not None and len(self.scheduler.running) > spec.disable_by_batch_size:
            return []
        drafted = []
        for seq in self.scheduler.running:
            room = draft_room(seq, spec.num_speculative_tokens, self.config.max_model_len)
            if not room:
                continue
            if self.drafter is not None:  # any token will do: propose() overwrites them before the target runs
                drafts = [seq.token_ids[-1]] * min(room, self.drafter.max_drafts(seq))
            else:
                drafts = propose_ngram(seq.token_ids, room, spec.prompt_lookup_max, spec.prompt_lookup_min)
            if drafts:
                seq.token_ids.extend(drafts)
                seq.num_draft = len(drafts)
                drafted.append(seq)
        return drafted

    @staticmethod
    def _trim_drafts(drafted: list[Sequence], scheduled: list[tuple[Sequence, int]]):
        """Drafts the token budget did not fit (or whose sequence was preempted) are dropped before the pass."""
        budget = {seq.seq_id: n for seq, n in scheduled}
        for seq in drafted:
            keep = budget.get(seq.seq_id, 1) - 1 if seq.is_running else 0
            if keep < seq.num_draft:
                del seq.token_ids[len(seq.token_ids) - (seq.num_draft - keep):]
                seq.num_draft = keep

    def release(self, seq: Sequence):
        """Give back the blocks of a finished sequence that hold_finished kept."""
        self.block_manager.free_seq(seq)

    def abort(self, seq: Sequence):
        """Drop a queued or running sequence and free its blocks."""
        if seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        elif seq in self.scheduler.running:
            self.scheduler.finish(seq, "abort")
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        self.block_manager.free_seq(seq)

    # --- decode role ----------------------------------------------------------------------------------------
    def reserve(self, seq: Sequence, watermark_blocks: int = 0) -> bool:
        """Allocate blocks for seq's tokens (reusing cached prefix blocks) unless fewer than watermark_blocks would
        remain free for the running sequences to grow into. seq.num_computed_tokens = the cached prefix."""
        bm = self.block_manager
        if not bm.can_allocate(seq) or bm.num_free_blocks - bm.blocks_needed(seq.num_tokens) < watermark_blocks:
            return False
        bm.allocate(seq)
        return True

    def start_prefill(self, seq: Sequence):
        """Compute the reserved seq's uncached tokens here: it joins the running batch, whose steps chunk its
        prefill under the token budget beside the decodes, and samples its first token like any sequence."""
        seq.status = SequenceStatus.RUNNING
        self.scheduler.running.append(seq)

    def start_decoding(self, seq: Sequence, first_token: int) -> str | None:
        """The KV of all of seq's tokens is in its reserved blocks: append the first token and make seq a running
        decode. Returns a finish reason when that token already ends it (the blocks are then freed)."""
        seq.num_computed_tokens = seq.num_tokens
        self.block_manager.publish_computed(seq)
        self._append(seq, first_token)
        seq.status = SequenceStatus.RUNNING
        self.scheduler.running.append(seq)
        reason = self._finish_reason(seq, first_token)
        if reason:
            self.scheduler.finish(seq, reason)
        return reason

    def _append(self, seq: Sequence, token: int):
        seq.token_ids.append(token)
        if seq.grammar is not None:
            seq.grammar.accept(token)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return "stop"
        if seq.grammar is not None and seq.grammar.is_terminated():
            return "stop"  # the output is complete; the grammar would only allow a stop token now
        if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) \
                or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def close(self):
        """Stops the other tensor-parallel ranks, if any (nothing to do for a single-process engine)."""
        self.runner.close()

    def _queued_prompt_tokens(self) -> int:
        # a worker's heartbeat thread asks while the engine loop steps: tuple() copies each queue in one C call,
        # under the GIL, where iterating the deque itself could meet a mutation and raise
        queued = tuple(self.scheduler.waiting) + tuple(self.scheduler.running)
        return sum(max(0, seq.num_prompt_tokens - seq.num_computed_tokens) for seq in queued)

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hit_tokens": bm.prefix_hits,
            "num_prefill_tokens_computed": self.num_prefill_tokens_computed,
            "num_decode_tokens_computed": self.num_decode_tokens_computed,
            "prefill_seconds": self.prefill_seconds,
            "queued_prompt_tokens": self._queued_prompt_tokens(),
            "free_blocks": bm.num_free_blocks,
            "total_blocks": bm.num_blocks,
            "num_waiting": len(self.scheduler.waiting),
            "num_running": len(self.scheduler.running),
            "spec_draft_tokens": self.num_draft_tokens,
            "spec_accepted_tokens": self.num_accepted_tokens,
            "spec_verify_steps": self.num_verify_steps,
            # vLLM's mean acceptance length: tokens a verify step yields (its accepted drafts + the one it samples)
            "spec_mean_acceptance_length": (1 + self.num_accepted_tokens / self.num_verify_steps
                                            if self.num_verify_steps else None),
        }
