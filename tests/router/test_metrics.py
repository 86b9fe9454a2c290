"""router.metrics: the router's metrics object and its cluster collector, scraped and parsed back with
prometheus_client's own parser."""
from __future__ import annotations

import asyncio
import math
import re
import threading
import time

import pytest
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

from common.cluster.protocol import DECODE, PREFILL, WorkerInfo, WorkerLoad
from router.cluster import Cluster
from router.metrics import ACCEPTANCE_BUCKETS, LATENCY_BUCKETS, TRANSFER_BUCKETS, RouterMetrics
from router.registry import DEAD_LISTED_S, Worker, WorkerRegistry

M, R, W = "model_name", "role", "worker"
# every series /metrics has: exposed name -> (type, label names, HELP); the router's own first, then the cluster's
EXPECTED = {
    "vllm:time_to_first_token_seconds": ("histogram", {M}, "Time to first token."),
    "vllm:inter_token_latency_seconds": ("histogram", {M}, "Time between streamed tokens."),
    "vllm:request_time_per_output_token_seconds": ("histogram", {M},
                                                   "Mean time per output token after the first, per request."),
    "vllm:e2e_request_latency_seconds": ("histogram", {M}, "Request latency, arrival to finish."),
    "vllm:prompt_tokens_total": ("counter", {M}, "Prompt tokens of finished requests."),
    "vllm:generation_tokens_total": ("counter", {M}, "Generated tokens."),
    "vllm:request_success_total": ("counter", {M, "finished_reason"}, "Finished requests by reason."),
    "nano_pd:request_errors_total": ("counter", {"status"}, "Requests that ended in an error, by HTTP status."),
    "nano_pd:kv_transfer_bytes_total": ("counter", set(), "KV bytes pushed from prefill to decode workers."),
    "nano_pd:kv_transfer_seconds": ("histogram", set(), "Time of one request's KV push."),
    "nano_pd:request_migrations_total": ("counter", set(), "Request attempts re-issued after a worker died or failed."),
    "nano_pd:local_prefills_total": ("counter", {R}, "Prompts computed by the worker that decodes them (a mixed "
                                     "worker, or a decode worker's short uncached tail) instead of a prefill worker."),
    "nano_pd:requests_queued": ("gauge", set(), "Requests without a first token yet (waiting for a worker's room, "
                                "queued at one, or in prefill); new ones get a 429 at --max-queued-requests."),
    "nano_pd:worker_deaths_total": ("counter", {R}, "Workers declared dead."),
    "nano_pd:request_spec_acceptance_rate": ("histogram", {M},
                                             "Per finished request: accepted / proposed speculative tokens."),
    "vllm:num_requests_running": ("gauge", {M, R, W}, "Requests running on a worker."),
    "vllm:num_requests_waiting": ("gauge", {M, R, W}, "Requests queued on a worker."),
    "vllm:kv_cache_usage_perc": ("gauge", {M, R, W}, "Fraction of a worker's KV blocks in use."),
    "nano_pd:workers_alive": ("gauge", {R}, "Live workers by role."),
    "nano_pd:pool_workers": ("gauge", {M, R}, "Workers of a role that take new work (alive, not draining): the "
                             "pool the other nano_pd:pool_ series sum over."),
    "nano_pd:pool_requests_running": ("gauge", {M, R}, "Requests running in a role's pool."),
    "nano_pd:pool_requests_waiting": ("gauge", {M, R}, "Requests queued in a role's pool."),
    "nano_pd:pool_queued_prompt_tokens": ("gauge", {M, R}, "Prompt tokens queued or in prefill in a "
                                          "prompt-computing pool (prefill, mixed)."),
    "nano_pd:pool_prefill_tokens_per_second": ("gauge", {M, R}, "Measured prefill speed of a prompt-computing pool: "
                                               "each worker's prompt tokens over the seconds of its steps computing "
                                               "them, summed."),
    "nano_pd:pool_prefill_backlog_seconds": ("gauge", {M, R}, "Queued prompt tokens over the pool's measured "
                                             "prefill speed (absent while tokens are queued but no speed is "
                                             "measured yet)."),
    "nano_pd:pool_kv_cache_usage_ratio": ("gauge", {M, R}, "KV blocks in use over KV blocks, summed over a decoding "
                                          "pool (decode, mixed)."),
    "vllm:prefix_cache_queries_total": ("counter", {M, R},
                                        "Prompt tokens looked up in the prefix caches (all workers of a role)."),
    "vllm:prefix_cache_hits_total": ("counter", {M, R}, "Prompt tokens found in the prefix caches."),
    "vllm:spec_decode_num_draft_tokens_total": ("counter", {M}, "Speculative tokens proposed."),
    "vllm:spec_decode_num_accepted_tokens_total": ("counter", {M}, "Speculative tokens accepted."),
    "vllm:spec_decode_num_drafts_total": ("counter", {M}, "Forward passes that verified drafts."),
}
BUCKETS = {"nano_pd:kv_transfer_seconds": TRANSFER_BUCKETS, "nano_pd:request_spec_acceptance_rate": ACCEPTANCE_BUCKETS}


def worker(worker_id: str, role: str, alive: bool = True, **load) -> Worker:
    info = WorkerInfo(worker_id, role, "tiny", "tcp://127.0.0.1:1", "zmq", "layout", 16, 100, 256)
    return Worker(info, WorkerLoad(**load), time.monotonic(), alive=alive)


def cluster_of(*workers: Worker) -> WorkerRegistry:
    registry = WorkerRegistry("tiny")
    registry.workers.update((w.worker_id, w) for w in workers)
    return registry


def watched(*workers: Worker, model: str = "tiny") -> tuple[RouterMetrics, WorkerRegistry]:
    metrics, registry = RouterMetrics(model), cluster_of(*workers)
    metrics.watch(registry)
    return metrics, registry


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value}, parsed by prometheus_client; no series twice."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, key
            out[key] = s.value
    return out


def lbl(**kw) -> frozenset:
    return frozenset(kw.items())


def buckets(values: dict, name: str, **labels) -> dict[float, float]:
    """{upper bound: cumulative count} of one histogram series."""
    return {float(dict(k[1])["le"]): v for k, v in values.items()
            if k[0] == name + "_bucket" and k[1] - {("le", dict(k[1])["le"])} == lbl(**labels)}


def test_every_metric_named_typed_labelled_and_explained():
    metrics, _ = watched(worker("p1", PREFILL), worker("d1", DECODE))
    metrics.finished("stop", 1)  # the labelled series below appear once something is counted
    metrics.request_errors.labels(status=503).inc()
    metrics.worker_deaths.labels(role="prefill").inc()
    metrics.local_prefills.labels(role="mixed").inc()
    text = metrics.render()
    assert re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M) == [(n, t) for n, (t, _, _) in EXPECTED.items()]
    assert re.findall(r"^# HELP (\S+) (.*)$", text, re.M) == [(n, h) for n, (_, _, h) in EXPECTED.items()]
    assert "_created" not in text  # counters carry no creation-time series
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (type_, labels, help_) in EXPECTED.items():
        family = families[name.removesuffix("_total") if type_ == "counter" else name]
        assert family.type == type_ and family.documentation == help_, name
        assert family.samples, f"{name} has no series"
        for s in family.samples:
            assert set(s.labels) - {"le"} == labels, (name, s)
    assert len(families) == len(EXPECTED)


def test_requests_recorded():
    metrics, _ = watched()
    metrics.generation_tokens.inc(5)
    metrics.finished("stop", 12, draft_tokens=10, accepted_tokens=7)
    metrics.finished("length", 3)
    metrics.finished("stop", 1)
    metrics.request_errors.labels(status=503).inc()
    metrics.request_errors.labels(status=504).inc(2)
    got = samples(metrics.render())
    assert got[("vllm:generation_tokens_total", lbl(model_name="tiny"))] == 5
    assert got[("vllm:prompt_tokens_total", lbl(model_name="tiny"))] == 16
    assert got[("vllm:request_success_total", lbl(model_name="tiny", finished_reason="stop"))] == 2
    assert got[("vllm:request_success_total", lbl(model_name="tiny", finished_reason="length"))] == 1
    assert got[("nano_pd:request_errors_total", lbl(status="503"))] == 1
    assert got[("nano_pd:request_errors_total", lbl(status="504"))] == 2
    # only the request with drafts has an acceptance rate
    assert got[("nano_pd:request_spec_acceptance_rate_count", lbl(model_name="tiny"))] == 1
    assert got[("nano_pd:request_spec_acceptance_rate_sum", lbl(model_name="tiny"))] == pytest.approx(0.7)
    assert buckets(got, "nano_pd:request_spec_acceptance_rate", model_name="tiny")[0.7] == 1
    assert buckets(got, "nano_pd:request_spec_acceptance_rate", model_name="tiny")[0.6] == 0


def test_transfers_migrations_and_deaths():
    metrics, _ = watched()
    metrics.kv_transfer_bytes.inc(1000)
    metrics.kv_transfer_bytes.inc(24)
    metrics.kv_transfer_seconds.observe(0.004)
    metrics.migrations.inc()
    metrics.worker_deaths.labels(role="decode").inc()
    got = samples(metrics.render())
    assert got[("nano_pd:kv_transfer_bytes_total", lbl())] == 1024
    assert got[("nano_pd:kv_transfer_seconds_count", lbl())] == 1
    assert got[("nano_pd:kv_transfer_seconds_sum", lbl())] == pytest.approx(0.004)
    assert buckets(got, "nano_pd:kv_transfer_seconds") == {
        b: (1 if b >= 0.005 else 0) for b in (*TRANSFER_BUCKETS, math.inf)}
    assert got[("nano_pd:request_migrations_total", lbl())] == 1
    assert got[("nano_pd:worker_deaths_total", lbl(role="decode"))] == 1
    assert ("nano_pd:worker_deaths_total", lbl(role="prefill")) not in got  # no series before a first death
    with pytest.raises(ValueError):
        metrics.kv_transfer_bytes.inc(-1)  # counters only go up


def test_a_worker_declared_dead_by_the_cluster():
    metrics = RouterMetrics("tiny")
    cluster = Cluster("tiny", "127.0.0.1", 1, metrics=metrics)  # never started: no socket is needed here
    d1 = worker("d1", DECODE, num_running=2)
    cluster.registry.workers["d1"] = d1
    before = samples(metrics.render())
    assert before[("nano_pd:workers_alive", lbl(role="decode"))] == 1
    assert before[("vllm:num_requests_running", lbl(model_name="tiny", role="decode", worker="d1"))] == 2
    asyncio.run(cluster._declare_dead(d1, "test"))
    asyncio.run(cluster._declare_dead(d1, "again"))  # counted once
    after = samples(metrics.render())
    assert after[("nano_pd:worker_deaths_total", lbl(role="decode"))] == 1
    assert after[("nano_pd:workers_alive", lbl(role="decode"))] == 0
    assert not any(k[0] == "vllm:num_requests_running" for k in after)  # a dead worker's series disappear


def test_histogram_buckets_are_cumulative_with_inclusive_bounds():
    metrics, _ = watched()
    values = [0.0005, 0.001, 0.003, 0.05, 0.5, 0.7, 5.0, 50.0, 1e9]
    for v in values:
        metrics.ttft.observe(v)
    text = metrics.render()
    got = samples(text)
    name = "vllm:time_to_first_token_seconds"
    cumulative = buckets(got, name, model_name="tiny")
    assert list(cumulative) == [*LATENCY_BUCKETS, math.inf]  # the boundaries, in increasing order, +Inf last
    assert cumulative == {b: sum(v <= b for v in values) for b in cumulative}
    assert cumulative[0.001] == 2 and cumulative[80.0] == 8
    assert cumulative[math.inf] == got[(name + "_count", lbl(model_name="tiny"))] == len(values)
    assert got[(name + "_sum", lbl(model_name="tiny"))] == pytest.approx(sum(values))
    les = re.findall(r'^vllm:time_to_first_token_seconds_bucket\{.*le="([^"]+)"', text, re.M)
    assert les[-1] == "+Inf" and les[11] == "1.0"  # prometheus_client's spelling, as dashboards expect


def test_histograms_exist_empty_before_any_observation():
    got = samples(watched()[0].render())
    for name, (type_, labels, _) in EXPECTED.items():
        if type_ != "histogram":
            continue
        series = lbl(model_name="tiny") if labels else lbl()
        assert got[(name + "_count", series)] == 0 and got[(name + "_sum", series)] == 0
        assert set(buckets(got, name, **dict(series)).values()) == {0}
        assert list(buckets(got, name, **dict(series))) == [*BUCKETS.get(name, LATENCY_BUCKETS), math.inf]


def test_label_values_are_escaped():
    nasty = 'a\\b"c\nd'
    metrics, _ = watched(worker(nasty, DECODE, num_running=3), model=nasty)
    metrics.finished("stop", 1)
    text = metrics.render()
    assert 'model_name="a\\\\b\\"c\\nd"' in text
    assert all(line.startswith(("#", "vllm:", "nano_pd:")) for line in text.splitlines())  # no raw newline leaked
    got = samples(text)
    assert got[("vllm:num_requests_running", lbl(model_name=nasty, role="decode", worker=nasty))] == 3
    assert got[("vllm:request_success_total", lbl(model_name=nasty, finished_reason="stop"))] == 1


def test_worker_loads_read_at_scrape_time():
    p1 = worker("p1", PREFILL, num_running=1, num_waiting=2, free_blocks=30, total_blocks=100)
    d1 = worker("d1", DECODE, num_running=3, free_blocks=10, total_blocks=100)
    d2 = worker("d2", DECODE, num_running=4)  # no blocks reported yet: usage 0
    dead = worker("d3", DECODE, alive=False, num_running=9, free_blocks=0, total_blocks=100)
    metrics, _ = watched(p1, d1, d2, dead)
    got = samples(metrics.render())

    def per_worker(name: str) -> dict:
        return {dict(k[1])["worker"]: v for k, v in got.items() if k[0] == name}
    assert per_worker("vllm:num_requests_running") == {"p1": 1, "d1": 3, "d2": 4}
    assert per_worker("vllm:num_requests_waiting") == {"p1": 2, "d1": 0, "d2": 0}
    assert per_worker("vllm:kv_cache_usage_perc") == pytest.approx({"p1": 0.7, "d1": 0.9, "d2": 0})
    assert got[("vllm:num_requests_running", lbl(model_name="tiny", role="prefill", worker="p1"))] == 1
    assert got[("nano_pd:workers_alive", lbl(role="prefill"))] == 1
    assert got[("nano_pd:workers_alive", lbl(role="decode"))] == 2
    d1.load = WorkerLoad(num_running=5, free_blocks=50, total_blocks=100)  # the next heartbeat
    got = samples(metrics.render())
    assert got[("vllm:num_requests_running", lbl(model_name="tiny", role="decode", worker="d1"))] == 5
    assert got[("vllm:kv_cache_usage_perc", lbl(model_name="tiny", role="decode", worker="d1"))] == 0.5


def test_pool_signals_from_synthetic_heartbeats():
    """Per role, over the workers that take new work: a draining or dead worker is out of its pool."""
    p1 = worker("p1", PREFILL, num_waiting=2, queued_prompt_tokens=3000, prefill_tokens=2000, prefill_seconds=4.0)
    p2 = worker("p2", PREFILL, num_running=1, queued_prompt_tokens=1000, prefill_tokens=3000, prefill_seconds=2.0)
    d1 = worker("d1", DECODE, num_running=3, num_waiting=1, free_blocks=20, total_blocks=100)
    d2 = worker("d2", DECODE, num_running=5, free_blocks=60, total_blocks=300)
    draining = worker("d3", DECODE, num_running=9, free_blocks=0, total_blocks=100)
    draining.draining = True
    dead = worker("d4", DECODE, alive=False, num_running=7, free_blocks=0, total_blocks=100)
    metrics, _ = watched(p1, p2, d1, d2, draining, dead)
    got = samples(metrics.render())

    def pool(name: str, role: str) -> float:
        return got[(f"nano_pd:pool_{name}", lbl(model_name="tiny", role=role))]
    # prefill: 4000 queued tokens; speeds 2000/4 + 3000/2 = 2000 tok/s; backlog 2 s
    assert pool("queued_prompt_tokens", "prefill") == 4000
    assert pool("prefill_tokens_per_second", "prefill") == 2000
    assert pool("prefill_backlog_seconds", "prefill") == 2.0
    assert (pool("workers", "prefill"), pool("requests_running", "prefill"), pool("requests_waiting", "prefill")) \
        == (2, 1, 2)
    # decode: (80 + 240) used of 400 blocks, the draining and the dead worker left out
    assert pool("kv_cache_usage_ratio", "decode") == pytest.approx(0.8)
    assert (pool("workers", "decode"), pool("requests_running", "decode"), pool("requests_waiting", "decode")) \
        == (2, 8, 1)
    assert got[("nano_pd:workers_alive", lbl(role="decode"))] == 3  # the draining one is alive
    assert ("nano_pd:pool_kv_cache_usage_ratio", lbl(model_name="tiny", role="prefill")) not in got
    assert ("nano_pd:pool_prefill_backlog_seconds", lbl(model_name="tiny", role="decode")) not in got
    assert pool("prefill_backlog_seconds", "mixed") == 0.0  # no mixed worker: nothing queued


def test_a_backlog_with_no_measured_speed_has_no_series():
    cold = worker("p1", PREFILL, queued_prompt_tokens=500)  # queued before its first step
    metrics, _ = watched(cold, worker("d1", DECODE))
    got = samples(metrics.render())
    assert got[("nano_pd:pool_queued_prompt_tokens", lbl(model_name="tiny", role="prefill"))] == 500
    assert ("nano_pd:pool_prefill_backlog_seconds", lbl(model_name="tiny", role="prefill")) not in got


def test_cumulative_counters_never_go_down_when_a_dead_worker_is_retired():
    p1 = worker("p1", PREFILL, prefix_cache_queries=500, prefix_cache_hits=200)
    p2 = worker("p2", PREFILL, alive=False, prefix_cache_queries=7, prefix_cache_hits=3)
    d1 = worker("d1", DECODE, prefix_cache_queries=40, prefix_cache_hits=16, spec_draft_tokens=90,
                spec_accepted_tokens=60, spec_verify_steps=30)
    d2 = worker("d2", DECODE, alive=False, spec_draft_tokens=6, spec_accepted_tokens=5, spec_verify_steps=5)
    metrics, registry = watched(p1, p2, d1, d2)
    totals = {("vllm:prefix_cache_queries_total", lbl(model_name="tiny", role="prefill")): 507,
              ("vllm:prefix_cache_hits_total", lbl(model_name="tiny", role="prefill")): 203,
              ("vllm:prefix_cache_queries_total", lbl(model_name="tiny", role="decode")): 40,
              ("vllm:prefix_cache_hits_total", lbl(model_name="tiny", role="decode")): 16,
              ("vllm:spec_decode_num_draft_tokens_total", lbl(model_name="tiny")): 96,
              ("vllm:spec_decode_num_accepted_tokens_total", lbl(model_name="tiny")): 65,
              ("vllm:spec_decode_num_drafts_total", lbl(model_name="tiny")): 35}
    before = samples(metrics.render())
    assert {k: before[k] for k in totals} == totals
    registry.retire_dead(time.monotonic() + DEAD_LISTED_S + 1)
    assert set(registry.workers) == {"p1", "d1"}
    after = samples(metrics.render())
    assert {k: after[k] for k in totals} == totals
    registry.retire_dead(time.monotonic() + 2 * DEAD_LISTED_S)  # retiring is once: nothing is counted twice
    registry.workers["p3"] = worker("p3", PREFILL, prefix_cache_queries=10, prefix_cache_hits=1)
    later = samples(metrics.render())
    assert later[("vllm:prefix_cache_queries_total", lbl(model_name="tiny", role="prefill"))] == 517
    assert later[("vllm:spec_decode_num_drafts_total", lbl(model_name="tiny"))] == 35


def test_routers_in_one_process_do_not_share_series():
    a, _ = watched(model="a")
    b, _ = watched(worker("d1", DECODE), model="b")
    a.migrations.inc(3)
    a.finished("stop", 4)
    got_a, got_b = samples(a.render()), samples(b.render())
    assert got_a[("nano_pd:request_migrations_total", lbl())] == 3
    assert got_b[("nano_pd:request_migrations_total", lbl())] == 0
    assert {dict(k[1]).get("model_name") for k in got_b} <= {"b", None}
    assert got_a[("nano_pd:workers_alive", lbl(role="decode"))] == 0
    assert got_b[("nano_pd:workers_alive", lbl(role="decode"))] == 1


def test_no_second_metric_of_a_name():
    metrics = RouterMetrics("tiny")
    with pytest.raises(ValueError):  # the cluster collector's names are known to the registry
        Counter("vllm:prefix_cache_hits_total", "again", registry=metrics.registry)
    with pytest.raises(ValueError):
        Counter("nano_pd:request_migrations_total", "again", registry=metrics.registry)


def test_concurrent_increments():
    metrics = RouterMetrics("tiny")

    def work():
        for _ in range(2000):
            metrics.generation_tokens.inc()
            metrics.request_errors.labels(status=500).inc()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = samples(metrics.render())
    assert got[("vllm:generation_tokens_total", lbl(model_name="tiny"))] == 8000
    assert got[("nano_pd:request_errors_total", lbl(status="500"))] == 8000
