"""The worker runtime: its sockets to peers survive a process or context that runs out of them; its drain (when it
leaves, a second signal) and its probes."""
import json
import resource
import signal
import types
import urllib.error
import urllib.request

import pytest
import zmq

from common.cluster import runtime as runtime_module
from common.cluster.protocol import Abort, PeerGone, PrefillDone, Tokens, WorkerLoad, encode
from common.cluster.runtime import (CONTEXT_SOCKETS, DRAIN_SETTLE_S, OPEN_FILES_WANTED, WorkerRuntime,
                                    raise_open_files_limit)
from tests.support.cluster_harness import free_port


class _NoEngine:
    def close(self):
        pass


@pytest.fixture
def runtime():
    args = types.SimpleNamespace(served_model_name="m", model="m", name="test", host="127.0.0.1",
                                 advertise_host="", router="127.0.0.1:9", drain_timeout=120.0, health_port=0)
    rt = WorkerRuntime("prefill", args, _NoEngine(), Tokens, PrefillDone)
    yield rt
    rt.close()


def test_a_context_out_of_sockets_drops_the_peer_message_instead_of_ending_the_worker(runtime):
    # a flood of forged endpoints once filled the context with closing sockets, and the next peer socket raised
    # out of the main loop; here every slot is taken by hand, then a message goes to a new peer
    taken = []
    with pytest.raises(zmq.ZMQError):
        for _ in range(CONTEXT_SOCKETS + 1):
            taken.append(runtime.ctx.socket(zmq.PUSH))
    assert len(taken) > 1023  # the worker's context has more slots than ZMQ's default
    runtime.send_peer("tcp://127.0.0.1:9", PrefillDone("r", error="x"))
    assert runtime.num_bad_peer_endpoints == 1
    for s in taken:
        s.close(linger=0)


def test_a_gone_peers_socket_is_closed_so_nobody_redials_its_address():
    # found on network namespaces: decode workers redialled a killed prefill worker's inbox every 0.1 s for ever
    args = types.SimpleNamespace(served_model_name="m", model="m", name="test", host="127.0.0.1",
                                 advertise_host="", router="127.0.0.1:9", drain_timeout=120.0, health_port=0)
    rt = WorkerRuntime("decode", args, _NoEngine(), Abort | PeerGone, PrefillDone)
    router = rt.ctx.socket(zmq.PUSH)
    try:
        gone, alive = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        for endpoint in (gone, alive):
            rt.send_peer(endpoint, PrefillDone("r", error="x"))
        router.connect("inproc://commands")
        router.send(encode(PeerGone("prefill-0", gone)))
        commands, _ = rt.poll(5000)
        assert commands == [PeerGone("prefill-0", gone)]  # the role still gets it, to drop the work
        assert list(rt._peers) == [alive]
    finally:
        router.close(linger=0)
        rt.close()


def test_the_open_files_limit_is_raised_for_the_peer_sockets():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
    try:
        raise_open_files_limit()
        new_soft, new_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert new_hard == hard
        assert new_soft == (OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(OPEN_FILES_WANTED, hard))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class _Holding:
    """A role that holds the given request ids."""

    def __init__(self, *held: str):
        self.held = list(held)

    def request_ids(self) -> list[str]:
        return self.held

    def transfers_in_flight(self) -> bool:
        return False


def test_a_drained_worker_leaves_after_holding_nothing_for_the_settle_time(runtime, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(runtime_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    runtime.begin_drain("test")
    busy, idle = _Holding("a#0"), _Holding()
    assert not runtime._may_leave(busy)
    assert not runtime._may_leave(idle)  # work sent before the router heard of the drain may still come
    clock[0] += DRAIN_SETTLE_S / 2
    assert not runtime._may_leave(busy)  # it came: the settle time starts again once it is done
    assert not runtime._may_leave(idle)
    clock[0] += DRAIN_SETTLE_S
    assert runtime._may_leave(idle) and runtime._leaving_reason == "drained"


def test_at_the_drain_deadline_a_worker_leaves_with_what_it_holds(runtime, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(runtime_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    runtime.drain_timeout_s = 5.0
    runtime.begin_drain("test")
    busy = _Holding("a#0", "b#1")
    assert not runtime._may_leave(busy)
    clock[0] += 5.0
    assert runtime._may_leave(busy) and runtime._leaving_reason.endswith("with 2 requests held")


def test_a_second_signal_during_the_drain_stops_at_once(runtime):
    runtime._on_signal(signal.SIGTERM, None)
    assert runtime._drain_asked == "SIGTERM" and not runtime.stopping  # the main loop begins the drain
    runtime.begin_drain(runtime._drain_asked)
    runtime._on_signal(signal.SIGINT, None)
    assert runtime.stopping and "second SIGINT" in runtime._leaving_reason


def _probe(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_port_probes_follow_registration_and_drain(monkeypatch):
    port = free_port()
    args = types.SimpleNamespace(served_model_name="m", model="m", name="probe", host="127.0.0.1", advertise_host="",
                                 router="127.0.0.1:9", drain_timeout=120.0, health_port=port)
    engine = types.SimpleNamespace(close=lambda: None, block_manager=types.SimpleNamespace(num_blocks=8),
                                   config=types.SimpleNamespace(block_size=16, max_model_len=64, dtype="float32",
                                                                quantization="none"))
    monkeypatch.setattr(runtime_module.signal, "signal", lambda *_: None)  # pytest keeps its own handlers
    rt = WorkerRuntime("decode", args, engine, Tokens, PrefillDone)
    rt.start("zmq", "layout", WorkerLoad)
    try:
        assert _probe(port, "/health") == (200, {"status": "ok"})
        assert _probe(port, "/ready") == (503, {"status": "not registered"})
        rt.registrations = 1  # what the router's Registered(ok) does
        assert _probe(port, "/ready") == (200, {"status": "ready"})
        rt.begin_drain("test")
        assert _probe(port, "/ready") == (503, {"status": "draining"})
        assert _probe(port, "/health") == (200, {"status": "ok"})  # alive while it drains: no restart
        assert _probe(port, "/nothing")[0] == 404
    finally:
        rt.close()
    with pytest.raises(OSError):
        _probe(port, "/health")
