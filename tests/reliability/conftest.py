"""The reliability suite's cluster and its idle check.

Every scenario here ends by asserting that the cluster is idle again: the router holds no request, no worker has a
request in flight, running or waiting, and every worker's KV blocks are all free (cached blocks sit in the free
list, so an idle worker's free count is its total). A leak anywhere — a zombie registration in the router, an
admission a decode worker never released, a prefill task nobody aborted — fails the scenario that caused it.
"""
from __future__ import annotations

import json
import time

import pytest

from tests.support.cluster_harness import LocalCluster

IDLE_WAIT_S = 30.0  # the slowest legitimate wind-down: a lease or heartbeat timeout after a fault, with margin


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/reliability/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.reliability)


def idle_problems(c: LocalCluster) -> list[str]:
    """What keeps the cluster from being idle (empty when it is)."""
    status, body = c.get("/cluster")
    if status != 200:
        return [f"/cluster answered {status}"]
    page = json.loads(body)
    problems = [f"the router holds {page['requests']} requests"] if page["requests"] else []
    for w in page["workers"]:
        if not w["alive"]:
            continue
        load, name = w["load"], w["worker_id"]
        if w["inflight"]:
            problems.append(f"{name}: {w['inflight']} requests in flight in the router's books")
        if load["num_running"] or load["num_waiting"]:
            problems.append(f"{name}: {load['num_running']} running, {load['num_waiting']} waiting")
        if load["free_blocks"] != load["total_blocks"]:
            problems.append(f"{name}: {load['total_blocks'] - load['free_blocks']} KV blocks still held")
    return problems


def assert_idle(c: LocalCluster, timeout: float = IDLE_WAIT_S):
    """Wait (heartbeats carry the loads, so a few of them) until the cluster is idle; fail saying what is not."""
    deadline = time.monotonic() + timeout
    while (problems := idle_problems(c)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not problems, f"the cluster is not idle after {timeout:g} s: {problems}; logs in {c.log_dir}"


def assert_all_up(c: LocalCluster):
    """Every process the harness started is still running (a crash is a failure even if migration hid it)."""
    dead = [f"{role} {i} (exit {p.returncode})" for role, procs in c.procs.items() for i, p in enumerate(procs)
            if p.poll() is not None]
    assert not dead, f"processes died: {dead}; logs in {c.log_dir}"


@pytest.fixture(scope="module")
def cluster(model_dir):
    """1 prefill + 2 decode workers on the serving tiny model, as the issue's hostile-client runs used."""
    with LocalCluster(model_dir, prefill=1, decode=2) as c:
        yield c
