"""Tensor parallelism across processes: rank 0 is the engine's own process and drives ranks 1..N-1 in lockstep.

Rank 0 schedules, prepares each forward's inputs and samples. It sends those inputs to the other ranks (ZMQ,
msgspec) before running the forward itself; every rank then runs the same forward on its shard of the weights and
of the KV heads, the sharded layers meeting in torch.distributed collectives (gloo on CPU, NCCL on GPU). The other
ranks never schedule or sample. They are started here as `python -m common.parallel.follower` and exit when rank 0
tells them to, or when it dies. Rank 0 checks that they are alive before every command, and a collective with a
dead peer fails within COLLECTIVE_TIMEOUT_S, so a lost rank is an error, never a hang.

KV hand-offs between workers see one pool holding every KV head, whatever the TP size on either side: rank 0
keeps a full-head exchange pool with the same block ids, which the KV transport registers. Before a prefill
worker sends blocks, the ranks gather their head shards into it (export); after blocks land on a decode worker,
rank 0 scatters them back out to the ranks' shards (import). A P worker with TP=2 and a D worker with TP=1 (or
the reverse) therefore have equal KV layouts and pair like any two workers.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
import weakref
from datetime import timedelta

import msgspec
import torch
import torch.distributed as dist
import zmq

from common.parallel.state import set_expert_parallel
from common.parallel.wire import Forward, MoveBlocks, Shutdown, TensorParallelError

log = logging.getLogger("nano_pd.tensor_parallel")

COLLECTIVE_TIMEOUT_S = 120
START_TIMEOUT_S = 300  # for every rank to start Python, import torch and join the group


def join_group(config, rank: int, store) -> None:
    on_gpu = torch.device(config.device).type == "cuda"
    if on_gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", store=store, rank=rank,
                            world_size=config.tensor_parallel_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    set_expert_parallel(config.enable_expert_parallel)


def leave_group() -> None:
    set_expert_parallel(False)
    if dist.is_initialized():
        dist.destroy_process_group()


def _config_args(config) -> dict:
    """What the other ranks need to build the same model: the engine arguments, minus what only rank 0 uses."""
    skip = {"hf_config", "speculative_config"}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init and f.name not in skip}


class TensorParallelRanks:
    """Rank 0's side: starts ranks 1..N-1, joins the process group with them and sends them every command."""

    def __init__(self, config):
        size = config.tensor_parallel_size
        self.store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=START_TIMEOUT_S))
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        self.procs: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, _stop_ranks, self.procs, self.sockets, self.ctx)
        config_json = msgspec.json.encode(_config_args(config)).decode()
        for rank in range(1, size):
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            self.sockets.append(sock)
            self.procs.append(subprocess.Popen([
                sys.executable, "-m", "common.parallel.follower", "--rank", str(rank), "--world-size", str(size),
                "--store-port", str(self.store.port), "--commands", f"tcp://127.0.0.1:{port}",
                "--threads", str(torch.get_num_threads()), "--parent", str(os.getpid()), "--config", config_json]))
        self._wait_joined(size)
        join_group(config, 0, self.store)
        log.info("tensor parallelism: %d ranks (pids %s)", size, [p.pid for p in self.procs])

    def _wait_joined(self, size: int):
        deadline = time.monotonic() + START_TIMEOUT_S
        keys = [f"joined/{rank}" for rank in range(1, size)]
        while not self.store.check(keys):
            self.check_alive()
            if time.monotonic() > deadline:
                self.close()
                raise TensorParallelError(f"tensor-parallel ranks did not start within {START_TIMEOUT_S} s")
            time.sleep(0.05)

    def check_alive(self):
        for rank, proc in enumerate(self.procs, start=1):
            code = proc.poll()
            if code is not None:
                self.close()
                raise TensorParallelError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {code}")

    def send(self, cmd: Forward | MoveBlocks) -> None:
        self.check_alive()
        data = msgspec.msgpack.encode(cmd)
        for sock in self.sockets:
            sock.send(data)

    def close(self):
        self._finalizer()


def _stop_ranks(procs: list[subprocess.Popen], sockets: list[zmq.Socket], ctx: zmq.Context):
    shutdown = msgspec.msgpack.encode(Shutdown())
    for sock, proc in zip(sockets, procs):
        if proc.poll() is None:
            try:
                sock.send(shutdown, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for sock in sockets:
        sock.close()
    ctx.term()
    leave_group()
