"""What the prefill and decode workers share: the sockets to the router and to peers, the heartbeat thread, and
the poll/step loop.

Heartbeats come from a thread of their own, so a long forward pass never makes a live worker look dead (torch
releases the GIL while it computes). That thread owns the worker's identity socket to the router and relays the
router's commands to the main loop over an inproc socket; the main loop owns every other socket, so no ZMQ socket
is ever touched by two threads.

A worker leaves by draining (SIGTERM, SIGINT or the router's Drain): its heartbeats say so at once, so the router
sends it no new work; it finishes what it holds, then exits. At --drain-timeout it exits with the rest, and its
last message (Leaving) has the router move those requests elsewhere, as it moves a dead worker's. A second signal
stops it at once (the router is told the same way). --health-port serves /health and /ready for probes.
"""
from __future__ import annotations

import http.server
import json
import logging
import os
import resource
import signal
import socket
import threading
import time
from typing import Protocol

import msgspec
import zmq

from common.names import served_model_name
from common.cluster.protocol import (Abort, Decoder, Drain, Heartbeat, Leaving, PeerGone, Registered, Starting,
                                     WorkerInfo, WorkerLoad, encode, events_identity, starting_identity,
                                     worth_logging)

HEARTBEAT_INTERVAL_S = 0.5
# PUSH sockets kept open to peers' inboxes: far more than a cluster has workers, far fewer than a ZMQ context's
# 1023 sockets, which forged endpoints would otherwise exhaust
MAX_PEER_SOCKETS = 256
EVICTED_PEER_LINGER_MS = 500
# the context's socket slots: the live peer sockets and the evicted ones still closing, which ZMQ reaps in the
# background (later still on a busy box): a flood of forged endpoints once filled the default 1023 slots with
# evicted sockets before any was reaped, and the next socket() ended the worker
CONTEXT_SOCKETS = 4096
# a socket with one connection holds two descriptors (its mailbox and the TCP connection); the KV transport's
# context has its own 1023 slots. ZMQ aborts the process when it cannot get a descriptor for its internals
OPEN_FILES_WANTED = 2 * (CONTEXT_SOCKETS + 1024) + 1024
# how long what a leaving worker still queues (its last tokens, PrefillDone to peers, Leaving) may take to go out:
# its sockets otherwise drop unsent messages on close (LINGER 0), and a drained request lost its last tokens
FLUSH_ON_EXIT_MS = 1000
# a drained worker stays this long holding nothing before it leaves: work the router sent before it heard of the
# drain still arrives (and is done), peers finish the hand-offs it made, and a beat reports its final load
DRAIN_SETTLE_S = 2 * HEARTBEAT_INTERVAL_S
log = logging.getLogger("nano_pd.worker")


def raise_open_files_limit(wanted: int = OPEN_FILES_WANTED):
    """Lift the soft limit on open descriptors towards `wanted` (as far as the hard limit allows): a common default
    of 1024 is below what the socket bounds above let the peer sockets take."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def make_worker_id(args, role: str) -> str:
    """Unique per process incarnation: a restarted worker is a new worker."""
    return f"{args.name or role}-{socket.gethostname()}-{os.getpid()}"


class announce_starting:
    """While the with-block runs (imports, model load, warm-up), tell the router every heartbeat interval that
    this worker is on its way, so a request waiting for its role waits for it instead of failing at
    --migrate-wait. Torch-free: it starts before the worker imports torch."""

    def __init__(self, args, role: str):
        self.worker_id = make_worker_id(args, role)
        self.msg = encode(Starting(self.worker_id, role))
        self.endpoint = "tcp://" + args.router
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="announce")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(timeout=2)

    def _run(self):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, starting_identity(self.worker_id))
        sock.connect(self.endpoint)
        try:
            while True:
                try:
                    sock.send(self.msg, zmq.NOBLOCK)
                except zmq.Again:
                    pass  # no router yet: the next beat tries again
                if self._done.wait(HEARTBEAT_INTERVAL_S):
                    return
        finally:
            sock.close()
            ctx.term()


class Role(Protocol):
    """What a worker role plugs into WorkerRuntime.serve."""

    def on_command(self, cmd) -> None: ...
    def on_message(self, msg) -> None: ...
    def request_ids(self) -> list[str]: ...  # every request this worker holds (running, queued, reserved)
    def transfers_in_flight(self) -> bool: ...
    def step(self) -> None: ...
    def close(self) -> None: ...


class WorkerRuntime:
    def __init__(self, role: str, args, engine, commands, inbox):
        """engine: the LLMEngine this worker runs (built by the role, so this module needs no torch).
        commands / inbox: the message types (a union) this role accepts from the router / from peers; anything
        else on those sockets is dropped by the strict decoders, so a role never sees another role's messages."""
        self.role, self.args, self.engine = role, args, engine
        self.model_name = args.served_model_name or served_model_name(args.model)
        self.worker_id = make_worker_id(args, role)
        self.advertise_host = args.advertise_host or args.host
        self.router_endpoint = "tcp://" + args.router
        raise_open_files_limit()
        self.ctx = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, CONTEXT_SOCKETS)
        self.inbox = self._socket(zmq.PULL)
        self.inbox_endpoint = f"tcp://{self.advertise_host}:{self.inbox.bind_to_random_port('tcp://' + args.host)}"
        self.events = self._socket(zmq.DEALER)  # Tokens / Rejected up to the router
        self.events.setsockopt(zmq.IDENTITY, events_identity(self.worker_id))
        self.events.connect(self.router_endpoint)
        self.commands = self._socket(zmq.PULL)
        self.commands.bind("inproc://commands")
        self._wake_heartbeat = self._socket(zmq.PUSH)  # a beat now, not at the next interval (a drain began)
        self._wake_heartbeat.bind("inproc://wake-heartbeat")
        self._peers: dict[str, zmq.Socket] = {}  # inbox endpoint -> PUSH, least recently used first
        self.num_bad_peer_endpoints = 0
        self._poller = zmq.Poller()
        self._poller.register(self.commands, zmq.POLLIN)
        self._poller.register(self.inbox, zmq.POLLIN)
        self._command_decoder = Decoder(commands | Registered | Drain, "router commands")
        self._peer_decoder = Decoder(inbox, "worker inbox")
        self.stopping = False
        self.drain_timeout_s = args.drain_timeout
        self.draining = False
        self._drain_asked = ""  # set by a signal handler (which must not touch sockets), acted on by the main loop
        self._drain_deadline = 0.0
        self._holding_nothing_since: float | None = None
        self._leaving_reason = "stopped"
        self._health_server: http.server.ThreadingHTTPServer | None = None
        self.registrations = 0  # routers that accepted this worker: a second one means the router restarted
        self.info: WorkerInfo | None = None
        self._thread: threading.Thread | None = None

    def _socket(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        return s

    def transport_options(self) -> dict:
        """make_transport's arguments for this worker: the pools a hand-off reads or writes (with tensor parallelism,
        rank 0's full-head exchange pool) and the addresses peers use."""
        runner = self.engine.runner
        return dict(name=self.worker_id, pool=runner.kv.exchange_pool, state_pool=runner.kv.state_pool,
                    model_name=self.model_name, host=self.args.host, advertise_host=self.advertise_host)

    def start(self, kv_transport: str, kv_layout_hash: str, load_fn):
        """Register with the router (first heartbeat) and keep heartbeating load_fn() until stop()."""
        cfg = self.engine.config
        self.info = WorkerInfo(
            worker_id=self.worker_id, role=self.role, model=self.model_name, inbox=self.inbox_endpoint,
            kv_transport=kv_transport, kv_layout_hash=kv_layout_hash, block_size=cfg.block_size,
            num_blocks=self.engine.block_manager.num_blocks, max_model_len=cfg.max_model_len,
            host=self.advertise_host, pid=os.getpid(), weights=f"{cfg.dtype}, {cfg.quantization}")
        self._thread = threading.Thread(target=self._control_loop, args=(load_fn,), daemon=True, name="heartbeat")
        self._thread.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        if self.args.health_port:
            self._start_health_server(self.args.health_port)
        log.info("%s started: inbox %s, router %s, %d KV blocks, transport %s, weights %s", self.worker_id,
                 self.inbox_endpoint, self.router_endpoint, self.info.num_blocks, kv_transport, self.info.weights)

    def engine_load(self, **extra) -> WorkerLoad:
        s = self.engine.stats()
        return WorkerLoad(**{"num_running": s["num_running"], "num_waiting": s["num_waiting"],
                             "free_blocks": s["free_blocks"], "total_blocks": s["total_blocks"],
                             "prefix_cache_queries": s["prefix_cache_queries"],
                             "prefix_cache_hits": s["prefix_cache_hit_tokens"],
                             "num_preemptions": s["num_preemptions"], "spec_draft_tokens": s["spec_draft_tokens"],
                             "spec_accepted_tokens": s["spec_accepted_tokens"],
                             "spec_verify_steps": s["spec_verify_steps"],
                             "queued_prompt_tokens": s["queued_prompt_tokens"],
                             "prefill_tokens": s["num_prefill_tokens_computed"],
                             "prefill_seconds": s["prefill_seconds"], **extra})

    def _control_loop(self, load_fn):
        control = self._socket(zmq.DEALER)
        control.setsockopt(zmq.IDENTITY, self.worker_id.encode())
        control.connect(self.router_endpoint)
        relay = self._socket(zmq.PUSH)
        relay.connect("inproc://commands")
        wake = self._socket(zmq.PULL)
        wake.connect("inproc://wake-heartbeat")
        poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        next_beat = time.monotonic()
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= next_beat:
                    try:
                        control.send(encode(Heartbeat(self.info, load_fn(), self.draining)), zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # router unreachable and our queue full: later beats will tell it
                    next_beat = now + HEARTBEAT_INTERVAL_S
                ready = dict(poller.poll(max(1, int((next_beat - now) * 1000))))
                if control in ready:
                    relay.send(control.recv())
                if wake in ready:
                    wake.recv()
                    next_beat = time.monotonic()
        except zmq.ContextTerminated:
            pass
        except Exception:  # a worker that cannot heartbeat would be declared dead anyway: stop it visibly
            log.exception("heartbeat thread failed; stopping the worker")
            self.stopping = True
        finally:
            control.close()
            relay.close()
            wake.close()

    def serve(self, role: "Role"):
        """The one worker loop: router commands and peer messages in, then the role's step, until stop(); the
        loop waits for input only while the engine has nothing to run, and briefly while KV is on its way (NIXL
        progresses only when polled)."""
        try:
            while not self.stopping:
                if self._drain_asked and not self.draining:
                    self.begin_drain(self._drain_asked)
                idle_ms = 0 if self.engine.has_unfinished() else 1 if role.transfers_in_flight() else 20
                registrations = self.registrations
                commands, messages = self.poll(idle_ms)
                if registrations and self.registrations > registrations:
                    # a restarted router knows none of the requests the dead one gave us, and their clients are
                    # gone with it: free what they hold instead of computing for nobody
                    held = role.request_ids()
                    log.warning("registered with a new router: dropping %d requests of the previous one", len(held))
                    role.on_command(Abort(held))
                for cmd in commands:
                    role.on_command(cmd)
                for msg in messages:
                    role.on_message(msg)
                role.step()
                if self.draining and self._may_leave(role):
                    break
        finally:
            role.close()
            self.close()

    def poll(self, timeout_ms: int) -> tuple[list, list]:
        """Router commands and peer messages that arrived (waiting up to timeout_ms for the first), decoded. The
        router's answer to registration is handled here: a refusal ends the worker (exit status 2)."""
        commands, peer_messages = [], []
        if not self._poller.poll(timeout_ms):
            return commands, peer_messages
        for sock, decoder, out in ((self.commands, self._command_decoder, commands),
                                   (self.inbox, self._peer_decoder, peer_messages)):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg = decoder.decode(frames[-1]) if len(frames) == 1 else None
                if isinstance(msg, Registered):
                    if not msg.ok:
                        log.error("the router refused this worker: %s", msg.error)
                        raise SystemExit(2)
                    self.registrations += 1
                elif isinstance(msg, Drain):
                    self.begin_drain("the router's drain command")
                elif msg is not None:
                    if isinstance(msg, PeerGone):  # every role: the role drops the work, the runtime the socket
                        self.forget_peer(msg.inbox)
                    out.append(msg)
                elif len(frames) != 1:  # counted and logged like undecodable ones: a flood must not flood the log
                    decoder.num_dropped += 1
                    if worth_logging(decoder.num_dropped):
                        log.warning("dropped a %d-frame message on %s (%d so far)", len(frames), decoder.where,
                                    decoder.num_dropped)
        return commands, peer_messages

    def send_router(self, msg: msgspec.Struct):
        try:
            self.events.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            log.error("router unreachable; dropped a %s message", type(msg).__name__)

    def send_peer(self, endpoint: str, msg: msgspec.Struct):
        # the endpoint comes off the wire (a PrefillTask's decode_inbox, an Admit's prefill_inbox), so anyone who
        # reaches our inbox names it: a malformed one made connect() raise out of the main loop (the worker died),
        # and one socket kept per distinct endpoint ran the context out of sockets (1023) after as many forgeries
        sock = self._peers.pop(endpoint, None)
        if sock is None:
            if not endpoint.startswith("tcp://"):  # peers' inboxes are tcp; inproc:// would reach our own sockets
                return self._dropped_peer_message(endpoint, msg, "not a tcp endpoint")
            try:
                sock = self._socket(zmq.PUSH)
            except zmq.ZMQError as e:  # the context is out of sockets (or the process out of descriptors)
                return self._dropped_peer_message(endpoint, msg, str(e)[:100])
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as e:
                sock.close()
                return self._dropped_peer_message(endpoint, msg, str(e)[:100])
            while len(self._peers) >= MAX_PEER_SOCKETS:  # the least recently used goes (a live peer reconnects)
                # what it still queues gets half a second to go out, in the background (close does not wait)
                self._peers.pop(next(iter(self._peers))).close(linger=EVICTED_PEER_LINGER_MS)
        self._peers[endpoint] = sock  # the most recently used last
        try:
            sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            # the peer is gone or far behind; the request's lease turns this into a retry, never a hang
            log.warning("peer %s not reachable; dropped a %s message", endpoint, type(msg).__name__)

    def _dropped_peer_message(self, endpoint: str, msg: msgspec.Struct, why: str):
        self.num_bad_peer_endpoints += 1
        if worth_logging(self.num_bad_peer_endpoints):
            log.warning("dropped a %s message to the bad endpoint %.100r (%s; %d so far)", type(msg).__name__,
                        endpoint, why, self.num_bad_peer_endpoints)

    def forget_peer(self, endpoint: str):
        sock = self._peers.pop(endpoint, None)
        if sock is not None:
            sock.close()

    # --- leaving --------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame):
        if self.draining or self._drain_asked:  # the second signal: the operator wants it gone now
            self._leaving_reason = f"stopped by a second {signal.Signals(signum).name} during its drain"
            self.stop()
        else:
            self._drain_asked = signal.Signals(signum).name

    def begin_drain(self, why: str):
        """Take no new work from now on, and say so in a heartbeat now; serve leaves once nothing is held or at
        the drain deadline."""
        if self.draining:
            return
        self.draining = True
        self._drain_deadline = time.monotonic() + self.drain_timeout_s
        log.info("draining (%s): finishing what this worker holds, for at most %g s", why, self.drain_timeout_s)
        try:
            self._wake_heartbeat.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # no heartbeat thread (yet): the first beat carries the flag

    def _may_leave(self, role: "Role") -> bool:
        """Whether a draining worker leaves now: it holds nothing more, or its time is up (the router then moves
        what it still holds, as it moves a dead worker's requests)."""
        held, now = role.request_ids(), time.monotonic()
        if held or role.transfers_in_flight():
            self._holding_nothing_since = None
            if now < self._drain_deadline:
                return False
            self._leaving_reason = f"drain timeout ({self.drain_timeout_s:g} s) with {len(held)} requests held"
            log.warning("drain timed out: handing %d requests back to the router", len(held))
        else:
            if self._holding_nothing_since is None:
                self._holding_nothing_since = now
            if now - self._holding_nothing_since < DRAIN_SETTLE_S and now < self._drain_deadline:
                return False
            self._leaving_reason = "drained"
        log.info("leaving the cluster: %s", self._leaving_reason)
        return True

    def _start_health_server(self, port: int):
        """GET /health: 200 while the heartbeat thread runs; GET /ready: 200 only while a router has accepted this
        worker and it takes new work (not draining). Served by a daemon thread; the stdlib is enough for a probe."""
        runtime = self

        class Probe(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                status, answer = runtime.probe(self.path)
                body = json.dumps({"status": answer}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_):  # a probe every few seconds would flood the worker's log
                pass

        self._health_server = http.server.ThreadingHTTPServer((self.args.host, port), Probe)
        self._health_server.daemon_threads = True
        threading.Thread(target=self._health_server.serve_forever, daemon=True, name="health").start()
        log.info("probes on http://%s:%d/health and /ready", self.args.host, port)

    def probe(self, path: str) -> tuple[int, str]:
        """(HTTP status, what it says) of the probe at path."""
        alive = self._thread is not None and self._thread.is_alive() and not self.stopping
        if path not in ("/health", "/ready"):
            return 404, "not found"
        if not alive:
            return 503, "stopping"
        if path == "/health":
            return 200, "ok"
        if self.draining:
            return 503, "draining"
        return (200, "ready") if self.registrations else (503, "not registered")

    def stop(self):
        self.stopping = True

    def close(self):
        self.stopping = True
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._health_server is not None:
            self._health_server.shutdown()
            self._health_server.server_close()
        if self.info is not None:  # it registered (start): the router hears why it goes, after its last tokens
            self.send_router(Leaving(self.worker_id, self._leaving_reason))
        for s in (*self._peers.values(), self.events):
            s.close(linger=FLUSH_ON_EXIT_MS)
        for s in (self.inbox, self.commands, self._wake_heartbeat):
            s.close()
        self.ctx.term()
        self.engine.close()
