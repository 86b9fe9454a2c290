"""Tensor parallelism across processes: rank 0 is the engine's own process and drives ranks 1..N-1 in lockstep.

Rank 0 schedules, prepares each forward's inputs and samples. It sends those inputs to the other ranks (ZMQ,
msgspec) before running the forward itself; every rank then runs the same forward on its shard of the weights and
of the KV heads, the sharded layers meeting in torch.distributed collectives (gloo on CPU, NCCL on GPU). The other
ranks never schedule or sample. They are started here as `python -m common.tensor_parallel` and exit when rank 0
tells them to, or when it dies. Rank 0 checks that they are alive before every command, and a collective with a
dead peer fails within COLLECTIVE_TIMEOUT_S, so a lost rank is an error, never a hang.

KV hand-offs between workers see one pool holding every KV head, whatever the TP size on either side: rank 0
keeps a full-head exchange pool with the same block ids, which the KV transport registers. Before a prefill
worker sends blocks, the ranks gather their head shards into it (export); after blocks land on a decode worker,
rank 0 scatters them back out to the ranks' shards (import). A P worker with TP=2 and a D worker with TP=1 (or
the reverse) therefore have equal KV layouts and pair like any two workers.
"""
from __future__ import annotations

import argparse
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

from common.layers.attention import AttentionMetadata, PrefillChunk
from common.layers.parallel import set_expert_parallel

log = logging.getLogger("nano_pd.tensor_parallel")

COLLECTIVE_TIMEOUT_S = 120
START_TIMEOUT_S = 300  # for every rank to start Python, import torch and join the group
FOLLOWER_POLL_MS = 1000  # how often an idle rank checks that rank 0 is still alive


class TensorParallelError(RuntimeError):
    """A rank died or never joined; the engine cannot run a forward without it."""


class WireTensor(msgspec.Struct, array_like=True):
    dtype: str
    shape: list[int]
    data: bytes


class Forward(msgspec.Struct, tag="forward", array_like=True):
    input_ids: WireTensor
    positions: WireTensor
    slot_mapping: WireTensor
    num_decode: int
    decode_block_tables: WireTensor | None
    decode_mask: WireTensor | None
    prefills: list[tuple[int, int, int, WireTensor | None]]  # start, end, context_len, block table
    logit_rows: list[int]  # rows whose logits rank 0 samples from (the LM head gathers them across ranks)


class MoveBlocks(msgspec.Struct, tag="move_blocks", array_like=True):
    block_ids: list[int]
    to_exchange: bool  # True: shards -> rank 0's exchange pool (export); False: the reverse (import)


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


Command = Forward | MoveBlocks | Shutdown


def _to_wire(t: torch.Tensor) -> WireTensor:
    t = t.detach().to("cpu").contiguous()
    return WireTensor(str(t.dtype).removeprefix("torch."), list(t.shape), t.numpy().tobytes())


def _from_wire(w: WireTensor, device: torch.device) -> torch.Tensor:
    dtype = getattr(torch, w.dtype)
    if not w.data:
        return torch.empty(w.shape, dtype=dtype, device=device)
    return torch.frombuffer(bytearray(w.data), dtype=dtype).reshape(w.shape).to(device)


def forward_command(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                    logit_rows: list[int]) -> Forward:
    def opt(t):
        return None if t is None else _to_wire(t)

    return Forward(_to_wire(input_ids), _to_wire(positions), _to_wire(meta.slot_mapping), meta.num_decode,
                   opt(meta.decode_block_tables), opt(meta.decode_mask),
                   [(c.start, c.end, c.context_len, opt(c.block_table)) for c in meta.prefills], logit_rows)


def forward_inputs(cmd: Forward, device: torch.device):
    """(input_ids, positions, meta, logit_rows) exactly as rank 0 ran them."""
    def opt(w):
        return None if w is None else _from_wire(w, device)

    meta = AttentionMetadata(slot_mapping=_from_wire(cmd.slot_mapping, device), num_decode=cmd.num_decode,
                             decode_block_tables=opt(cmd.decode_block_tables), decode_mask=opt(cmd.decode_mask),
                             prefills=[PrefillChunk(s, e, n, opt(t)) for s, e, n, t in cmd.prefills])
    return _from_wire(cmd.input_ids, device), _from_wire(cmd.positions, device), meta, cmd.logit_rows


def _join_group(config, rank: int, store) -> None:
    on_gpu = torch.device(config.device).type == "cuda"
    if on_gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", store=store, rank=rank,
                            world_size=config.tensor_parallel_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    set_expert_parallel(config.enable_expert_parallel)


def _leave_group() -> None:
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
                sys.executable, "-m", "common.tensor_parallel", "--rank", str(rank), "--world-size", str(size),
                "--store-port", str(self.store.port), "--commands", f"tcp://127.0.0.1:{port}",
                "--threads", str(torch.get_num_threads()), "--parent", str(os.getpid()), "--config", config_json]))
        self._wait_joined(size)
        _join_group(config, 0, self.store)
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
    _leave_group()


def follower_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one tensor-parallel rank > 0 of an engine (started by rank 0)")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--store-port", type=int, required=True)
    ap.add_argument("--commands", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level="INFO", format=f"%(asctime)s tp-rank-{args.rank} %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    from common.config import EngineConfig
    from common.model_runner import ModelRunner

    store = dist.TCPStore("127.0.0.1", args.store_port, args.world_size, is_master=False,
                          timeout=timedelta(seconds=START_TIMEOUT_S))
    store.set(f"joined/{args.rank}", "1")
    config = EngineConfig(**msgspec.json.decode(args.config))
    _join_group(config, args.rank, store)
    runner = ModelRunner(config, lead=False)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(args.commands)
    decoder = msgspec.msgpack.Decoder(Command)
    try:
        while True:
            if not sock.poll(FOLLOWER_POLL_MS):
                if os.getppid() != args.parent:
                    log.warning("rank 0 (pid %d) is gone; exiting", args.parent)
                    return 1
                continue
            cmd = decoder.decode(sock.recv())
            if isinstance(cmd, Shutdown):
                return 0
            runner.follow(cmd)
    finally:
        sock.close()
        ctx.term()
        _leave_group()


if __name__ == "__main__":
    # run from the imported module, not __main__: the runner matches commands against that module's classes
    from common.tensor_parallel import follower_main as _main
    sys.exit(_main())
