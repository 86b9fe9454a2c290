"""KV transfer bandwidth: NIXL and ZMQ between two processes vs an in-process scattered copy (the memcpy floor).

Each transfer moves randomly chosen (scattered) blocks, all layers, K and V, from a sender pool into random blocks
of a receiver pool in a spawned process. Time = write_blocks() until poll_sent() reports success, i.e. until the
data is in the receiver's pool (NIXL: write completed; ZMQ: receiver copied and acknowledged). Best of --repeat.

    .venv/bin/python benchmarks/kv_transfer.py [--sizes 1 4 16 64 256] [--repeat 5] [--block-size 16]
"""
import argparse
import multiprocessing as mp
import os
import sys
import time

import torch

# nixl logs INFO lines to stdout, which would break up the table; the env var also reaches the spawned receiver.
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kv_transfer import KVLayout, make_transport  # noqa: E402

LAYERS, HEADS, HEAD_DIM, DTYPE = 8, 4, 64, torch.float16


def _pool(num_blocks, block_size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, LAYERS, num_blocks, block_size, HEADS, HEAD_DIM, generator=g).to(DTYPE)


def _receiver(kind, num_blocks, block_size, conn):
    """Child process: owns the destination pool and keeps polling (ZMQ copies in poll; NIXL needs progress)."""
    torch.set_num_threads(1)
    with make_transport(kind, "D", _pool(num_blocks, block_size, 2), model_name="bench") as t:
        conn.send(t.metadata())
        while not conn.poll():
            t.poll_received(0.001)


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_remote(kind, sizes_blocks, num_blocks, block_size, repeat):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(kind, num_blocks, block_size, child), daemon=True)
    proc.start()
    out = {}
    try:
        meta = parent.recv()
        src_pool = _pool(num_blocks, block_size, 1)
        with make_transport(kind, "P", src_pool, model_name="bench", timeout_s=60) as p:
            peer = p.add_peer(meta)
            counter = iter(range(10**9))

            def one(n):
                tid = f"{kind}-{next(counter)}"
                p.write_blocks(peer, torch.randperm(num_blocks)[:n], torch.randperm(num_blocks)[:n], tid)
                r = p.poll_sent(timeout_s=60)
                assert r and r[0].ok, r

            one(1)  # connection setup is not part of the bandwidth
            for n in sizes_blocks:
                out[n] = _best(lambda: one(n), repeat)
        parent.send("stop")
        proc.join(10)
    finally:
        proc.kill()
    return out


def bench_memcpy(sizes_blocks, num_blocks, block_size, repeat):
    src, dst = _pool(num_blocks, block_size, 1), _pool(num_blocks, block_size, 2)

    def one(n):
        s, d = torch.randperm(num_blocks)[:n], torch.randperm(num_blocks)[:n]
        dst.index_copy_(2, d, src.index_select(2, s))

    return {n: _best(lambda: one(n), repeat) for n in sizes_blocks}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16, 64, 256], help="MiB per transfer")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--backends", nargs="+", default=["memcpy", "nixl", "zmq"])
    args = ap.parse_args()
    torch.set_num_threads(1)  # a copy engine, not a matmul: keep the two processes from fighting over cores

    block_size = args.block_size
    layout = KVLayout(model="bench", dtype="float16", block_size=block_size, num_layers=LAYERS,
                      num_kv_heads=HEADS, head_dim=HEAD_DIM)
    sizes_blocks = [max(1, round(mib * 2**20 / layout.block_bytes)) for mib in args.sizes]
    num_blocks = 2 * max(sizes_blocks)  # room to scatter
    print(f"layout: {LAYERS} layers x {HEADS} kv heads x {HEAD_DIM} head_dim, fp16, block_size {block_size} -> "
          f"{layout.block_bytes / 1024:.0f} KiB/block in {2 * LAYERS} slabs of {layout.chunk_bytes / 1024:.0f} KiB; "
          f"pools of {num_blocks} blocks; best of {args.repeat}", file=sys.stderr)

    results = {}
    for backend in args.backends:
        if backend == "memcpy":
            results[backend] = bench_memcpy(sizes_blocks, num_blocks, block_size, args.repeat)
        else:
            try:
                results[backend] = bench_remote(backend, sizes_blocks, num_blocks, block_size, args.repeat)
            except Exception as e:
                print(f"{backend}: unavailable ({e})", file=sys.stderr)

    print(f"{'size_MiB':>9} {'blocks':>7} {'backend':>8} {'seconds':>10} {'GB/s':>7}")
    for n in sizes_blocks:
        nbytes = n * layout.block_bytes
        for backend, res in results.items():
            print(f"{nbytes / 2**20:9.1f} {n:7d} {backend:>8} {res[n]:10.5f} {nbytes / res[n] / 1e9:7.2f}")


if __name__ == "__main__":
    main()
