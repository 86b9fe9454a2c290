"""Mixed workers (one engine that prefills and decodes its own requests) and a decode worker's local prefill of
short uncached tails, end to end against the offline engine, as the P/D cluster tests do."""
from __future__ import annotations

import json

import pytest

from tests.support.cluster_harness import LocalCluster, assert_idle
from tests.workers.test_cluster import metric_value, prompts, run_concurrently, stream_chat


def local_prefills(c: LocalCluster, role: str) -> float:
    try:
        return metric_value(c.get("/metrics")[1].decode(), f'nano_pd:local_prefills_total{{role="{role}"}}')
    except KeyError:  # the labelled series appears with its first count
        return 0.0


@pytest.mark.slow
def test_mixed_workers_alone_match_offline(model_dir, offline):
    ps = prompts(32, seed=21)
    with LocalCluster(model_dir, prefill=0, decode=0, mixed=2) as c:
        client = c.openai()
        results = run_concurrently(lambda p: stream_chat(client, p, 24), ps)
        assert [r["text"] for r in results] == offline(ps, 24)
        assert all(r["usage"].completion_tokens >= 1 for r in results)
        assert all(w["assigned"] > 0 and w["kv_transport"] == "none" for w in c.alive("mixed"))
        assert local_prefills(c, "mixed") == len(ps)
        assert_idle(c)


@pytest.mark.slow
def test_mixed_beside_prefill_and_decode_workers(model_dir, offline):
    ps = prompts(24, seed=22)
    with LocalCluster(model_dir, prefill=1, decode=1, mixed=1) as c:
        client = c.openai()
        results = run_concurrently(lambda p: stream_chat(client, p, 16), ps, workers=24)
        assert [r["text"] for r in results] == offline(ps, 16)
        for w in c.alive("prefill") + c.alive("decode") + c.alive("mixed"):
            assert w["assigned"] > 0, f"{w['worker_id']} got no traffic"
        assert 0 < local_prefills(c, "mixed") < len(ps)
        assert_idle(c)


@pytest.mark.slow
def test_decode_worker_prefills_short_uncached_tails_itself(model_dir, offline):
    """A prompt seen before leaves at most a block uncached in the decode worker's prefix cache: it is computed
    there, the rest (long, new) through the prefill worker; outputs are the same either way."""
    ps = prompts(6, seed=24, words=40)
    with LocalCluster(model_dir, 1, 0) as c:
        c.add("decode", extra=("--local-prefill-max-tokens", "16"))  # overrides the harness's 0
        client = c.openai()
        first = [stream_chat(client, p, 8)["text"] for p in ps]
        assert local_prefills(c, "decode") == 0
        again = [stream_chat(client, p, 8)["text"] for p in ps]
        assert first == again == offline(ps, 8)
        assert local_prefills(c, "decode") == len(ps)
        assert_idle(c)


def test_a_request_sent_while_the_cluster_starts_waits_for_its_worker(model_dir, offline):
    """A client that takes the router's first answer as readiness loses nothing: its request waits (up to
    --migrate-wait) for the worker that is still loading, instead of failing at once."""
    with LocalCluster(model_dir, prefill=0, decode=0) as c:
        assert c.get("/health")[0] == 503 and c.get("/v1/models")[0] == 200
        c.add("mixed", wait=False)
        status, _, got = c.post("/v1/chat/completions", {"model": "tiny", "max_tokens": 8, "temperature": 0,
                                                         "messages": [{"role": "user", "content": "river"}]})
        assert status == 200, got
        assert got["choices"][0]["message"]["content"] == offline(["river"], 8)[0]
        assert c.get("/health")[0] == 200


def test_a_request_waits_past_migrate_wait_for_a_worker_that_announces_it_is_loading(model_dir, offline):
    """The only prefill worker restarts: its replacement says it is loading before it imports anything heavy, so a
    request waits for it (up to --request-timeout) though --migrate-wait alone would have failed it."""
    with LocalCluster(model_dir, 1, 1, router_args=("--migrate-wait", "0.2")) as c:
        c.kill("prefill", 0)
        c.wait_for(lambda: not c.alive("prefill"), "the prefill worker to be declared dead", 10)
        c.add("prefill", wait=False)
        c.wait_for(lambda: json.loads(c.get("/cluster")[1])["starting"] == ["prefill"], "its announcement", 10)
        status, _, got = c.post("/v1/chat/completions", {"model": "tiny", "max_tokens": 8, "temperature": 0,
                                                         "messages": [{"role": "user", "content": "river"}]})
        assert status == 200, got
        assert got["choices"][0]["message"]["content"] == offline(["river"], 8)[0]
        assert json.loads(c.get("/cluster")[1])["starting"] == []
