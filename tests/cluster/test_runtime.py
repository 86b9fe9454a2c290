"""The worker runtime's sockets to peers survive a process or context that runs out of them."""
import resource
import types

import pytest
import zmq

from common.cluster.protocol import PrefillDone, Tokens
from common.cluster.runtime import CONTEXT_SOCKETS, OPEN_FILES_WANTED, WorkerRuntime, raise_open_files_limit


class _NoEngine:
    def close(self):
        pass


@pytest.fixture
def runtime():
    args = types.SimpleNamespace(served_model_name="m", model="m", name="test", host="127.0.0.1",
                                 advertise_host="", router="127.0.0.1:9")
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
