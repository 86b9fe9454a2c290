"""Draft-model speculative decoding: a smaller model with the target's vocabulary proposes k tokens greedily.

The draft model has its own KV pool with the target pool's block count and block size, indexed by the target's
block tables: slot s of the draft pool belongs to whichever token holds slot s of the target pool. So the draft
needs no block manager of its own, its KV is freed, preempted and reused together with the target's, and it only
ever writes into blocks its sequence holds. Per sequence it keeps one number, Sequence.num_draft_kv_tokens: the
leading tokens whose draft KV it computed for this sequence in its current blocks. KV it did not compute itself is
never trusted (a prefix-cache hit, or a prompt whose target KV came from a prefill worker), so on first use it
prefills the prompt itself.

Order within an engine step: the engine appends placeholder drafts, the scheduler reserves their slots (and trims
what the budget does not fit), then propose() replaces the placeholders with real drafts, writing the draft KV of
those positions into the slots the target verifies them in.
"""
from __future__ import annotations

import dataclasses

from common.engine.config import EngineConfig
from common.errors import InvalidRequestError
from common.sampling_params import SamplingParams
from common.engine.sequence import Sequence
from common.engine.spec_decode.config import SpeculativeConfig

_GREEDY = SamplingParams(temperature=0.0)


class DraftProposer:
    def __init__(self, target: EngineConfig, spec: SpeculativeConfig):
        """Reads and checks the draft model's config; load() builds it once the target pool's size is known."""
        # the target's engine arguments (dtype, block size, device, batch limits, ...) with the draft's model and
        # context length; the pool's size comes in load()
        args = {f.name: getattr(target, f.name) for f in dataclasses.fields(target) if f.init}
        args.update(model=spec.model, hf_config=None, max_model_len=None, speculative_config=None, num_kv_blocks=1,
                    enable_prefix_caching=False)
        self.config = EngineConfig(**args)
        vocab, target_vocab = self.config.hf_config.vocab_size, target.hf_config.vocab_size
        if vocab != target_vocab:
            raise InvalidRequestError(f"the draft model {spec.model} has a vocabulary of {vocab} tokens, the target "
                                      f"{target_vocab}: a draft model must share the target's tokenizer")
        from common.models import model_class
        if getattr(model_class(self.config.hf_config), "has_recurrent_state", False):
            # its state would keep the rejected drafts: every later proposal would be computed from a wrong past
            raise InvalidRequestError(f"the draft model {spec.model} keeps a recurrent state that cannot be rolled "
                                      f"back past rejected drafts; use a draft with attention layers only")
        self.max_model_len = self.config.max_model_len  # the draft's rotary table ends there
        self.runner = None

    def load(self, num_blocks: int):
        from common.engine.model_runner import ModelRunner

        self.config.num_kv_blocks = num_blocks
        self.runner = ModelRunner(self.config)

    def max_drafts(self, seq: Sequence) -> int:
        """Drafts whose draft-KV positions (up to num_tokens + k - 2) the draft model's context holds."""
        return max(0, self.max_model_len - seq.num_tokens + 1)

    def propose(self, seqs: list[Sequence]):
        """Replace each sequence's seq.num_draft placeholder drafts by the draft model's greedy proposals: catch up
        on the tokens whose draft KV is missing (one forward for the whole batch, chunked by the token budget),
        then one single-token forward per further draft position, batched across sequences."""
        views = []
        for seq in seqs:
            real = seq.num_tokens - seq.num_draft
            # a greedy stand-in for the draft model's pass: the sequence's real tokens and blocks, the draft's progress
            view = Sequence(seq.token_ids[:real], _GREEDY)
            view.block_table = seq.block_table
            view.num_computed_tokens = min(seq.num_draft_kv_tokens, real - 1)  # the last token gives the logits
            views.append(view)
        lagging = views
        while lagging:
            batch, budget = [], self.config.max_num_batched_tokens
            for view in lagging:
                if budget == 0:
                    break
                n = min(view.num_tokens - view.num_computed_tokens, budget)
                batch.append((view, n))
                budget -= n
            sampled = {id(v) for v in self._forward(batch)}
            lagging = [v for v in lagging if id(v) not in sampled]
        for j in range(1, max(s.num_draft for s in seqs)):
            self._forward([(v, 1) for v, s in zip(views, seqs) if s.num_draft > j])
        for seq, view in zip(seqs, views):
            real = seq.num_tokens - seq.num_draft
            seq.token_ids[real:] = view.token_ids[real:]
            seq.num_draft_kv_tokens = view.num_computed_tokens

    def _forward(self, batch: list[tuple[Sequence, int]]) -> list[Sequence]:
        """One draft forward over (view, new tokens); views whose tokens are now all computed get their argmax
        appended. Returns those views."""
        done, tokens, _ = self.runner.run(batch)
        for view, n in batch:
            view.num_computed_tokens += n
        for view, token in zip(done, tokens):
            view.token_ids.append(token)
        return done
