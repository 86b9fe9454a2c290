"""Graceful drain, end to end: real router and worker processes on the serving tiny model, greedy streams checked
against the offline engine.

* a decode worker drained by SIGTERM mid-stream finishes its streams (nothing moves), takes no new request, and
  exits 0;
* a drain whose timeout has run out hands the running streams back: the router moves them at once (the worker's
  Leaving, not a heartbeat timeout: no death is counted) and they complete unchanged;
* a prefill worker drained with prompts queued prefills every one and writes its KV before it exits 0;
* the router: POST /admin/workers/{id}/drain behind the API key, and its own drain on SIGTERM (/ready 503, new
  requests 503, the open stream finished, exit 0); a second SIGTERM stops it at once.

And without processes: the registry's routing around draining workers, a draining decode worker's refusal.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import threading
import types
from collections import deque

import pytest

from common.cluster.protocol import DECODE, PREFILL, Admit, Heartbeat, Rejected, WorkerInfo, WorkerLoad
from common.sampling_params import SamplingParams
from decode_worker.worker import DecodeWorker
from router.registry import WorkerRegistry
from tests.reliability.test_faults import assert_streams_intact, busiest, under_streams
from tests.support.cluster_harness import LocalCluster, assert_idle
from tests.workers.test_cluster import metric_value, prompts, stream_chat

EXIT_WAIT_S = 60.0  # a drained worker exits well within this (its streams are a few dozen tokens)


@pytest.fixture(scope="module")
def cluster(model_dir):
    with LocalCluster(model_dir, prefill=2, decode=2) as c:
        yield c


def metric(c: LocalCluster, series: str) -> float:
    try:
        return metric_value(c.get("/metrics")[1].decode(), series)
    except KeyError:  # a labelled series appears with its first count
        return 0.0


def listed(c: LocalCluster, pid: int) -> dict:
    """The router's /cluster entry of the worker with this pid (a gone worker stays listed for a minute)."""
    return next(w for w in c.workers() if w["pid"] == pid)


def exit_status(c: LocalCluster, role: str, index: int) -> int:
    """Wait for a worker that is leaving; its exit status (it is no longer watched by the harness)."""
    return c.procs[role].pop(index).wait(EXIT_WAIT_S)


def test_sigterm_drains_a_decode_worker_mid_stream(cluster, offline):
    ps, later = prompts(8, seed=41), prompts(4, seed=42)
    migrations = metric(cluster, "nano_pd:request_migrations_total")
    drained, late_results = {}, []

    def drain(index):
        pid = cluster.send_signal("decode", index, signal.SIGTERM)
        cluster.wait_for(lambda: listed(cluster, pid)["draining"], "the router to see the drain", 10)
        drained.update(index=index, pid=pid, assigned=listed(cluster, pid)["assigned"])
        # new requests while it drains: none of them may go to it
        with cf.ThreadPoolExecutor(len(later)) as pool:
            late_results.extend(pool.map(lambda p: stream_chat(cluster.openai(), p, 8, True), later))

    results = under_streams(cluster, "decode", drain, ps, 48)
    assert_streams_intact(results, ps, 48, offline)
    assert_streams_intact(late_results, later, 8, offline)
    assert exit_status(cluster, "decode", drained["index"]) == 0
    gone = listed(cluster, drained["pid"])
    assert not gone["alive"] and gone["assigned"] == drained["assigned"]
    # it finished what it held: nothing was re-issued elsewhere
    assert metric(cluster, "nano_pd:request_migrations_total") == migrations
    cluster.add("decode")
    assert_idle(cluster)


def test_drain_timeout_hands_the_running_streams_back(cluster, offline):
    # a drain timeout of 0: the worker leaves at once with everything it holds, as one whose time ran out does
    proc = cluster.add("decode", extra=("--drain-timeout", "0"))
    index = cluster.procs["decode"].index(proc)
    ps = prompts(8, seed=43)
    migrations = metric(cluster, "nano_pd:request_migrations_total")
    deaths = metric(cluster, 'nano_pd:worker_deaths_total{role="decode"}')
    held = []

    def drain(_busiest):
        cluster.wait_for(lambda: listed(cluster, proc.pid)["inflight"] > 0, "streams at the worker", 30)
        held.append(listed(cluster, proc.pid)["inflight"])
        cluster.send_signal("decode", index, signal.SIGTERM)

    results = under_streams(cluster, "decode", drain, ps, 96)
    assert_streams_intact(results, ps, 96, offline)
    assert exit_status(cluster, "decode", index) == 0
    assert metric(cluster, "nano_pd:request_migrations_total") >= migrations + held[0]
    # moved because it said it was leaving, not because its heartbeats stopped
    assert metric(cluster, 'nano_pd:worker_deaths_total{role="decode"}') == deaths
    assert_idle(cluster)


def test_a_draining_prefill_worker_finishes_its_queue(cluster, offline):
    ps = prompts(16, seed=44, words=200)  # long prompts: they queue at the prefill workers
    client = cluster.openai()
    with cf.ThreadPoolExecutor(len(ps)) as pool:
        futures = [pool.submit(stream_chat, client, p, 8, True) for p in ps]
        cluster.wait_for(lambda: any(w["inflight"] >= 2 for w in cluster.alive("prefill")), "a prefill queue", 30)
        index = busiest(cluster, "prefill")
        pid = cluster.send_signal("prefill", index, signal.SIGTERM)
        results = [f.result(timeout=300) for f in futures]
    assert_streams_intact(results, ps, 8, offline)
    assert exit_status(cluster, "prefill", index) == 0
    gone = listed(cluster, pid)
    # every prompt routed to it was prefilled and its KV written there (the count is of completed writes)
    assert gone["assigned"] > 0 and gone["load"]["requests_done"] == gone["assigned"]
    cluster.add("prefill")
    assert_idle(cluster)


KEY = "drain-test-key"


def test_admin_drain_and_the_routers_own_drain(model_dir, offline):
    with LocalCluster(model_dir, prefill=0, decode=0, mixed=1,
                      router_args=("--api-key", KEY, "--migrate-wait", "60")) as c:
        auth = {"Authorization": f"Bearer {KEY}"}
        status, body = c.get("/ready")
        assert status == 200, body
        worker = c.alive("mixed")[0]
        path = f"/admin/workers/{worker['worker_id']}/drain"
        assert c.post(path, {})[0] == 401
        assert c.post(path, {}, headers={"Authorization": "Bearer wrong"})[0] == 401
        status, _, body = c.post("/admin/workers/nobody/drain", {}, headers=auth)
        assert status == 404 and body["error"]["type"] == "not_found_error"
        status, _, body = c.post(path, {}, headers=auth)
        assert status == 202 and body == {"worker_id": worker["worker_id"], "status": "draining"}
        assert exit_status(c, "mixed", 0) == 0
        assert c.get("/ready")[0] == 503  # no worker takes new work

        # a stream that waits for a worker (up to --migrate-wait) is open when the router gets SIGTERM
        client = c.openai(api_key=KEY)
        prompt = prompts(1, seed=45)
        waiting: list = []
        thread = threading.Thread(target=lambda: waiting.append(stream_chat(client, prompt[0], 16, True)))
        thread.start()
        c.wait_for(lambda: json.loads(c.get("/cluster")[1])["open_requests"] == 1, "the request to wait", 30)
        router = c.procs["router"][0]
        router.send_signal(signal.SIGTERM)
        c.wait_for(lambda: json.loads(c.get("/cluster")[1])["draining"], "the router's drain", 10)
        status, body = c.get("/ready")
        assert status == 503 and b"draining" in body
        status, headers, body = c.post("/v1/chat/completions", {"model": "tiny", "messages": [
            {"role": "user", "content": "hi"}]}, headers=auth)
        assert status == 503 and body["error"]["type"] == "service_unavailable" and "retry-after" in headers
        assert router.poll() is None  # it waits for its open stream
        c.add("mixed", wait=False)  # the open stream is served, then the router exits
        thread.join(120)
        assert len(waiting) == 1
        assert_streams_intact(waiting, prompt, 16, offline)
        assert router.wait(EXIT_WAIT_S) == 0


def test_a_second_sigterm_stops_a_draining_router_at_once(model_dir):
    with LocalCluster(model_dir, prefill=0, decode=0, router_args=("--migrate-wait", "600")) as c:
        client, outcome = c.openai(), []

        def waiting_stream():
            try:
                outcome.append(stream_chat(client, "hi", 4, True))
            except Exception as e:  # the router stopped under it: an error, not a hang
                outcome.append(e)

        thread = threading.Thread(target=waiting_stream)
        thread.start()
        c.wait_for(lambda: json.loads(c.get("/cluster")[1])["open_requests"] == 1, "the request to wait", 30)
        router = c.procs["router"][0]
        router.send_signal(signal.SIGTERM)
        c.wait_for(lambda: json.loads(c.get("/cluster")[1])["draining"], "the router's drain", 10)
        router.send_signal(signal.SIGTERM)
        assert router.wait(EXIT_WAIT_S) == 0  # long before the request's 600 s --migrate-wait
        thread.join(EXIT_WAIT_S)
        assert len(outcome) == 1 and isinstance(outcome[0], Exception)

# --- the registry's view of draining workers (no sockets) -------------------------------------------------------
def _registry_with(*roles: str):
    registry = WorkerRegistry("tiny")
    for i, role in enumerate(roles):
        info = WorkerInfo(f"{role}-{i}", role, "tiny", "tcp://127.0.0.1:9", "zmq", "layout", 16, 64, 256)
        assert registry.heartbeat(info.worker_id.encode(), Heartbeat(info, WorkerLoad())).ok
    return registry


def test_a_draining_worker_gets_no_new_work_and_stays_draining():
    registry = _registry_with(PREFILL, DECODE, DECODE)
    prefill, decode, other = registry.workers.values()
    registry.heartbeat(b"decode-1", Heartbeat(decode.info, WorkerLoad(), draining=True))
    assert decode.alive and decode.draining and registry.decoders() == [other]
    registry.heartbeat(b"decode-1", Heartbeat(decode.info, WorkerLoad()))  # a beat sent before it got Drain
    assert decode.draining
    prefill.draining = True  # what Cluster.drain does, before the worker's beats say so
    assert not registry.healthy and registry.routable(PREFILL) == []
    assert registry.missing_roles() == "no live prefill worker in the cluster (draining ones take no new work)"


def test_a_decode_worker_refuses_an_admission_once_it_drains():
    sent = []
    worker = object.__new__(DecodeWorker)  # the admission path only: no engine is built
    worker.rt = types.SimpleNamespace(draining=True, worker_id="decode-0", send_router=sent.append)
    worker.pending, worker.reserved, worker.running = deque(), {}, {}
    worker._on_admit(Admit("r#0", [1, 2, 3], SamplingParams(max_tokens=4)))
    assert sent == [Rejected("decode-0", "r#0", "decode worker is draining")] and not worker.pending
