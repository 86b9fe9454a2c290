"""Load: 500 concurrent streams all complete with the offline engine's greedy text; beyond the router's queue limit
(--max-queued-requests) new requests get a 429 with Retry-After at once, streamed or not, and beyond the decode
workers' room (--max-num-seqs running + --max-pending queued) a request gets a 429 after --admit-timeout instead
of waiting without bound. Every scenario ends with the cluster idle (nothing registered, no block held)."""
from __future__ import annotations

import pytest

from tests.reliability.streams import body, by_status, distinct_prompts, send_all
from tests.support.cluster_harness import LocalCluster, assert_all_up, assert_idle

TOKENS = 8


def expected_texts(offline, prompts: list[str], max_tokens: int) -> dict[str, str]:
    return dict(zip(prompts, offline(prompts, max_tokens, ignore_eos=True)))


def assert_overload_answers(outcomes, requests, expected: dict[str, str]):
    """Each request either completed with its greedy text or got an OpenAI 429 with Retry-After (not a 200 stream
    that ends in an error: the status line waits for the first token)."""
    assert set(by_status(outcomes)) <= {200, 429}, by_status(outcomes)
    for outcome, request in zip(outcomes, requests):
        if outcome.status == 200:
            assert outcome.error is None and outcome.text == expected[request["messages"][0]["content"]]
        else:
            assert outcome.headers.get("retry-after") == "1", outcome.headers
            assert outcome.error["type"] == "requests" and "retry after" in outcome.error["message"]


def test_500_concurrent_streams_all_complete(cluster, offline):
    prompts = distinct_prompts(10)
    expected = expected_texts(offline, prompts, TOKENS)
    requests = [body(prompts[i % len(prompts)], TOKENS, stream=True) for i in range(500)]
    outcomes = send_all(cluster.base_url, requests)
    assert by_status(outcomes) == {200: 500}
    assert all(o.text == expected[r["messages"][0]["content"]] for o, r in zip(outcomes, requests))
    assert_all_up(cluster)
    assert_idle(cluster)


@pytest.fixture(scope="module")
def overloadable(model_dir):
    """A router that holds at most 16 requests before their first token and asks full workers for 0.5 s, and one
    decode worker with room for 2 running + 2 queued requests."""
    with LocalCluster(model_dir, prefill=1, decode=0,
                      router_args=("--max-queued-requests", "16", "--admit-timeout", "0.5")) as c:
        c.add("decode", extra=("--max-num-seqs", "2", "--max-pending", "2"))
        yield c


QUEUE_FULL, WORKERS_FULL = "requests are waiting for their first token", "stayed full for 0.5 s"


def refusals(outcomes, reason: str) -> int:
    return sum(1 for o in outcomes if o.status == 429 and reason in o.error["message"])


def overload(c: LocalCluster, offline, seed: int, max_tokens: int, count: int) -> tuple[list, dict[int, int]]:
    """count requests at once (half streamed), over 4 prompts; their outcomes and counts by status, each checked by
    assert_overload_answers."""
    prompts = distinct_prompts(4, seed)
    expected = expected_texts(offline, prompts, max_tokens)
    requests = [body(prompts[i % len(prompts)], max_tokens, stream=i % 2 == 0) for i in range(count)]
    outcomes = send_all(c.base_url, requests)
    assert_overload_answers(outcomes, requests, expected)
    return outcomes, by_status(outcomes)


def test_beyond_the_queue_limit_new_requests_get_429_at_once(overloadable, offline):
    outcomes, counts = overload(overloadable, offline, seed=1, max_tokens=32, count=160)
    assert refusals(outcomes, QUEUE_FULL) > 0 and counts.get(200, 0) >= 4, counts  # 4: the decode worker's room
    metrics = overloadable.get("/metrics")[1].decode()
    assert f'nano_pd:request_errors_total{{status="429"}} {float(counts[429])}' in metrics
    assert "nano_pd:requests_queued 0.0" in metrics
    assert_all_up(overloadable)
    assert_idle(overloadable)


def test_full_decode_workers_answer_429_after_the_admit_timeout(overloadable, offline):
    # fewer requests than the queue limit, 600 tokens each, two at a time: the last ones would wait for two rounds
    # of two, far beyond the admit timeout (with 200 tokens a round took under 0.25 s on a fast CI box, and all ten
    # were admitted in time)
    outcomes, counts = overload(overloadable, offline, seed=2, max_tokens=600, count=10)
    assert refusals(outcomes, WORKERS_FULL) > 0 and refusals(outcomes, QUEUE_FULL) == 0, counts
    assert counts.get(200, 0) >= 4, counts
    assert_all_up(overloadable)
    assert_idle(overloadable)
    prompt = distinct_prompts(1, seed=3)[0]
    again = send_all(overloadable.base_url, [body(prompt, 16, stream=True)])
    assert again[0].text == expected_texts(offline, [prompt], 16)[prompt]
