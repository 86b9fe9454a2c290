"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

Each step gives every running sequence its next tokens first (one for a decode, a chunk for an unfinished
prefill), oldest first, then admits waiting sequences in arrival order while budget, sequence slots and
blocks last. When a running sequence needs a block and none is free, the newest running sequence is preempted:
its blocks are freed (their cached content stays findable) and it goes back to the head of the queue to be
recomputed. Admission is strictly first-come-first-served, so nothing starves.
"""
from collections import deque

from common.engine.block_manager import BlockManager
from common.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The (sequence, number of new tokens to compute) pairs of the next step."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            target = seq.num_computed_tokens + num_new
            while not self.block_manager.can_grow(seq, target) and self.running[-1] is not seq:
                self._preempt(self.running.pop())
                preempted = True
            if not self.block_manager.can_grow(seq, target):
                self._preempt(self.running.pop())
                preempted = True
                break
            self.block_manager.grow(seq, target)
            scheduled.append((seq, num_new))
            budget -= num_new
            i += 1
        # admitting right after a preemption would only thrash: the freed blocks go to the running sequences
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            scheduled.append((seq, num_new))
            budget -= num_new
        return scheduled

    def _preempt(self, seq: Sequence):
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str, free: bool = True):
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        if free:
            self.block_manager.free_seq(seq)
