"""Fuzzing every ZeroMQ socket and every listening port of a live 1 prefill + 2 decode cluster.

Five classes of input reach every port the router and the workers listen on (the router's HTTP and control ports,
each worker's inbox and ZMQ KV endpoint):

1. random bytes: 1..3-frame messages of 0 B to a few MiB (and connections that send nothing), over the socket type
   each port expects and over the types it refuses at the handshake, and floods of them;
2. truncated: every message of the control protocol and of the ZMQ KV wire, encoded, then cut short;
3. wrong shape: valid msgpack of the wrong structure (one message's tag with another's fields, arrays where structs
   go, each field of another type, unknown tags, nesting 100 000 deep, huge arrays);
4. hostile but well formed: forged outputs and answers for requests that are streaming, fake workers registering
   (another's id, a wrong model or layout, absurd sizes, a bogus inbox that real requests are then routed to),
   prefill tasks naming bogus inboxes, peers, blocks and leases, a stranger's write into a decode worker's KV pool,
   commands sent where only peers talk, and a flood of distinct forged peers;
5. raw TCP bytes that are not even ZMTP (or a ZMTP greeting announcing an impossible frame).

After each class every process still runs, a greedy request gives the text it gave before the fuzzing (the
offline engine's), the streams that ran meanwhile got exactly their tokens, the cluster is idle with every KV
block free (no forged message leaves a reservation, a task or a registration behind), and no process logged a
traceback, or a line per message, meanwhile. Each ZeroMQ port answers a sentinel after its barrage (the router a
refused registration, a KV endpoint an ack, the prefill inbox a refused task; a decode inbox logs a late answer),
so every message provably reached its process and was handled before the checks run.

The cluster keeps the default --kv-lease (60 s), on purpose: no forged message may hold a block until a lease
runs out (assert_idle waits 30 s, so one that did fails the class). The blocks a forgery can hold are released
within seconds: a fake prefill worker's admissions when it is declared dead (the router's 2 s heartbeat timeout),
a forged task's prefill blocks at its own lease, which the forger picks and the protocol bounds.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import random
import socket
import struct
import threading
import time

import msgspec
import pytest
import zmq

from common.cluster.protocol import (Abort, Admit, Drain, Heartbeat, KVTransferred, Leaving, PeerGone, PrefillDone,
                                     PrefillTask, Registered, Rejected, Starting, TokenOutput, Tokens, WorkerInfo,
                                     WorkerLoad, encode, events_identity, starting_identity)
from common.cluster.runtime import MAX_PEER_SOCKETS
from common.engine_args import EngineArgs
from common.sampling_params import GrammarSpec, SamplingParams
from kv_transfer.base import ZmqPeerInfo
from kv_transfer.layout import KVLayout
from kv_transfer.zmq_backend import Ack, BlocksHeader
from prefill_worker.worker import MAX_PAIRED_PEERS
from tests.support.cluster_harness import LocalCluster, assert_all_up, assert_idle
from tests.workers.test_cluster import metric_value, prompts

SEED = 20261202
SIZES = (0, 1, 7, 300, 70_000)
HUGE = 3 * 2**20  # "a few MiB": far above any control message, well below what a box this size can hold
DEPTH = 100_000  # nesting of the depth bombs (msgspec gives up near 1000)
FLOOD = 300  # messages of one kind in a row: a log line each would show
FORGED_PEERS = 1100  # distinct forged decode workers: more than a ZMQ context's 1023 sockets
MAX_LOG_LINES = 100  # per process and class: rate-limited warnings, the sentinels, a few refusals
SEND_TIMEOUT_S = 5.0
ANSWER_TIMEOUT_S = 15.0  # a sentinel's answer: the port's process handled everything sent before it
FAKES_GONE_S = 10.0  # fake workers heartbeat once; the router declares them dead after its 2 s timeout
SERVED = "tiny"
GOOD = {"model": SERVED, "messages": [{"role": "user", "content": "paper stone river " * 12 + "north"}],
        "max_tokens": 12, "temperature": 0}  # a prompt of several blocks: a corrupted prefix cache would show
STREAM_TOKENS = 256


# --- the cluster's ports ------------------------------------------------------------------------------------------
def _listening_ports(pid: int) -> list[int]:
    """TCP ports a process listens on, from /proc (no psutil needed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                    ports.append(int(fields[1].split(":")[1], 16))
    return ports


@dataclasses.dataclass(frozen=True)
class Port:
    number: int
    kind: str  # "http" | "control" (the router's ROUTER) | "inbox" (a worker's PULL) | "kv" (a worker's KV ROUTER)
    owner: str  # "router", "prefill-0", "decode-1": the name of the process's log file too
    worker_id: str = ""


def cluster_ports(c: LocalCluster) -> list[Port]:
    """Every port a process of the cluster listens on, each known for what it is (an unknown one fails)."""
    workers = {w["pid"]: w for w in c.workers() if w["alive"]}
    ports = []
    for role, procs in c.procs.items():
        for index, proc in enumerate(procs):
            for number in _listening_ports(proc.pid):
                if role == "router":
                    kind = {c.port: "http", c.control_port: "control"}.get(number, "unknown")
                    ports.append(Port(number, kind, "router"))
                    continue
                w = workers[proc.pid]
                kind = "inbox" if w["inbox"].endswith(f":{number}") else "kv"
                ports.append(Port(number, kind, f"{role}-{index}", w["worker_id"]))
    assert sorted(p.kind for p in ports) == sorted(["http", "control"] + ["inbox", "kv"] * 3), ports
    return ports


def kv_layout(model_dir: str) -> KVLayout:
    """The KV layout the workers have (what KVLayout.from_pool gives them), from the model's config: a forger
    that knows the model knows it; the hostile class checks it against the hash the router gives away."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    block_size = next(f.default for f in dataclasses.fields(EngineArgs) if f.name == "block_size")
    return KVLayout(model=SERVED, dtype=cfg.get("dtype") or cfg.get("torch_dtype") or "float32",
                    block_size=block_size, num_layers=cfg["num_hidden_layers"],
                    num_kv_heads=cfg["num_key_value_heads"],
                    head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def blocks_message(layout: KVLayout, transfer_id: str, dst: list[int], fill: int = 0) -> list[bytes]:
    """A well-formed ZMQ KV write of len(dst) blocks: header, then a payload of exactly the right size."""
    shape = (2, layout.num_layers, len(dst), layout.block_size, layout.num_kv_heads, layout.head_dim)
    header = msgspec.msgpack.encode(BlocksHeader(transfer_id, dst, layout.dtype, shape))
    return [header, bytes([fill]) * (len(dst) * layout.block_bytes)]


def fake_info(worker_id: str, role: str = "prefill", model: str = SERVED, inbox: str = "tcp://127.0.0.1:9",
              layout_hash: str = "", kv_transport: str = "zmq", block_size: int = 16, num_blocks: int = 64,
              max_model_len: int = 2048) -> WorkerInfo:
    return WorkerInfo(worker_id, role, model, inbox, kv_transport, layout_hash, block_size, num_blocks, max_model_len,
                      host="127.0.0.1", pid=1)


# --- the test's side of the wire -----------------------------------------------------------------------------------
class Wire:
    """The test's ZeroMQ sockets: LINGER 0 everywhere, every send and receive bounded by a timeout."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)
        self.ctx.set(zmq.MAX_SOCKETS, 4096)

    def open(self, kind: int, port: int, identity: bytes | None = None) -> zmq.Socket:
        s = self.ctx.socket(kind)
        if identity is not None:
            s.setsockopt(zmq.IDENTITY, identity)
        s.connect(f"tcp://127.0.0.1:{port}")
        return s

    @staticmethod
    def send(s: zmq.Socket, frames: list[bytes]):
        if not s.poll(int(SEND_TIMEOUT_S * 1000), zmq.POLLOUT):
            raise AssertionError(f"a send to {s.getsockopt(zmq.LAST_ENDPOINT)!r} blocked {SEND_TIMEOUT_S} s")
        s.send_multipart(frames, zmq.NOBLOCK)

    @staticmethod
    def try_send(s: zmq.Socket, frames: list[bytes]) -> bool:
        """Send unless the socket has nowhere to queue it (a peer that refused our socket type at the handshake)."""
        try:
            return bool(s.poll(100, zmq.POLLOUT)) and s.send_multipart(frames, zmq.NOBLOCK) is None
        except zmq.Again:  # the refused connection went between the poll and the send
            return False

    @staticmethod
    def recv(s: zmq.Socket, timeout_s: float) -> list[bytes] | None:
        return s.recv_multipart(zmq.NOBLOCK) if s.poll(int(timeout_s * 1000)) else None

    def close(self):
        self.ctx.destroy(linger=0)


class Sink:
    """A PULL socket standing in for a decode worker's inbox: collects the PrefillDone answers of forged tasks (a
    thread drains it, so the prefill worker never finds it full). A task the prefill worker computes is answered
    twice, its first token as soon as the write is posted and then the write's failure: `errors` keeps the latter."""

    def __init__(self, wire: Wire):
        self.sock = wire.ctx.socket(zmq.PULL)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.answers: dict[str, PrefillDone] = {}  # the last answer to each task
        self.errors: dict[str, str] = {}  # the refusal (or failure) of each task that got one
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def endpoint_variant(self, i: int) -> str:
        """The i-th of many distinct endpoint strings that all reach this sink (distinct source addresses)."""
        return f"tcp://127.0.{i // 250}.{i % 250 + 1}:0;127.0.0.1:{self.port}"

    def _drain(self):
        decoder = msgspec.msgpack.Decoder(PrefillDone)
        while not self._stop:
            if not self.sock.poll(50):
                continue
            while True:
                try:
                    data = self.sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                done = decoder.decode(data)
                with self._cond:
                    self.answers[done.request_id] = done
                    if done.error:
                        self.errors[done.request_id] = done.error
                    self._cond.notify_all()

    def wait_refused(self, request_ids, timeout_s: float = ANSWER_TIMEOUT_S) -> dict[str, str]:
        """The errors that ended these tasks, every one of them (an assertion error names those still missing)."""
        wanted = set(request_ids)
        with self._cond:
            self._cond.wait_for(lambda: wanted <= self.errors.keys(), timeout_s)
            missing = wanted - self.errors.keys()
            assert not missing, (f"no refusal within {timeout_s} s of the tasks {sorted(missing)[:10]} (answers: "
                                 f"{[self.answers.get(rid) for rid in sorted(missing)[:3]]})")
            return {rid: self.errors[rid] for rid in wanted}

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class LogWatch:
    """What each process of the cluster logs while a class runs: no traceback, and not a line per message."""

    def __init__(self, c: LocalCluster):
        self.paths = {name[:-4]: os.path.join(c.log_dir, name) for name in os.listdir(c.log_dir)
                      if name.endswith(".log")}
        self.start = {owner: os.path.getsize(path) for owner, path in self.paths.items()}

    def new_text(self, owner: str) -> str:
        with open(self.paths[owner], "rb") as f:
            f.seek(self.start[owner])
            return f.read().decode(errors="replace")

    def wait_for(self, owner: str, needle: str, timeout_s: float = ANSWER_TIMEOUT_S):
        deadline = time.monotonic() + timeout_s
        while needle not in self.new_text(owner):
            assert time.monotonic() < deadline, f"{owner} never logged {needle!r}"
            time.sleep(0.05)

    def assert_quiet(self):
        for owner in self.paths:
            text = self.new_text(owner)
            assert "Traceback" not in text, f"{owner} logged a traceback:\n{text[-3000:]}"
            lines = text.count("\n")
            assert lines <= MAX_LOG_LINES, f"{owner} logged {lines} lines (a line per message?):\n{text[-3000:]}"


class Carrier:
    """The socket of the type a port expects, and the sentinel that proves all sent before it was handled."""

    def __init__(self, wire: Wire, port: Port, sink: Sink, layout: KVLayout, watch: LogWatch, tag: str):
        self.wire, self.port, self.sink, self.layout, self.watch = wire, port, sink, layout, watch
        self.identity = f"fuzz-{tag}-{port.number}"
        kind = zmq.PUSH if port.kind == "inbox" else zmq.DEALER
        self.sock = wire.open(kind, port.number, self.identity.encode() if port.kind == "control" else None)
        self.num_sent = 0
        self.num_flushed = 0

    def send(self, frames: list[bytes]):
        """One message; a KV endpoint takes (header, payload) pairs, so a lone frame gets a payload to go with it."""
        if self.port.kind == "kv" and len(frames) == 1:
            frames = [frames[0], bytes(self.layout.block_bytes)]
        self.wire.send(self.sock, frames)
        self.num_sent += 1

    def flush(self):
        """Send the sentinel and wait for its answer: the port's process has handled every message before it."""
        self.num_flushed += 1
        sentinel = f"sentinel-{self.identity}-{self.num_flushed}"
        if self.port.kind == "control":  # a registration the router refuses, answered to this socket
            self.wire.send(self.sock, [encode(Heartbeat(fake_info(self.identity, model=sentinel), WorkerLoad()))])
            self._await_reply(lambda frames: sentinel in msgspec.msgpack.decode(frames[-1], type=Registered).error)
        elif self.port.kind == "kv":  # a write nobody expects: refused, and the refusal acknowledged
            self.wire.send(self.sock, blocks_message(self.layout, sentinel, [0]))
            ack = self._await_reply(lambda frames: msgspec.msgpack.decode(frames[-1], type=Ack).transfer_id == sentinel)
            assert not ack.ok, f"{self.port.owner} let a stranger write into its KV pool"
        elif self.port.owner.startswith("prefill"):  # a task that cannot pair: its refusal comes to the sink
            self.wire.send(self.sock, [encode(PrefillTask(sentinel, [5, 6, 7], SamplingParams(), 0, 0, [0], "nobody",
                                                          self.sink.endpoint, b"", 5.0))])
            self.sink.wait_refused([sentinel])
        else:  # a decode inbox answers nobody: it logs the answer to a request it does not hold
            self.wire.send(self.sock, [encode(PrefillDone(sentinel, 5))])
            self.watch.wait_for(self.port.owner, f"late answer for {sentinel}")

    def _await_reply(self, is_it):
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while (frames := self.wire.recv(self.sock, max(0.0, deadline - time.monotonic()))) is not None:
            try:
                if is_it(frames):
                    return msgspec.msgpack.decode(frames[-1], type=Ack if self.port.kind == "kv" else Registered)
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass  # another answer (a fake registration's) on the same socket
        raise AssertionError(f"{self.port.owner}'s {self.port.kind} port did not answer the sentinel in "
                             f"{ANSWER_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def layout(model_dir) -> KVLayout:
    return kv_layout(model_dir)


@pytest.fixture(scope="module")
def baseline(cluster, offline) -> str:
    """The good request's text before any fuzzing (the offline engine's): every class must leave it unchanged."""
    status, _, got = cluster.post("/v1/chat/completions", GOOD)
    text = got["choices"][0]["message"]["content"]
    assert status == 200 and text == offline([GOOD["messages"][0]["content"]], GOOD["max_tokens"])[0]
    return text


def harness_pids(c: LocalCluster) -> set[int]:
    return {p.pid for procs in c.procs.values() for p in procs}


def assert_unharmed(c: LocalCluster, baseline: str, watch: LogWatch, what: str, count: int):
    """What every class must leave behind: the cluster as it was."""
    print(f"\n{what}: {count} messages")  # (pytest -s shows them)
    deadline = time.monotonic() + FAKES_GONE_S
    while [w for w in c.workers() if w["alive"] and w["pid"] not in harness_pids(c)]:
        assert time.monotonic() < deadline, f"fake workers still alive after {FAKES_GONE_S} s: {c.workers()}"
        time.sleep(0.1)
    assert_all_up(c)
    status, _, got = c.post("/v1/chat/completions", GOOD)
    assert status == 200, got
    assert got["choices"][0]["message"]["content"] == baseline
    assert_idle(c)
    watch.assert_quiet()


class Fuzzing:
    """One class's run: the wire, the sink, the log watch and a carrier per ZeroMQ port."""

    def __init__(self, c: LocalCluster, layout: KVLayout, tag: str):
        self.c, self.layout = c, layout
        self.ports = cluster_ports(c)
        self.watch = LogWatch(c)
        self.wire = Wire()
        self.sink = Sink(self.wire)
        self.carriers = [Carrier(self.wire, p, self.sink, layout, self.watch, tag) for p in self.ports
                         if p.kind != "http"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sink.close()
        self.wire.close()

    def carrier(self, kind: str, owner_prefix: str) -> list[Carrier]:
        return [k for k in self.carriers if k.port.kind == kind and k.port.owner.startswith(owner_prefix)]

    def to_every_port(self, messages: list[list[bytes]]):
        for carrier in self.carriers:
            for frames in messages:
                carrier.send(frames)

    def flush(self) -> int:
        for carrier in self.carriers:
            carrier.flush()
        return sum(k.num_sent for k in self.carriers)


# --- 1. random bytes ------------------------------------------------------------------------------------------------
def random_messages(rng: random.Random) -> list[list[bytes]]:
    messages = [[rng.randbytes(size) for _ in range(count)] for count in (1, 2, 3) for size in SIZES]
    messages += [[rng.randbytes(rng.choice(SIZES)) for _ in range(rng.randint(1, 3))] for _ in range(20)]
    messages += [[rng.randbytes(HUGE)], [rng.randbytes(HUGE // 3) for _ in range(3)]]
    return messages


def test_garbage_on_every_zmq_port_crashes_nothing(cluster, baseline, layout):
    """Random frames on every port, over the socket type it expects (decoded and dropped) and over the types it
    refuses at the handshake; floods of them log a few lines, not one each."""
    rng = random.Random(SEED)
    with Fuzzing(cluster, layout, "random") as fz:
        fz.to_every_port(random_messages(rng))
        for carrier in fz.carriers:  # floods: undecodable single frames, and multipart where one frame goes
            for _ in range(FLOOD):
                carrier.send([rng.randbytes(rng.choice((1, 7, 300)))])
                carrier.send([rng.randbytes(7)] * (3 if carrier.port.kind == "kv" else 2))  # one frame too many
        strangers = 0
        for port in fz.ports:  # every other socket type, and on the HTTP port every one: refused at the handshake
            for kind in (zmq.DEALER, zmq.PUSH, zmq.REQ, zmq.PUB):
                s = fz.wire.open(kind, port.number)
                for frames in [] if kind == zmq.PUB else random_messages(rng)[:1 if kind == zmq.REQ else 8]:
                    strangers += fz.wire.try_send(s, frames)
            fz.wire.open(zmq.DEALER, port.number).close()  # a connection that sends nothing (zero frames)
        time.sleep(0.3)  # the refused handshakes run their course before the sockets go
        count = fz.flush() + strangers
    assert_unharmed(cluster, baseline, fz.watch, "random", count)


# --- 2. truncated ---------------------------------------------------------------------------------------------------
def protocol_samples(layout: KVLayout) -> list[bytes]:
    """One of every message the protocol has (every field set), and of the ZMQ KV wire's."""
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, max_tokens=8, seed=3, stop_token_ids=[2],
                            presence_penalty=0.5, logprobs=2, logit_bias={5: 1.5},
                            grammar=GrammarSpec("regex", "[a-z]+"))
    info = fake_info("fuzz-sample", model="not-served")
    load = WorkerLoad(*range(1, 13))
    output = TokenOutput("r-0#0", [1, 2], "stop", None, False, 3, [{1: -0.5}, {2: -0.1}], 4, 2, True)
    meta = ZmqPeerInfo(name="fuzz-sample", layout=layout, num_blocks=8, endpoint="tcp://127.0.0.1:9")
    structs = [Heartbeat(info, load, True), Starting("fuzz-sample", "prefill"), Tokens("fuzz-sample", [output]),
               KVTransferred(100, 0.5), Rejected("fuzz-sample", "r-0#0", "full"), Leaving("fuzz-sample", "drained"),
               Registered(False, "no"), Admit("r-0#0", [1, 2, 3], params, "fuzz-sample", "tcp://127.0.0.1:9", 1),
               Abort(["r-0#0"]), PeerGone("fuzz-sample"), Drain(),
               PrefillTask("r-0#0", [1, 2, 3], params, 1, 0, [4], "fuzz-sample", "tcp://127.0.0.1:9", b"\x01junk", 30),
               PrefillDone("r-0#0", 5, None, 3, {5: -0.2}), PrefillDone("r-0#0", error="failed"),
               info, load, output, meta, layout,
               BlocksHeader("r-0#0", [0, 1], layout.dtype,
                            (2, layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)),
               Ack("r-0#0", False, "x")]
    return [msgspec.msgpack.encode(s) for s in structs]


def test_truncated_messages_on_every_port(cluster, baseline, layout):
    rng = random.Random(SEED + 2)
    with Fuzzing(cluster, layout, "truncated") as fz:
        cut = []
        for data in protocol_samples(layout):
            n = len(data)
            cut += [[data[:i]] for i in sorted({1, 2, n // 4, n // 2, 3 * n // 4, n - 2, n - 1, rng.randrange(1, n)})]
        fz.to_every_port(cut)
        count = fz.flush()
    assert_unharmed(cluster, baseline, fz.watch, "truncated", count)


# --- 3. wrong shape -------------------------------------------------------------------------------------------------
WRONG_VALUES = (None, "x", -1, 2**64 - 1, -2**63, 1.5, float("nan"), [], {}, b"\x00", True, [[[]]], {"k": "v"})


def bomb(kind: str) -> bytes:
    """DEPTH nested arrays or maps around a nil: a few hundred KiB that no decoder may recurse through."""
    return (b"\x91" if kind == "array" else b"\x81\xa1k") * DEPTH + b"\xc0"


def wrong_shapes(layout: KVLayout) -> list[bytes]:
    tagged = [msgspec.to_builtins(s) for s in (msgspec.msgpack.decode(d) for d in protocol_samples(layout))]
    tagged = [d for d in tagged if isinstance(d, dict) and "type" in d]
    tags = [d["type"] for d in tagged]
    shapes = []
    for i, fields in enumerate(tagged):
        for shift in (1, 2, 5):  # another message's tag with these fields
            shapes.append({**fields, "type": tags[(i + shift) % len(tags)]})
        shapes.append([fields["type"], *(v for k, v in fields.items() if k != "type")])  # an array for the struct
        for name, value in fields.items():
            if isinstance(value, dict):  # an array where a nested struct goes, a struct where an array-like goes
                shapes.append({**fields, name: list(value.values())})
            if isinstance(value, list) and value and isinstance(value[0], list):
                shapes.append({**fields, name: [{"k": v} for v in value]})
            if name != "type":
                shapes += [{**fields, name: wrong} for wrong in WRONG_VALUES]  # a field of every other type
    shapes += [{"type": "nope"}, {"type": 7}, {"type": None}, {"type": b"heartbeat"}, {"type": ["heartbeat"]}, {},
               {"worker_id": "x"}, [], None, 5, "heartbeat", b"heartbeat", 1.5, [None] * 1_000_000,
               {"type": "abort", "request_ids": ["x" * 10] * 200_000},
               {"type": "tokens", "worker_id": "w", "outputs": [["r#0", [1] * 50]] * 20_000}]
    raw = [msgspec.msgpack.encode(s) for s in shapes]
    raw.append(msgspec.msgpack.Encoder().encode(msgspec.msgpack.Ext(1, b"\x00" * 9)))
    raw.append(b"\xd6\xff" + b"\xff" * 4)  # a timestamp extension where a struct goes
    raw.append(b"\xa3\xff\xfe\xfd")  # a string that is not UTF-8
    for kind in ("array", "map"):  # depth bombs: bare, in an unknown field, in a typed field, in an array-like
        raw += [bomb(kind), b"\x82\xa4type\xa9heartbeat\xa1x" + bomb(kind),
                b"\x83\xa4type\xacprefill_done\xaarequest_id\xa1r\xa8logprobs" + bomb(kind),
                b"\x95\xa1t\x90\xa7float32\x90" + bomb(kind)]
    return raw


def test_wrong_shape_messages_on_every_port(cluster, baseline, layout):
    with Fuzzing(cluster, layout, "shape") as fz:
        shapes = wrong_shapes(layout)
        # a task that would pair with a depth bomb for metadata (refused: the sink hears why)
        nested = PrefillTask("fuzz-bomb-meta", [5, 6], SamplingParams(), 0, 0, [0], "fuzz-bomb", fz.sink.endpoint,
                             bomb("map"), 5.0)
        fz.to_every_port([[s] for s in shapes] + [[encode(nested)]])
        count = fz.flush()
        assert "malformed" in fz.sink.wait_refused(["fuzz-bomb-meta"])["fuzz-bomb-meta"]
    assert_unharmed(cluster, baseline, fz.watch, "wrong-shape", count)


# --- 4. hostile but valid -------------------------------------------------------------------------------------------
class Streams:
    """Greedy streams that run while the forgeries fly; each gives its attempt id as soon as its first chunk is in."""

    def __init__(self, c: LocalCluster, texts: list[str], max_tokens: int):
        self.texts, self.max_tokens = texts, max_tokens
        self.client = c.openai()
        self.ids: list[str | None] = [None] * len(texts)
        self._got_id = threading.Barrier(len(texts) + 1, timeout=60)
        self._pool = cf.ThreadPoolExecutor(len(texts))
        self._futures = [self._pool.submit(self._one, i) for i in range(len(texts))]

    def attempt_ids(self) -> list[str]:
        self._got_id.wait()
        return [f"{i}-0#0" for i in self.ids]  # choice 0's first attempt: what the workers know the request by

    def _one(self, i: int) -> tuple[str, int]:
        stream = self.client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": self.texts[i]}], max_tokens=self.max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        parts, usage = [], None
        for chunk in stream:
            if self.ids[i] is None:
                self.ids[i] = chunk.id
                self._got_id.wait()
            usage = chunk.usage or usage
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts), usage.completion_tokens

    def assert_intact(self, offline):
        """Exactly the offline engine's text and max_tokens tokens: nothing forged got in, nothing got lost."""
        results = [f.result(timeout=120) for f in self._futures]
        self._pool.shutdown()
        expected = offline(self.texts, self.max_tokens, ignore_eos=True)
        for (text, tokens), want in zip(results, expected):
            assert tokens == self.max_tokens and text == want


def test_hostile_messages_leave_streams_and_blocks_alone(cluster, baseline, layout, offline):
    c = cluster
    params = SamplingParams(temperature=0, max_tokens=4)
    with Fuzzing(c, layout, "hostile") as fz:
        sink, wire = fz.sink, fz.wire
        decode_ids = [p.worker_id for p in fz.ports if p.kind == "inbox" and p.owner.startswith("decode")]
        prefill_id = next(p.worker_id for p in fz.ports if p.owner.startswith("prefill"))
        decode_kv = [p for p in fz.ports if p.kind == "kv" and p.owner.startswith("decode")]
        streams = Streams(c, prompts(3, seed=7), STREAM_TOKENS)
        live = streams.attempt_ids()

        # answers for the live attempts straight into the decode workers' inboxes (they hold none of them now)
        for carrier in fz.carrier("inbox", "decode"):
            for rid in live + ["nobody#0"]:
                carrier.send([encode(PrefillDone(rid, 7))])
                carrier.send([encode(PrefillDone(rid, 7, None, 10**6, {7: 0.0}))])
                carrier.send([encode(PrefillDone(rid, error="forged"))])
        # a stranger's write of every block it can name into each decode worker's pool, for live and unknown ids
        for carrier in fz.carrier("kv", "decode"):
            for rid in live + ["nobody#0"]:
                carrier.send(blocks_message(layout, rid, list(range(64)), fill=0x7F))
        # commands where only peers talk (every port): an Admit naming a bogus prefill inbox, Aborts of live and
        # unknown requests, PeerGone naming every live worker
        commands = [Admit("fuzz-admit#0", [5, 6, 7], params, "fuzz-prefill", "garbage"),
                    Admit(live[0], [5, 6, 7], params, prefill_id, "tcp://127.0.0.1:9"),
                    Abort(live + ["nobody#0"]), *(PeerGone(w) for w in decode_ids + [prefill_id])]
        fz.to_every_port([[encode(m)] for m in commands])

        # prefill tasks with bogus inboxes, peers, blocks and leases: each refused (its answer comes to the sink) or
        # dropped, and none holds a block afterwards
        def meta(name: str, endpoint: str, lay: KVLayout = layout) -> bytes:
            return msgspec.msgpack.encode(ZmqPeerInfo(name=name, layout=lay, num_blocks=512, endpoint=endpoint))

        real_kv = f"tcp://127.0.0.1:{decode_kv[0].number}"  # a real decode worker's pool, under a forged peer's name
        nowhere = "tcp://127.0.0.1:9"  # nothing listens: a write there is never acknowledged
        kv_sink = wire.ctx.socket(zmq.ROUTER)  # the forged peers' KV endpoint: nothing is ever written to it
        kv_sink_endpoint = f"tcp://127.0.0.1:{kv_sink.bind_to_random_port('tcp://127.0.0.1')}"

        def task(rid: str, tokens: int = 20, token_ids: list[int] | None = None, dst: list[int] | None = None,
                 peer: str = "fuzz-decode", inbox: str = sink.endpoint, kv: bytes | None = None, lease: float = 5.0,
                 task_params: SamplingParams = params, num_generated: int = 0, skip: int = 0) -> PrefillTask:
            blocks = -(-tokens // layout.block_size)
            return PrefillTask(rid, token_ids or [3 + i % 400 for i in range(tokens)], task_params, num_generated,
                               skip, list(range(blocks)) if dst is None else dst, peer, inbox,
                               meta(peer, real_kv) if kv is None else kv, lease)

        answered = [
            task("fuzz-out-of-range", dst=[10**6, 10**6 + 1]), task("fuzz-repeated", dst=[3, 3]),
            task("fuzz-negative", dst=[-1, 0]), task("fuzz-too-few", dst=[0]),
            task("fuzz-other-peer", kv=meta("fuzz-someone-else", real_kv)),
            task("fuzz-bad-endpoint", kv=meta("fuzz-decode", "garbage")),
            task("fuzz-no-endpoint", kv=meta("fuzz-decode", "tcp://")),
            task("fuzz-other-layout", kv=meta("fuzz-decode", real_kv, msgspec.structs.replace(layout, head_dim=64))),
            task("fuzz-not-zmq", kv=b"\x81\xa4type\xa4nixl"),
            task("fuzz-vocab", token_ids=[10**6] * 20), task("fuzz-skip-all", skip=2),
            task("fuzz-generated", num_generated=20),
            task("fuzz-logit-bias", task_params=SamplingParams(temperature=0, max_tokens=4, logit_bias={10**6: 1.0})),
            task("fuzz-empty", tokens=0, dst=[0]),
            # a real KV write (the prefill worker computes 1000 tokens) into 63 blocks of a decode worker that expects
            # none: the decode worker refuses it, and the prefill worker reports that
            task("fuzz-into-decode-pool", tokens=1000),
            *(task(rid, dst=[0, 1]) for rid in live),  # the live attempts' ids, written again: refused too
            # a write nobody acknowledges: it holds the prefill worker's blocks until its own lease (about 1 s)
            task("fuzz-short-lease", peer="fuzz-decode-nowhere", kv=meta("fuzz-decode-nowhere", nowhere), lease=3.0),
        ]
        never_ending = [  # the decoder drops these: leases that are no positive, bounded number (with NaN, a write
            # nobody acknowledges held the prefill worker's blocks for ever)
            task(f"fuzz-lease-{lease}", peer="fuzz-decode-nowhere", kv=meta("fuzz-decode-nowhere", nowhere),
                 lease=lease) for lease in (float("nan"), float("inf"), 1e12, -1.0, 0.0)]
        unanswerable = [task(f"fuzz-inbox-{i}", kv=b"", inbox=inbox) for i, inbox in enumerate((
            "garbage", "tcp://", "tcp://127.0.0.1", "inproc://commands", "ipc:///tmp/fuzz-inbox", "tcp://" + "a" * 5000,
            "tcp://no-such-host.invalid:9"))]
        prefill_inbox = fz.carrier("inbox", "prefill")[0]
        for t in answered + never_ending + unanswerable:
            prefill_inbox.send([encode(t)])
        refusals = sink.wait_refused([t.request_id for t in answered])
        assert "not expected" in refusals["fuzz-into-decode-pool"], refusals["fuzz-into-decode-pool"]
        assert "names peer" in refusals["fuzz-other-peer"]  # refused before it could re-pair that other peer
        # a flood of distinct forged decode workers, each with an inbox of its own: the prefill worker pairs with each
        # (then refuses the task) and answers each; its sockets stay bounded, not one or two per forgery. The
        # socket to an inbox least recently used goes first (what it still queues then may be lost, as with any
        # unreachable peer): the answers to the latest forgeries all come
        prefill_pid = c.procs["prefill"][0].pid
        fds_before = len(os.listdir(f"/proc/{prefill_pid}/fd"))
        for i in range(FORGED_PEERS):
            prefill_inbox.send([encode(task(f"fuzz-peer-{i}", dst=[], peer=f"fuzz-peer-{i}",
                                            kv=meta(f"fuzz-peer-{i}", kv_sink_endpoint),
                                            inbox=sink.endpoint_variant(i)))])
        sink.wait_refused([f"fuzz-peer-{i}" for i in range(FORGED_PEERS - MAX_PEER_SOCKETS // 2, FORGED_PEERS)],
                          timeout_s=30)
        # a socket to a peer is an eventfd and a TCP connection, and both caches are bounded; evicted sockets close
        # in the background (an inbox's after its linger), so the count settles within a second or so
        bound, deadline = 2 * (MAX_PEER_SOCKETS + MAX_PAIRED_PEERS) + 64, time.monotonic() + 10
        while (fds_grown := len(os.listdir(f"/proc/{prefill_pid}/fd")) - fds_before) > bound:
            assert time.monotonic() < deadline, f"the prefill worker holds {fds_grown} more file descriptors"
            time.sleep(0.2)
        assert not [t.request_id for t in never_ending if t.request_id in sink.answers]

        # fake workers: a wrong layout or model, the wrong socket, absurd sizes, a live worker's id ...
        def heartbeat_from(identity: str, info: WorkerInfo) -> zmq.Socket:
            s = wire.open(zmq.DEALER, c.control_port, identity.encode())
            wire.send(s, [encode(Heartbeat(info, WorkerLoad(total_blocks=info.num_blocks,
                                                            free_blocks=info.num_blocks)))])
            return s

        def answer(s: zmq.Socket) -> Registered:
            frames = wire.recv(s, ANSWER_TIMEOUT_S)
            assert frames is not None, "the router did not answer a registration"
            return msgspec.msgpack.decode(frames[-1], type=Registered)

        real_hash = layout.compat_hash()
        wrong_hash = answer(heartbeat_from("fuzz-layout", fake_info("fuzz-layout", layout_hash="forged")))
        assert not wrong_hash.ok and real_hash in wrong_hash.error  # what a forger learns: the layout checks out
        assert "serves" in answer(heartbeat_from("fuzz-model", fake_info("fuzz-model", model="x",
                                                                          layout_hash=real_hash))).error
        assert not answer(heartbeat_from("fuzz-not-it", fake_info("fuzz-identity", layout_hash=real_hash))).ok
        silent = [heartbeat_from(f"fuzz-absurd-{i}", fake_info(f"fuzz-absurd-{i}", role="mixed", kv_transport="none",
                                                               **absurd))
                  for i, absurd in enumerate((dict(block_size=0), dict(num_blocks=0), dict(num_blocks=-5),
                                              dict(max_model_len=0)))]
        # no answer, and no harm (test_heartbeat_for_a_live_worker_from_another_socket_is_ignored)
        silent += [heartbeat_from(f"fuzz-impostor-{i}", fake_info(victim, layout_hash=real_hash))
                   for i, victim in enumerate(decode_ids + [prefill_id])]
        starting = wire.open(zmq.DEALER, c.control_port, starting_identity("fuzz-starting"))
        wire.send(starting, [encode(Starting("fuzz-starting", "decode"))])
        wire.send(starting, [encode(Starting(decode_ids[0], "decode"))])  # not its identity: ignored
        # ... and a prefill worker the router accepts, with an absurd pool and an inbox that is no endpoint: the next
        # request goes to it, the decode worker cannot reach it, and when the fake is declared dead (it beats once)
        # the request moves to the real prefill worker and completes
        assert answer(heartbeat_from("fuzz-prefill", fake_info("fuzz-prefill", inbox="garbage", layout_hash=real_hash,
                                                               num_blocks=2**62))).ok
        assert all(wire.recv(s, 0.1) is None for s in silent)
        assert [w["worker_id"] for w in c.workers() if w["alive"] and w["pid"] not in harness_pids(c)] == \
            ["fuzz-prefill"]
        detour = "cloud window seven"
        status, _, got = c.post("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": detour}]})
        assert status == 200 and got["choices"][0]["message"]["content"] == offline([detour], GOOD["max_tokens"])[0]
        assert next(w["assigned"] for w in c.workers() if w["worker_id"] == "fuzz-prefill") == 1
        registrations = 3 + len(silent) + 3

        streams.assert_intact(offline)
        count = fz.flush() + len(answered + never_ending + unanswerable) + FORGED_PEERS + registrations
    assert_unharmed(c, baseline, fz.watch, "hostile", count)


def test_worker_messages_from_other_sockets_are_dropped(cluster, baseline, layout, offline):
    """Tokens, rejections and KV-transfer reports count only from a live worker's events socket, about that
    worker's own requests: a stranger, one that borrows a worker's identity, and a fake worker the router accepted
    can neither change a running stream (forged tokens, a forged end, a forged rejection or error for its attempt
    id) nor inflate the metrics."""
    c = cluster
    decode_id = c.alive("decode")[0]["worker_id"]
    with Fuzzing(c, layout, "outputs") as fz:
        wire = fz.wire
        streams = Streams(c, prompts(3, seed=11), STREAM_TOKENS)
        live = streams.attempt_ids()
        fake = fake_info("fuzz-mixed", role="mixed", kv_transport="none", inbox=fz.sink.endpoint)
        control = wire.open(zmq.DEALER, c.control_port, fake.worker_id.encode())
        wire.send(control, [encode(Heartbeat(fake, WorkerLoad(total_blocks=64, free_blocks=64)))])
        assert msgspec.msgpack.decode(wire.recv(control, ANSWER_TIMEOUT_S)[-1], type=Registered).ok
        forged = [Tokens(decode_id, [TokenOutput(rid, [7, 7, 7]) for rid in live]),
                  Tokens(decode_id, [TokenOutput(rid, [7], "stop") for rid in live]),
                  Tokens(decode_id, [TokenOutput(rid, [], "error", "forged", retryable=True) for rid in live]),
                  Tokens(decode_id, [TokenOutput(rid, [], "error", "forged") for rid in live]),
                  *(Rejected(decode_id, rid, "forged") for rid in live)]
        router = fz.carrier("control", "router")[0]  # a stranger's socket, whose sentinel says all was handled
        senders = [router.sock] + [wire.open(zmq.DEALER, c.control_port, identity) for identity in
                                   (events_identity(decode_id), decode_id.encode(), events_identity(fake.worker_id))]
        for sock in senders:
            for msg in forged:
                wire.send(sock, [encode(msg)])
        streams.assert_intact(offline)

        def kv_bytes() -> float:
            return metric_value(c.get("/metrics")[1].decode(), "nano_pd:kv_transfer_bytes_total")

        # after the streams, whose own transfers count: forged reports from the stranger and the borrowed identities
        before = kv_bytes()
        for sock in senders[:3]:
            for msg in (KVTransferred(10**9, 1.0), KVTransferred(-5, 1.0)):
                wire.send(sock, [encode(msg)])
        count = fz.flush() + len(senders) * len(forged) + 3 * 2
        assert kv_bytes() == before
    assert_unharmed(c, baseline, fz.watch, "forged outputs", count)
    assert kv_bytes() > before  # the real prefill worker's report of the good request does count


def test_heartbeat_for_a_live_worker_from_another_socket_is_ignored(cluster):
    victim = cluster.alive("decode")[0]["worker_id"]
    marker = 987654321
    wire = Wire()
    try:
        s = wire.open(zmq.DEALER, cluster.control_port, b"fuzz-impostor")
        seen = False
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and not seen:  # beats faster than the victim's own (every 0.5 s)
            wire.send(s, [encode(Heartbeat(fake_info(victim), WorkerLoad(total_blocks=512, free_blocks=512,
                                                                         num_preemptions=marker)))])
            time.sleep(0.02)
            seen = any(w["load"]["num_preemptions"] == marker for w in cluster.workers())
    finally:
        wire.close()
    assert not seen, "the router took a stranger's heartbeat for a live worker's"


# --- 5. raw TCP -----------------------------------------------------------------------------------------------------
ZMTP_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def raw_payloads(rng: random.Random) -> list[bytes]:
    return [b"", rng.randbytes(1), rng.randbytes(5000), rng.randbytes(HUGE), b"\xff" * 64 + b"GET / HTTP/1.1\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n" + rng.randbytes(300),
            ZMTP_GREETING[:11] + rng.randbytes(300),  # a greeting cut short, then noise
            ZMTP_GREETING + b"\x06" + struct.pack(">Q", 2**62),  # a command frame announcing 4 EiB
            ZMTP_GREETING + b"\x06" + struct.pack(">Q", 64 * 2**20) + rng.randbytes(1000),  # 64 MiB, then it stops
            ZMTP_GREETING + b"\x04\x05READY" + rng.randbytes(200)]


def test_raw_tcp_bytes_on_every_port_crash_nothing(cluster, baseline, layout):
    rng = random.Random(SEED + 5)
    with Fuzzing(cluster, layout, "tcp") as fz:
        connections = []
        for port in fz.ports:
            for payload in raw_payloads(rng):
                raw = socket.create_connection(("127.0.0.1", port.number), timeout=2)
                try:
                    raw.sendall(payload)
                except OSError:
                    pass  # the port hung up on the noise: allowed, and what a careful server does
                connections.append(raw)
        time.sleep(0.3)
        for raw in connections:
            raw.close()
        count = len(connections)
        fz.flush()  # every ZeroMQ port still answers
    assert_unharmed(cluster, baseline, fz.watch, "raw TCP", count)
