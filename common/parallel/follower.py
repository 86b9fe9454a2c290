"""A tensor-parallel rank > 0: `python -m common.parallel.follower`, started by rank 0 (common/parallel/ranks.py).

It builds the same model runner on its shard and runs every command rank 0 sends, until told to stop or rank 0 is
gone. The only module that imports both the engine's runner and the wire structs.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import timedelta

import msgspec
import torch
import torch.distributed as dist
import zmq

from common.engine.config import EngineConfig
from common.engine.model_runner import ModelRunner
from common.parallel.ranks import START_TIMEOUT_S, join_group, leave_group
from common.parallel.wire import Command, Shutdown

log = logging.getLogger("nano_pd.tensor_parallel")

FOLLOWER_POLL_MS = 1000  # how often an idle rank checks that rank 0 is still alive


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

    store = dist.TCPStore("127.0.0.1", args.store_port, args.world_size, is_master=False,
                          timeout=timedelta(seconds=START_TIMEOUT_S))
    store.set(f"joined/{args.rank}", "1")
    config = EngineConfig(**msgspec.json.decode(args.config))
    join_group(config, args.rank, store)
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
        leave_group()


if __name__ == "__main__":
    sys.exit(follower_main())
