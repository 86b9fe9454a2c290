"""Where an attempt goes: pure functions over worker records (router.registry.Worker), no sockets.

Decode: the worker with the fewest requests in flight, then the most free KV blocks, then the fewest ever
assigned. Prefill: the worker holding the longest prefix of the prompt's blocks, as far as the router's shadow of
its prefix cache knows, unless it has more than PREFIX_BALANCE_SLACK more requests in flight than the least busy
one; then the least busy. The shadow is an LRU of the block hashes sent to each prefill (or mixed) worker, bounded
by its number of KV blocks. A mixed worker, among the decode candidates, computes the prompt itself, so its cached
prefix counts the same way.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence

from common.block_hash import block_hashes
from common.cluster.protocol import MIXED
from router.registry import Worker

PREFIX_BALANCE_SLACK = 4  # a prefill worker with a longer cached prefix wins while it has at most this many more


def pick_decode(workers: Sequence[Worker], rejected_by: Collection[str] = (),
                token_ids: Sequence[int] = ()) -> Worker | None:
    """The least loaded of the (live decode or mixed) workers that have not refused the attempt, a mixed one with
    the longest cached prefix of token_ids first (within the slack); None if none is left."""
    candidates = [w for w in workers if w.worker_id not in rejected_by]
    if not candidates:
        return None
    least = min(len(w.inflight) for w in candidates)
    hashes: dict[int, list[int]] = {}  # by block size

    def cached(w: Worker) -> int:
        if w.info.role != MIXED or not token_ids or len(w.inflight) > least + PREFIX_BALANCE_SLACK:
            return 0
        size = w.info.block_size
        if size not in hashes:
            hashes[size] = block_hashes(list(token_ids), size)
        return cached_prefix_len(w, hashes[size])
    return min(candidates, key=lambda w: (-cached(w), len(w.inflight), -w.load.free_blocks, w.assigned))


def pick_prefill(workers: Sequence[Worker], token_ids: list[int]) -> tuple[Worker | None, list[int]]:
    """The (live prefill) worker for token_ids, and their full blocks' hashes (to remember_prefix once sent)."""
    if not workers:
        return None, []
    hashes = block_hashes(token_ids, workers[0].info.block_size)
    least = min(len(w.inflight) for w in workers)

    def score(w: Worker):
        balanced = len(w.inflight) <= least + PREFIX_BALANCE_SLACK
        return (-cached_prefix_len(w, hashes) if balanced else 0, len(w.inflight), w.assigned)
    return min(workers, key=score), hashes


def cached_prefix_len(worker: Worker, hashes: list[int]) -> int:
    """How many leading blocks of hashes the worker's shadow holds."""
    matched = 0
    for h in hashes:
        if h not in worker.cached_prefix:
            break
        matched += 1
    return matched


def remember_prefix(worker: Worker, hashes: list[int]):
    """The worker is computing (and will cache) these blocks: the freshest entries of its LRU shadow."""
    shadow = worker.cached_prefix
    for h in hashes:
        shadow[h] = None
        shadow.move_to_end(h)
    while len(shadow) > worker.info.num_blocks:
        shadow.popitem(last=False)
