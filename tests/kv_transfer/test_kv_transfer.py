"""kv_transfer: layout compatibility, and both backends moving scattered blocks between pools, in one process and
across two spawned processes, including dead peers and garbage on the wire."""
import multiprocessing as mp
import socket
import time

import msgspec
import pytest
import torch
import zmq

import kv_transfer
from kv_transfer import KVLayout, KVLayoutMismatch, check_compatible, make_transport

SHAPE = dict(num_layers=3, num_blocks=12, block_size=4, num_kv_heads=2, head_dim=8)
SRC, DST = [5, 1, 9], [0, 7, 3]


def _probe_nixl() -> bool:
    if mp.parent_process() is not None:  # a spawned helper re-imports this file: skip the probe there
        return True
    try:
        t = make_transport("nixl", "probe", _pool(0))
        t.close()
        return True
    except Exception:
        return False


def _nixl_works() -> bool:
    return NIXL_OK


NIXL_OK = None  # set below, once _pool exists


def _pool(seed, num_blocks=SHAPE["num_blocks"], dtype=torch.float32, num_layers=SHAPE["num_layers"], latent=False):
    """A K/V pool, or (latent) an MLA pool: one plane, one 'head' as wide as kv_lora_rank + rope dims (20 here)."""
    g = torch.Generator().manual_seed(seed)
    s = SHAPE
    planes, heads, width = (1, 1, 20) if latent else (2, s["num_kv_heads"], s["head_dim"])
    return torch.randn(planes, num_layers, num_blocks, s["block_size"], heads, width, generator=g).to(dtype)


def _state(seed, num_blocks=SHAPE["num_blocks"]):
    """A hybrid model's per-sequence state pool: one float32 slot of 10 values per block id."""
    return torch.randn(num_blocks, 10, generator=torch.Generator().manual_seed(100 + seed))


NIXL_OK = _probe_nixl()
BACKENDS = ["zmq", pytest.param("nixl", marks=pytest.mark.skipif(not NIXL_OK, reason="NIXL/UCX unusable here"))]


def _expected(dst_before, src_pool, src, dst):
    out = dst_before.clone()
    out[:, :, dst] = src_pool[:, :, src]
    return out


def _drive(sender, receiver, tid, timeout=10.0):
    """Poll both sides of an in-process pair (NIXL needs both to make progress) until both report tid."""
    sent, received = [], []
    deadline = time.monotonic() + timeout
    while not (sent and received) and time.monotonic() < deadline:
        sent += [r for r in sender.poll_sent(0.001) if r.transfer_id == tid]
        received += [r for r in receiver.poll_received(0.001) if r.transfer_id == tid]
    return sent, received


# --- layout -----------------------------------------------------------------------------------------------------
def test_layout_from_pool_and_hash():
    a = KVLayout.from_pool(_pool(0, dtype=torch.bfloat16), "m")
    assert (a.dtype, a.num_layers, a.block_size, a.num_kv_heads, a.head_dim) == ("bfloat16", 3, 4, 2, 8)
    assert a.kinds == ("paged_kv",) * 3
    b = KVLayout(model="m", dtype="bfloat16", block_size=4, num_layers=3, num_kv_heads=2, head_dim=8)
    assert a == b and a.compat_hash() == b.compat_hash() and len(a.compat_hash()) == 16
    check_compatible(a, b)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(a), type=KVLayout) == a
    assert KVLayout.from_pool(_pool(0), "m").compat_hash() != a.compat_hash()
    with pytest.raises(ValueError):
        KVLayout(model="m", dtype="float32", block_size=4, num_layers=2, num_kv_heads=2, head_dim=8, kinds=("x",))


def test_latent_layout_from_pool():
    a = KVLayout.from_pool(_pool(0, latent=True), "m")
    assert (a.kinds, a.num_planes, a.num_kv_heads, a.head_dim) == (("paged_latent",) * 3, 1, 1, 20)
    assert a.chunk_bytes == 4 * 20 * 4 and a.block_bytes == 3 * a.chunk_bytes  # one plane per layer
    kv = KVLayout.from_pool(_pool(0), "m")
    assert kv.num_planes == 2 and kv.block_bytes == 2 * 3 * kv.chunk_bytes
    assert a.compat_hash() != kv.compat_hash()
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(a), type=KVLayout) == a
    with pytest.raises(ValueError, match="planes"):
        KVLayout.from_pool(torch.zeros(3, 1, 2, 4, 1, 8), "m")
    with pytest.raises(ValueError, match="no transport moves"):
        msgspec.structs.replace(kv, kinds=("paged_kv", "paged_latent", "paged_kv")).num_planes


def test_state_layout_from_pools():
    a = KVLayout.from_pool(_pool(0), "m", _state(0))
    assert (a.state_kind, a.state_bytes) == ("recurrent_state", 40)
    assert a.block_bytes == KVLayout.from_pool(_pool(0), "m").block_bytes  # the state is per sequence, not per block
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(a), type=KVLayout) == a
    assert a.compat_hash() != KVLayout.from_pool(_pool(0), "m").compat_hash()
    with pytest.raises(KVLayoutMismatch, match="per-sequence state differs.*none.*recurrent_state"):
        check_compatible(KVLayout.from_pool(_pool(0), "m"), a)
    with pytest.raises(KVLayoutMismatch, match="state_bytes"):
        check_compatible(a, KVLayout.from_pool(_pool(0), "m", torch.zeros(SHAPE["num_blocks"], 12)))
    with pytest.raises(ValueError, match="slots"):  # one slot per block id, or a block's slot would not exist
        KVLayout.from_pool(_pool(0), "m", torch.zeros(SHAPE["num_blocks"] - 1, 10))
    with pytest.raises(ValueError, match="bad state"):
        KVLayout(model="m", dtype="float32", block_size=4, num_layers=2, num_kv_heads=2, head_dim=8,
                 state_kind="recurrent_state")


def test_latent_vs_kv_mismatch_says_so():
    # same per-token width on both sides, so only the kind (and head count) tells them apart
    latent = KVLayout(model="m", dtype="float32", block_size=4, num_layers=3, num_kv_heads=1, head_dim=16,
                      kinds=("paged_latent",) * 3)
    kv = KVLayout(model="m", dtype="float32", block_size=4, num_layers=3, num_kv_heads=1, head_dim=16)
    with pytest.raises(KVLayoutMismatch, match="cache kinds differ.*paged_latent.*paged_kv"):
        check_compatible(latent, kv)


@pytest.mark.parametrize("field,value", [("model", "other"), ("dtype", "float16"), ("block_size", 8),
                                         ("num_kv_heads", 4), ("head_dim", 16),
                                         ("kinds", ("paged_kv", "state", "paged_kv"))])
def test_layout_mismatch_names_field(field, value):
    a = KVLayout.from_pool(_pool(0), "m")
    b = msgspec.structs.replace(a, **{field: value})
    with pytest.raises(KVLayoutMismatch, match=field) as e:
        check_compatible(a, b)
    assert isinstance(e.value, ValueError) and a.compat_hash() != b.compat_hash()


def test_layout_mismatch_names_every_field():
    a = KVLayout.from_pool(_pool(0), "m")
    b = KVLayout(model="n", dtype="float16", block_size=4, num_layers=2, num_kv_heads=2, head_dim=8)
    with pytest.raises(KVLayoutMismatch) as e:
        check_compatible(a, b)
    for f in ("model", "dtype", "num_layers", "kinds"):
        assert f in str(e.value)
    assert "block_size" not in str(e.value)


def test_import_without_nixl_and_unknown_kind():
    with pytest.raises(ValueError, match="unknown"):
        make_transport("carrier-pigeon", "x", _pool(0))


# --- in-process pairs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", BACKENDS)
def test_in_process_scattered_write(kind, dtype):
    src_pool, dst_pool = _pool(1, dtype=dtype), _pool(2, num_blocks=9, dtype=dtype)
    before = dst_pool.clone()
    with make_transport(kind, "P", src_pool, model_name="m") as p, \
         make_transport(kind, "D", dst_pool, model_name="m") as d:
        peer = p.add_peer(d.metadata())
        d.expect("t1")
        sent, received = _drive(p, d, "t1", timeout=0.2)
        assert sent == [] and received == []  # nothing written yet: nothing reported, no hang
        p.write_blocks(peer, SRC, DST, "t1")
        sent, received = _drive(p, d, "t1")
        assert [r.ok for r in sent] == [True] and [r.ok for r in received] == [True]
        assert torch.equal(dst_pool, _expected(before, src_pool, SRC, DST))
        # a second transfer reusing the pairing, adjacent ids (merged descriptors on NIXL)
        d.expect("t2")
        p.write_blocks(peer, [0, 1, 2, 3], [4, 5, 6, 8], "t2")
        sent, received = _drive(p, d, "t2")
        assert sent[0].ok and received[0].ok
        assert torch.equal(dst_pool[:, :, [4, 5, 6, 8]], src_pool[:, :, [0, 1, 2, 3]])


@pytest.mark.parametrize("kind", BACKENDS)
def test_add_peer_refuses_layout_mismatch_and_other_backend(kind):
    with make_transport(kind, "P", _pool(1), model_name="m") as p, \
         make_transport(kind, "D", _pool(2, num_layers=2), model_name="m") as d, \
         make_transport(kind, "D2", _pool(2, dtype=torch.float16), model_name="m") as d2, \
         make_transport(kind, "D3", _pool(2, latent=True), model_name="m") as d3:
        with pytest.raises(KVLayoutMismatch, match="num_layers"):
            p.add_peer(d.metadata())
        with pytest.raises(KVLayoutMismatch, match="dtype"):
            p.add_peer(d2.metadata())
        with pytest.raises(KVLayoutMismatch, match="cache kinds differ"):
            p.add_peer(d3.metadata())
        with pytest.raises(KVLayoutMismatch, match="cache kinds differ"):
            d3.add_peer(p.metadata())
        with pytest.raises(ValueError, match="malformed"):
            p.add_peer(b"\x00garbage")
    other = "zmq" if kind == "nixl" else "nixl"
    if other == "nixl" and not _nixl_works():
        return
    with make_transport(kind, "P", _pool(1), model_name="m") as p, \
         make_transport(other, "D", _pool(2), model_name="m") as d:
        with pytest.raises(ValueError, match="same backend"):
            p.add_peer(d.metadata())


@pytest.mark.parametrize("kind", BACKENDS)
def test_write_blocks_argument_checks(kind):
    with make_transport(kind, "P", _pool(1), model_name="m") as p, \
         make_transport(kind, "D", _pool(2, num_blocks=4), model_name="m") as d:
        peer = p.add_peer(d.metadata())
        with pytest.raises(ValueError, match="dst block ids"):
            p.write_blocks(peer, [0], [4], "x")  # D has 4 blocks
        with pytest.raises(ValueError, match="src block ids"):
            p.write_blocks(peer, [12], [0], "x")
        with pytest.raises(ValueError, match="repeat"):
            p.write_blocks(peer, [0, 1], [2, 2], "x")
        with pytest.raises(ValueError, match="src blocks"):
            p.write_blocks(peer, [0, 1], [2], "x")
        with pytest.raises(KeyError):
            p.write_blocks("nobody", [0], [0], "x")


@pytest.mark.parametrize("kind", BACKENDS)
def test_expected_transfer_that_never_comes_times_out(kind):
    with make_transport(kind, "D", _pool(2), model_name="m") as d:
        d.expect("never", timeout_s=0.3)
        t0 = time.monotonic()
        results = d.poll_received(timeout_s=5)
        assert results == [kv_transfer.TransferResult("never", False, results[0].error)]
        assert "timed out" in results[0].error and time.monotonic() - t0 < 2


def test_zmq_garbage_is_dropped_and_next_transfer_lands():
    src_pool, dst_pool = _pool(1), _pool(2)
    before = dst_pool.clone()
    with make_transport("zmq", "P", src_pool, model_name="m") as p, \
         make_transport("zmq", "D", dst_pool, model_name="m") as d:
        host, port = d.endpoint[len("tcp://"):].rsplit(":", 1)
        with socket.create_connection((host, int(port))) as raw:  # not even ZMTP
            raw.sendall(b"\xff" * 64 + b"GET / HTTP/1.1\r\n\r\n")
        ctx = zmq.Context.instance()
        junk = ctx.socket(zmq.DEALER)
        junk.setsockopt(zmq.LINGER, 0)
        junk.connect(d.endpoint)
        from kv_transfer.zmq_backend import BlocksHeader
        good_shape = (2, SHAPE["num_layers"], 1, SHAPE["block_size"], SHAPE["num_kv_heads"], SHAPE["head_dim"])
        d.expect("short")
        junk.send_multipart([b"just one frame"])
        junk.send_multipart([b"\x93not msgpack", b"x" * 10])
        junk.send_multipart([msgspec.msgpack.encode(BlocksHeader("short", [0], "float32", good_shape)), b"x" * 10])
        junk.send_multipart([msgspec.msgpack.encode(BlocksHeader("oob", [99], "float32", good_shape)),
                             bytes(4 * 2 * 3 * 4 * 2 * 8)])
        junk.send_multipart([b"a", b"b", b"c"])
        refused = []
        deadline = time.monotonic() + 5
        while not refused and time.monotonic() < deadline:
            refused += d.poll_received(0.01)
        assert [(r.transfer_id, r.ok) for r in refused] == [("short", False)] and "bytes" in refused[0].error
        assert junk.poll(2000) and b"short" in junk.recv()  # the sender of a refused transfer is told
        junk.close()
        assert torch.equal(dst_pool, before)  # nothing garbage touched the pool

        peer = p.add_peer(d.metadata())
        d.expect("real")
        p.write_blocks(peer, SRC, DST, "real")
        sent, received = _drive(p, d, "real")
        assert sent[0].ok and received[0].ok
        assert torch.equal(dst_pool, _expected(before, src_pool, SRC, DST))


def test_auto_picks_a_working_backend():
    with make_transport("auto", "P", _pool(1), model_name="m", host="127.0.0.1") as t:
        assert t.backend == ("nixl" if _nixl_works() else "zmq")


# --- two processes ----------------------------------------------------------------------------------------------
def _receiver_main(kind, conn, latent=False, state=False):
    """Child: owns pool D, hands over metadata, keeps polling (NIXL needs receiver progress), answers commands."""
    pool = _pool(2, num_blocks=10, latent=latent)
    state_pool = _state(2, num_blocks=10) if state else None
    with make_transport(kind, "D", pool, model_name="m", state_pool=state_pool) as t:
        for tid in ("a", "b", "warm"):  # what the tests send: a receiver takes only the data it asked for
            t.expect(tid, timeout_s=60)
        conn.send(t.metadata())
        results = []
        while True:
            results += [tuple(r) for r in t.poll_received(0.005)]
            if conn.poll():
                cmd = conn.recv()
                if cmd == "results":
                    conn.send(results)
                elif cmd == "pool":
                    conn.send(pool.clone())
                elif cmd == "state":
                    conn.send(state_pool.clone())
                elif cmd == "stop":
                    return


def _spawn_receiver(kind, latent=False, state=False):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver_main, args=(kind, child, latent, state), daemon=True)
    proc.start()
    assert parent.poll(60), "receiver did not start"
    return proc, parent, parent.recv()


def _ask(conn, cmd):
    conn.send(cmd)
    assert conn.poll(10)
    return conn.recv()


@pytest.mark.parametrize("latent", [False, True], ids=["kv", "latent"])
@pytest.mark.parametrize("kind", BACKENDS)
def test_two_processes_scattered_write(kind, latent):
    proc, conn, meta = _spawn_receiver(kind, latent)
    try:
        before = _pool(2, num_blocks=10, latent=latent)
        src_pool = _pool(1, latent=latent)
        with make_transport(kind, "P", src_pool, model_name="m", timeout_s=10) as p:
            peer = p.add_peer(meta)
            for tid, src, dst in [("a", SRC, DST), ("b", [11, 0], [9, 8])]:
                p.write_blocks(peer, src, dst, tid)
                assert p.poll_sent(timeout_s=10) == [kv_transfer.TransferResult(tid, True)]
                before = _expected(before, src_pool, src, dst)
            deadline = time.monotonic() + 10
            while {"a", "b"} - {r[0] for r in _ask(conn, "results")} and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sorted(_ask(conn, "results")) == [("a", True, None), ("b", True, None)]
            got = _ask(conn, "pool")
            assert torch.equal(got, before)  # written blocks equal, every untouched block unchanged
        conn.send("stop")
        proc.join(10)
    finally:
        proc.kill()


@pytest.mark.parametrize("kind", BACKENDS)
def test_two_processes_move_blocks_and_the_sequence_state(kind):
    """A hybrid model's hand-off: the K/V blocks, and only the state slot of the first source block, into the slot
    of the first destination block; every other slot on the receiver is untouched. A side without a state
    cannot pair with it."""
    proc, conn, meta = _spawn_receiver(kind, state=True)
    try:
        pool, state = _pool(2, num_blocks=10), _state(2, num_blocks=10)
        src_pool, src_state = _pool(1), _state(1)
        with make_transport(kind, "P", src_pool, model_name="m", state_pool=src_state, timeout_s=10) as p:
            peer = p.add_peer(meta)
            for tid, src, dst in [("a", SRC, DST), ("b", [11, 0], [9, 8])]:
                p.write_blocks(peer, src, dst, tid)
                assert p.poll_sent(timeout_s=10) == [kv_transfer.TransferResult(tid, True)]
                pool = _expected(pool, src_pool, src, dst)
                state[dst[0]] = src_state[src[0]]
            deadline = time.monotonic() + 10
            while {"a", "b"} - {r[0] for r in _ask(conn, "results")} and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sorted(_ask(conn, "results")) == [("a", True, None), ("b", True, None)]
            assert torch.equal(_ask(conn, "pool"), pool)
            assert torch.equal(_ask(conn, "state"), state)
        with make_transport(kind, "Q", src_pool, model_name="m") as q, \
                pytest.raises(KVLayoutMismatch, match="per-sequence state differs"):
            q.add_peer(meta)
        conn.send("stop")
        proc.join(10)
    finally:
        proc.kill()


@pytest.mark.parametrize("kind", BACKENDS)
def test_dead_receiver_fails_the_send_instead_of_hanging(kind):
    proc, conn, meta = _spawn_receiver(kind)
    with make_transport(kind, "P", _pool(1), model_name="m", timeout_s=10) as p:
        peer = p.add_peer(meta)
        p.write_blocks(peer, SRC, DST, "warm")  # connection established while the peer lives
        assert p.poll_sent(timeout_s=10)[0].ok
        proc.kill()
        proc.join(10)
        t0 = time.monotonic()
        p.write_blocks(peer, SRC, DST, "doomed", timeout_s=2)
        results = []
        while not results and time.monotonic() - t0 < 8:
            results += p.poll_sent(timeout_s=0.1)
        assert [(r.transfer_id, r.ok) for r in results] == [("doomed", False)], results
        assert time.monotonic() - t0 < 4


def test_without_nixl_import_still_works_and_auto_falls_back():
    import subprocess
    import sys
    code = ("import sys; sys.modules['nixl'] = None\n"  # makes `import nixl` raise ImportError
            "import torch, kv_transfer\n"
            "pool = torch.zeros(2, 2, 4, 4, 2, 8)\n"
            "t = kv_transfer.make_transport('auto', 'x', pool, model_name='m'); assert t.backend == 'zmq'; t.close()\n"
            "try:\n    kv_transfer.make_transport('nixl', 'x', pool, model_name='m')\n"
            "except ImportError as e:\n    assert \"kind='zmq'\" in str(e), e; print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_zmq_data_arriving_after_the_deadline_is_refused():
    src_pool, dst_pool = _pool(1), _pool(2)
    before = dst_pool.clone()
    with make_transport("zmq", "P", src_pool, model_name="m") as p, \
         make_transport("zmq", "D", dst_pool, model_name="m") as d:
        peer = p.add_peer(d.metadata())
        d.expect("slow", timeout_s=0.05)
        time.sleep(0.1)
        assert [r.ok for r in d.poll_received()] == [False]  # D gave up (and may reuse the blocks)
        p.write_blocks(peer, SRC, DST, "slow")
        sent, _ = _drive(p, d, "slow", timeout=1)
        assert [(r.ok, "deadline" in r.error) for r in sent] == [(False, True)]
        assert torch.equal(dst_pool, before)  # the late data never touched the pool


@pytest.mark.parametrize("cancelled", [True, False], ids=["cancelled", "never-expected"])
def test_zmq_data_nobody_waits_for_is_refused(cancelled):
    """A hung prefill worker that wakes up after the decode worker freed its blocks (or a stranger) must not
    overwrite blocks that may hold another sequence's KV by now."""
    src_pool, dst_pool = _pool(1), _pool(2)
    before = dst_pool.clone()
    with make_transport("zmq", "P", src_pool, model_name="m") as p, \
         make_transport("zmq", "D", dst_pool, model_name="m") as d:
        peer = p.add_peer(d.metadata())
        if cancelled:
            d.expect("zombie")
            d.cancel("zombie")
        p.write_blocks(peer, SRC, DST, "zombie")
        sent, received = _drive(p, d, "zombie", timeout=1)
        assert [(r.ok, "not expected" in r.error) for r in sent] == [(False, True)] and received == []
        assert torch.equal(dst_pool, before)
