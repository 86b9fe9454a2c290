"""Faults under 32 greedy streams, on one cluster of 2 prefill, 2 decode and 1 mixed workers:

* kill -9 of a worker of each role: its requests move, every stream completes with the offline engine's text;
* SIGSTOP of a worker of each role (hung, not dead; for a prefill worker, the KV transfers it owes stall midway):
  its heartbeats stop, it is declared dead and its requests move; on SIGCONT it learns that and exits (status 2,
  for its supervisor to restart it) without a token of it reaching a client — no stream has a duplicated token;
* the router killed and restarted under load: the dead router's clients get errors, the workers re-register and
  drop the dead router's requests, new clients are served.

Each scenario puts the lost worker back afterwards and ends with the cluster idle (nothing registered anywhere,
no KV block held).
"""
from __future__ import annotations

import concurrent.futures as cf
import signal
import time

import pytest

from tests.support.cluster_harness import LocalCluster, assert_idle
from tests.workers.test_cluster import metric_value, prompts, stream_chat

STREAMS = 32
DETECTION_S = 10.0  # the heartbeat timeout is 2 s; beyond this the router missed a death


@pytest.fixture(scope="module")
def spares(model_dir):
    """A worker of every role to spare: whichever one a scenario takes down, another of its role serves on."""
    with LocalCluster(model_dir, prefill=2, decode=2, mixed=1) as c:
        yield c


def deaths(c: LocalCluster, role: str) -> float:
    try:
        return metric_value(c.get("/metrics")[1].decode(), f'nano_pd:worker_deaths_total{{role="{role}"}}')
    except KeyError:  # the labelled series appears with its first count
        return 0.0


def busiest(c: LocalCluster, role: str) -> int:
    """The harness index of the live worker of role with the most requests in flight."""
    worker = max(c.alive(role), key=lambda w: w["inflight"])
    return [p.pid for p in c.procs[role]].index(worker["pid"])


def declared_dead(c: LocalCluster, pid: int):
    c.wait_for(lambda: not any(w["pid"] == pid and w["alive"] for w in c.workers()),
               f"worker {pid} to be declared dead", DETECTION_S)


def under_streams(c: LocalCluster, role: str, fault, ps: list[str], max_tokens: int) -> list[dict]:
    """STREAMS greedy streams; once tokens flow in every one (or, for a prefill fault, while the prompts are still
    at the prefill workers) fault(index of the busiest worker of role) runs; the streams' results."""
    client = c.openai()
    progress = [0] * len(ps)

    def one(i):
        return stream_chat(client, ps[i], max_tokens, ignore_eos=True, on_chunk=lambda n: progress.__setitem__(i, n))

    with cf.ThreadPoolExecutor(len(ps)) as pool:
        futures = [pool.submit(one, i) for i in range(len(ps))]
        if role == "prefill":
            c.wait_for(lambda: any(w["inflight"] for w in c.alive("prefill")), "prompts at the prefill workers", 30)
        else:
            c.wait_for(lambda: min(progress) >= 3, "every stream to be flowing", 60)
        fault(busiest(c, role))
        return [f.result(timeout=300) for f in futures]


def assert_streams_intact(results: list[dict], ps: list[str], max_tokens: int, offline):
    expected = offline(ps, max_tokens, ignore_eos=True)
    for got, want in zip(results, expected):
        assert got["finish_reason"] == "length" and got["text"] == want


def workload(role: str, seed: int) -> tuple[list[str], int]:
    # prefill faults need prompts long enough to be caught at the prefill workers; decode faults, long outputs
    return (prompts(STREAMS, seed, words=200), 16) if role == "prefill" else (prompts(STREAMS, seed), 96)


@pytest.mark.parametrize("role", ["decode", "prefill", "mixed"])
def test_kill_9_of_a_worker_loses_no_stream(spares, offline, role):
    before = deaths(spares, role)
    ps, max_tokens = workload(role, seed=31)
    killed = []

    def kill(i):
        killed.append(spares.kill(role, i))
        at = time.monotonic()
        declared_dead(spares, killed[0])
        killed.append(time.monotonic() - at)

    results = under_streams(spares, role, kill, ps, max_tokens)
    assert killed[1] < 3.0, f"death detected after {killed[1]:.2f} s"  # 2 s heartbeat timeout + its 0.1 s monitor
    assert_streams_intact(results, ps, max_tokens, offline)
    assert deaths(spares, role) == before + 1
    spares.procs[role] = [p for p in spares.procs[role] if p.pid != killed[0]]
    spares.add(role)
    assert_idle(spares)


@pytest.mark.parametrize("role", ["decode", "prefill", "mixed"])
def test_a_hung_worker_is_replaced_and_says_nothing_when_it_wakes(spares, offline, role):
    ps, max_tokens = workload(role, seed=32)
    hung = []

    def hang(i):
        hung.append((i, spares.send_signal(role, i, signal.SIGSTOP)))
        declared_dead(spares, hung[0][1])
        spares.send_signal(role, i, signal.SIGCONT)  # it resumes mid-step, with requests the router moved

    results = under_streams(spares, role, hang, ps, max_tokens)
    assert_streams_intact(results, ps, max_tokens, offline)  # nothing the woken worker sent reached a stream
    index, pid = hung[0]
    assert spares.forget(role, index) == 2  # refused by the router on its next heartbeat: it exits
    spares.add(role)
    assert_idle(spares)


def test_router_restarted_under_load(spares, offline):
    ps = prompts(STREAMS, seed=33)
    client = spares.openai()
    progress = [0] * len(ps)

    def one(i):
        try:
            return stream_chat(client, ps[i], 1500, ignore_eos=True, on_chunk=lambda n: progress.__setitem__(i, n))
        except Exception as e:  # the router died under this client: an error, not a hang
            return e

    with cf.ThreadPoolExecutor(len(ps)) as pool:
        futures = [pool.submit(one, i) for i in range(len(ps))]
        spares.wait_for(lambda: min(progress) >= 3, "every stream to be flowing", 60)
        spares.restart_router()
        cut_off = [f.result(timeout=60) for f in futures]
    assert all(isinstance(r, Exception) or r["finish_reason"] is None for r in cut_off), cut_off
    spares.wait_workers(prefill=2, decode=2, mixed=1, timeout=30)
    # the workers drop what the dead router asked for at once: 32 x 1500 tokens would take far longer than this
    assert_idle(spares, timeout=10)
    fresh = prompts(8, seed=34)
    results = [stream_chat(client, p, 16, ignore_eos=True) for p in fresh]
    assert [r["text"] for r in results] == offline(fresh, 16, ignore_eos=True)
    assert_idle(spares)
