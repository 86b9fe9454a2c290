"""Scheduler: token budget, sequence cap, chunked prefill, preemption without starvation."""
from common.engine.block_manager import BlockManager
from common.sampling_params import SamplingParams
from common.engine.scheduler import Scheduler
from common.engine.sequence import Sequence


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=32):
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget)


def run_step(sched: Scheduler, new_token=1):
    """What the engine does after a forward pass, without a model."""
    batch = sched.schedule()
    for seq, n in batch:
        seq.num_computed_tokens += n
        sched.block_manager.publish_computed(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(new_token)
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")
    return batch


def seq(n, max_tokens=4, start=0):
    return Sequence(list(range(start, start + n)), SamplingParams(temperature=0, max_tokens=max_tokens))


def test_budget_chunks_long_prompts():
    s = make(budget=10)
    a, b = seq(25), seq(3, start=100)
    s.add(a)
    s.add(b)
    assert [(x is a, n) for x, n in run_step(s)] == [(True, 10)]
    assert [(x is a, n) for x, n in run_step(s)] == [(True, 10)]
    batch = run_step(s)  # a finishes its prompt with 5 tokens, b gets the rest of the budget
    assert [(x is a, n) for x, n in batch] == [(True, 5), (False, 3)]


def test_decode_and_prefill_share_a_step():
    s = make(budget=16)
    a = seq(4, max_tokens=10)
    s.add(a)
    run_step(s)
    b = seq(8, start=50)
    s.add(b)
    batch = run_step(s)
    assert [(x is a, n) for x, n in batch] == [(True, 1), (False, 8)]


def test_max_num_seqs_caps_running():
    s = make(max_num_seqs=2, budget=100)
    for i in range(4):
        s.add(seq(4, start=10 * i))
    run_step(s)
    assert len(s.running) == 2 and len(s.waiting) == 2


def test_preemption_frees_blocks_and_everything_finishes():
    s = make(num_blocks=6, block_size=4, budget=64)
    seqs = [seq(7, max_tokens=8, start=100 * i) for i in range(3)]
    for x in seqs:
        s.add(x)
    for _ in range(200):
        if not s.has_unfinished():
            break
        run_step(s)
    assert not s.has_unfinished()
    assert s.num_preemptions > 0
    assert all(x.num_output_tokens == 8 for x in seqs)
    assert s.block_manager.num_free_blocks == 6


def test_fcfs_admission_does_not_let_small_requests_jump_ahead():
    s = make(num_blocks=4, block_size=4, budget=64)
    big = seq(12, max_tokens=2)
    s.add(big)
    run_step(s)
    huge = seq(14, max_tokens=2, start=100)  # needs all 4 blocks: waits until big is done
    small = seq(2, max_tokens=2, start=200)
    s.add(huge)
    s.add(small)
    run_step(s)
    assert huge in s.waiting and small in s.waiting
    for _ in range(20):
        if not s.has_unfinished():
            break
        run_step(s)
    assert huge.is_finished and small.is_finished
