"""router.routing on hand-built worker records: decode and prefill picks, and the prefix shadow."""
from __future__ import annotations

from common.block_hash import block_hashes
from common.cluster.protocol import DECODE, PREFILL, WorkerInfo, WorkerLoad
from router.registry import Worker
from router.routing import PREFIX_BALANCE_SLACK, cached_prefix_len, pick_decode, pick_prefill, remember_prefix

BLOCK = 4


def worker(worker_id: str, role: str = DECODE, inflight: int = 0, free_blocks: int = 0, assigned: int = 0,
           num_blocks: int = 64) -> Worker:
    info = WorkerInfo(worker_id, role, "tiny", f"tcp://127.0.0.1:{len(worker_id)}", "zmq", "layout", BLOCK,
                      num_blocks, 256)
    w = Worker(info, WorkerLoad(free_blocks=free_blocks, total_blocks=num_blocks), last_seen=0.0, assigned=assigned)
    w.inflight.update(f"{worker_id}-r{i}#0" for i in range(inflight))
    return w


def prefill(worker_id: str, inflight: int = 0, cached: list[int] = (), assigned: int = 0, num_blocks: int = 64):
    w = worker(worker_id, PREFILL, inflight=inflight, assigned=assigned, num_blocks=num_blocks)
    remember_prefix(w, list(cached))
    return w


PROMPT = list(range(100, 100 + 5 * BLOCK + 2))  # five full blocks and a partial one
HASHES = block_hashes(PROMPT, BLOCK)


# --- decode ---------------------------------------------------------------------------------------------------
def test_decode_fewest_in_flight_first():
    busy, idle = worker("busy", inflight=2, free_blocks=500), worker("idle", inflight=1, free_blocks=1)
    assert pick_decode([busy, idle]) is idle


def test_decode_most_free_blocks_breaks_a_tie():
    small, big = worker("small", inflight=1, free_blocks=10), worker("big", inflight=1, free_blocks=30)
    assert pick_decode([small, big]) is big


def test_decode_fewest_assigned_breaks_the_rest():
    old, new = worker("old", free_blocks=8, assigned=7), worker("new", free_blocks=8, assigned=3)
    assert pick_decode([old, new]) is new


def test_decode_skips_workers_that_rejected_the_attempt():
    best, other = worker("best", free_blocks=100), worker("other", inflight=3)
    assert pick_decode([best, other], rejected_by={"best"}) is other
    assert pick_decode([best, other], rejected_by={"best", "other"}) is None
    assert pick_decode([]) is None


# --- prefill --------------------------------------------------------------------------------------------------
def test_prefill_none_without_workers():
    assert pick_prefill([], PROMPT) == (None, [])


def test_prefill_hashes_are_the_full_blocks():
    chosen, hashes = pick_prefill([prefill("p")], PROMPT)
    assert chosen.worker_id == "p" and hashes == HASHES and len(hashes) == 5


def test_longest_cached_prefix_wins():
    short, long_ = prefill("short", cached=HASHES[:2]), prefill("long", inflight=PREFIX_BALANCE_SLACK,
                                                                 cached=HASHES[:4])
    assert cached_prefix_len(short, HASHES) == 2 and cached_prefix_len(long_, HASHES) == 4
    assert pick_prefill([short, long_], PROMPT)[0] is long_  # busier, but within the slack


def test_only_a_leading_run_of_blocks_counts():
    middle = prefill("middle", cached=HASHES[1:])  # everything but the first block: no usable prefix
    head = prefill("head", inflight=1, cached=HASHES[:1])
    assert cached_prefix_len(middle, HASHES) == 0
    assert pick_prefill([middle, head], PROMPT)[0] is head


def test_cached_prefix_loses_when_more_than_the_slack_busier():
    idle, cached = prefill("idle"), prefill("cached", inflight=PREFIX_BALANCE_SLACK + 1, cached=HASHES)
    assert pick_prefill([idle, cached], PROMPT)[0] is idle
    within = prefill("within", inflight=PREFIX_BALANCE_SLACK, cached=HASHES)
    assert pick_prefill([idle, within], PROMPT)[0] is within


def test_prefill_without_cached_prefix_least_in_flight_then_fewest_assigned():
    a, b, c = prefill("a", inflight=2), prefill("b", inflight=1, assigned=9), prefill("c", inflight=1, assigned=4)
    assert pick_prefill([a, b, c], PROMPT)[0] is c


def test_equal_prefixes_go_to_the_less_busy():
    busy, calm = prefill("busy", inflight=3, cached=HASHES[:3]), prefill("calm", inflight=1, cached=HASHES[:3])
    assert pick_prefill([busy, calm], PROMPT)[0] is calm


# --- the prefix shadow ----------------------------------------------------------------------------------------
def test_shadow_is_an_lru_bounded_by_num_blocks():
    w = prefill("p", num_blocks=3)
    remember_prefix(w, [1, 2, 3])
    remember_prefix(w, [1])  # used again: now the freshest
    remember_prefix(w, [4])  # evicts the least recently sent, 2
    assert list(w.cached_prefix) == [3, 1, 4]
    remember_prefix(w, [5, 6, 7, 8])
    assert list(w.cached_prefix) == [6, 7, 8]


def test_a_remembered_prompt_routes_back_to_its_worker():
    a, b = prefill("a"), prefill("b", assigned=1)
    first, hashes = pick_prefill([a, b], PROMPT)
    assert first is a
    remember_prefix(a, hashes)
    a.inflight.add("x#0")  # now busier than b, but holding the prompt
    assert pick_prefill([a, b], PROMPT + [1, 2, 3])[0] is a
