"""Each request's life across workers: the control socket, dispatch, migration, rejection, outputs, abort, n > 1.

A request is sent as an *attempt* (id "<request id>#<n>") to one decode worker, naming the prefill worker that
will fill its KV, or to a mixed worker, which computes the prompt itself. Messages about an older attempt are
ignored, so when a worker dies the router can simply start a new attempt elsewhere with the prompt plus the
tokens already streamed: the client's stream continues. Who the
workers are and whether they live is router.registry's; which of them an attempt goes to, router.routing's.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import msgspec
import zmq
import zmq.asyncio

from common.block_hash import block_hashes
from common.cluster.protocol import (MIXED, PREFILL, Abort, Admit, Decoder, Drain, Heartbeat, KVTransferred, Leaving,
                                     PeerGone, Rejected, RouterInbound, Starting, TokenOutput, Tokens, encode,
                                     worth_logging)
from common.sampling_params import SamplingParams
from router import routing
from router.registry import Worker, WorkerRegistry

log = logging.getLogger("nano_pd.router")

MAX_ATTEMPTS = 5  # a request that lost this many workers fails instead of chasing the cluster forever
RETRY_AFTER_S = 1  # what a 429 tells the client to wait: queues drain at the cluster's pace, seconds not minutes
READMIT_BACKOFF_S = (0.05, 1.0)  # first and longest pause between rounds of asking full decode workers again


class ClusterError(Exception):
    """The cluster cannot serve the request (no live worker of a role, too many failures): a 503, or the status
    given (429: overloaded, retry after RETRY_AFTER_S; 400: a request no worker could be sent)."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class RequestState:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    events: asyncio.Queue  # ("tokens", [ids], finish_reason | None, logprobs | None) or ("error", message, status)
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    attempt: int = 0
    decode: Worker | None = None
    prefill: Worker | None = None
    in_prefill: bool = True
    done: bool = False
    num_cached_tokens: int = 0
    # speculative tokens proposed for / accepted in this request, summed over its attempts (a migration restarts
    # the counts on the new worker)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    rejected_by: set[str] = dataclasses.field(default_factory=set)
    full_rounds: int = 0  # times every decode worker refused this attempt (each round waits longer)
    # requests (the other choices of an n > 1 request) dispatched once this one's prompt KV exists, to the same
    # workers, so they reuse its prompt blocks from both prefix caches instead of computing them again
    followers: list["RequestState"] = dataclasses.field(default_factory=list)
    preferred: tuple[Worker | None, Worker | None] = (None, None)  # (decode, prefill) to use when alive

    @property
    def attempt_id(self) -> str:
        return f"{self.request_id}#{self.attempt}"


class Cluster:
    def __init__(self, model_name: str, control_host: str, control_port: int, heartbeat_timeout_s: float = 2.0,
                 migrate_wait_s: float = 10.0, admit_timeout_s: float = 60.0, request_timeout_s: float = 600.0,
                 max_queued_requests: int = 1024, metrics=None):
        self.registry = WorkerRegistry(model_name, heartbeat_timeout_s)
        self.endpoint = f"tcp://{control_host}:{control_port}"
        self.migrate_wait_s = migrate_wait_s
        self.request_timeout_s = request_timeout_s
        self.admit_timeout_s = admit_timeout_s
        self.max_queued_requests = max_queued_requests
        self.metrics = metrics
        self.requests: dict[str, RequestState] = {}  # by attempt id
        # ids of the requests that have no token yet (waiting for a worker's room, queued there, or in prefill):
        # the queue that grows when the cluster is overloaded, so the one that is bounded
        self.queued: set[str] = set()
        if metrics is not None:
            metrics.watch(self.registry)
            metrics.queued.set_function(lambda: len(self.queued))
        self._decoder = Decoder(RouterInbound, "router control socket")
        self.num_dropped_unknown = 0  # worker messages from sockets of no live worker
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle ------------------------------------------------------------------------------------------
    async def start(self):
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished worker raises instead of vanishing
        self._sock.bind(self.endpoint)
        self._tasks = [asyncio.create_task(self._receive_loop()),
                       asyncio.create_task(self.registry.monitor(self._declare_dead))]
        log.info("control endpoint %s", self.endpoint)

    async def stop(self):
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._sock.close()
        self._ctx.term()

    # --- the control socket ---------------------------------------------------------------------------------
    async def _receive_loop(self):
        while True:
            frames = await self._sock.recv_multipart()
            try:  # one bad message must never take the router down (decoding included)
                msg = self._decoder.decode(frames[-1]) if len(frames) == 2 else None
                if msg is None:
                    continue
                if isinstance(msg, Heartbeat):
                    reply = self.registry.heartbeat(frames[0], msg)
                    if reply is not None:
                        await self._reply(frames[0], reply)
                    continue
                if isinstance(msg, Starting):
                    self.registry.note_starting(frames[0], msg)
                    continue
                # the rest only from a live worker's events socket, and about that worker's own requests
                sender = self.registry.sender(frames[0])
                if sender is None:
                    self._dropped_unknown_sender(type(msg).__name__)
                elif isinstance(msg, Tokens):
                    for out in msg.outputs:
                        await self._on_output(out, sender)
                elif isinstance(msg, Rejected):
                    await self._on_rejected(msg, sender)
                elif isinstance(msg, Leaving):  # after its last tokens: what it still holds moves now
                    await self._declare_dead(sender, f"it left ({msg.reason[:200]})", died=False)
                elif isinstance(msg, KVTransferred) and self.metrics:
                    self.metrics.kv_transfer_bytes.inc(msg.num_bytes)
                    self.metrics.kv_transfer_seconds.observe(msg.seconds)
            except Exception:
                log.exception("error handling a message of %d bytes", len(frames[-1]))

    def _dropped_unknown_sender(self, what: str):
        self.num_dropped_unknown += 1
        if worth_logging(self.num_dropped_unknown):
            log.warning("dropped a %s message from a socket that is no live worker's (%d so far)", what,
                        self.num_dropped_unknown)

    async def _send(self, worker: Worker, msg: msgspec.Struct) -> bool:
        return await self._send_encoded(worker, encode(msg))

    async def _send_encoded(self, worker: Worker, data: bytes) -> bool:
        try:
            await self._sock.send_multipart([worker.worker_id.encode(), data])
            return True
        except zmq.ZMQError as e:
            log.warning("cannot reach %s (%s)", worker.worker_id, e)
            return False

    async def _reply(self, identity: bytes, msg: msgspec.Struct):
        try:
            await self._sock.send_multipart([identity, encode(msg)])
        except zmq.ZMQError:
            pass

    async def _declare_dead(self, worker: Worker, why: str, died: bool = True):
        """worker is gone (died: not by leaving): its peers drop what waits on it, and its requests move."""
        if not self.registry.mark_dead(worker):
            return
        log.log(logging.WARNING if died or worker.inflight else logging.INFO, "worker %s is %s: %s; moving its %d "
                "requests", worker.worker_id, "dead" if died else "gone", why, len(worker.inflight))
        if self.metrics and died:
            self.metrics.worker_deaths.labels(role=worker.info.role).inc()
        for other in [w for w in self.registry.workers.values() if w.alive]:
            await self._send(other, PeerGone(worker.worker_id, worker.info.inbox))
        for req in [r for r in self.requests.values() if r.decode is worker or (r.in_prefill and r.prefill is worker)]:
            asyncio.create_task(self._reissue(req, f"{worker.info.role} worker {worker.worker_id} "
                                                   f"{'died' if died else 'left'}"))

    async def drain(self, worker: Worker):
        """Send worker no new work from now on and ask it to drain (finish what it holds, then leave)."""
        worker.draining = True
        if not await self._send(worker, Drain()):
            await self._declare_dead(worker, "its control socket is gone")

    # --- requests -------------------------------------------------------------------------------------------
    def _keep_waiting(self, since: float) -> bool:
        """Whether a request waiting for workers since `since` waits on: for migrate_wait_s, and beyond while a
        worker announces that it is loading (a restart the supervisor made), up to the request's own timeout."""
        waited = time.monotonic() - since
        if waited < self.migrate_wait_s:
            return True
        return waited < self.request_timeout_s and bool(self.registry.starting_roles())

    async def wait_until_healthy(self):
        """Return once the cluster can serve a request; one still starting (or restarting its only worker of a
        role) gets the time _keep_waiting gives, then a ClusterError says what is missing."""
        since = time.monotonic()
        while not self.registry.healthy:
            if not self._keep_waiting(since):
                raise ClusterError(self.registry.missing_roles())
            await asyncio.sleep(0.1)

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestState:
        """Dispatch a new request; a ClusterError (429) at once when max_queued_requests already wait for their
        first token: an overloaded cluster says so in milliseconds instead of queuing without bound."""
        if len(self.queued) >= self.max_queued_requests:
            raise ClusterError(f"the cluster is overloaded ({len(self.queued)} requests are waiting for their first "
                               f"token, the limit); retry after {RETRY_AFTER_S} s", status=429)
        req = RequestState(request_id, prompt_ids, params, asyncio.Queue())
        self.queued.add(request_id)
        try:
            await self._dispatch(req, wait=True)
        except BaseException:
            self.queued.discard(request_id)
            raise
        return req

    def fork(self, parent: RequestState, request_id: str, params: SamplingParams) -> RequestState:
        """Another choice of parent's prompt: dispatched when parent's first token arrives (or it ends)."""
        req = RequestState(request_id, parent.prompt_ids, params, asyncio.Queue())
        parent.followers.append(req)
        self.queued.add(request_id)
        return req

    def _release_followers(self, req: RequestState):
        followers, req.followers = req.followers, []
        for f in followers:
            f.preferred = (req.decode, req.prefill)
            asyncio.create_task(self._dispatch_or_fail(f))

    async def _dispatch_or_fail(self, req: RequestState):
        if req.done:  # aborted (the client left) before its turn came
            return
        try:
            await self._dispatch(req, wait=True)
        except ClusterError as e:
            self._fail(req, str(e), e.status)

    def _route(self, req: RequestState) -> tuple[Worker | None, Worker | None]:
        """(decode or mixed worker, prefill worker: None for a mixed one) for req's current attempt; a follower's
        first attempt goes to its leader's workers while they live."""
        decode, prefill = req.preferred if req.attempt == 0 else (None, None)
        tokens = req.prompt_ids + req.output_ids
        if decode is None or not decode.takes_work:
            decode = routing.pick_decode(self.registry.decoders(), req.rejected_by, tokens)
        if decode is None or decode.info.role == MIXED:
            return decode, None
        if prefill is None or not prefill.takes_work:
            prefill, _ = routing.pick_prefill(self.registry.routable(PREFILL), tokens)
        return decode, prefill

    async def _dispatch(self, req: RequestState, wait: bool):
        """Send req's current attempt to a decode worker (with a prefill worker) or a mixed one; with wait, as long
        as _keep_waiting says for live workers to join."""
        since = time.monotonic()
        while True:
            decode, prefill = self._route(req)
            if decode is not None and (prefill is not None or decode.info.role == MIXED):
                break
            if not wait or not self._keep_waiting(since):
                raise ClusterError(self.registry.missing_roles())
            await asyncio.sleep(0.1)
        tokens = req.prompt_ids + req.output_ids
        # built before anything is registered, so a request that cannot be encoded leaves nothing behind
        try:
            admit = encode(Admit(req.attempt_id, tokens, req.params, prefill.worker_id if prefill else "",
                                 prefill.info.inbox if prefill else "", len(req.output_ids)))
        except (OverflowError, msgspec.EncodeError) as e:  # the API checks ranges; this is the last line
            raise ClusterError(f"the request cannot be sent to a worker: {e}", status=400) from None
        req.decode, req.prefill, req.in_prefill = decode, prefill, True
        self.requests[req.attempt_id] = req
        computes_prompt = prefill or decode
        for worker in (decode, prefill) if prefill else (decode,):
            worker.inflight.add(req.attempt_id)
            worker.assigned += 1
        routing.remember_prefix(computes_prompt, block_hashes(tokens, computes_prompt.info.block_size))
        if not await self._send_encoded(decode, admit):
            await self._declare_dead(decode, "its control socket is gone")

    def _detach(self, req: RequestState):
        self.requests.pop(req.attempt_id, None)
        for worker in (req.decode, req.prefill):
            if worker is not None:
                worker.inflight.discard(req.attempt_id)

    async def _reissue(self, req: RequestState, why: str):
        if req.done:
            return
        self._detach(req)
        req.attempt += 1
        req.rejected_by.clear()
        if self.metrics:
            self.metrics.migrations.inc()
        if req.attempt >= MAX_ATTEMPTS:
            return self._fail(req, f"request failed after {req.attempt} attempts; last: {why}")
        log.info("re-issuing %s with %d tokens already streamed (%s)", req.request_id, len(req.output_ids), why)
        try:
            await self._dispatch(req, wait=True)
        except ClusterError as e:
            self._fail(req, f"{why}, and the request could not move: {e}", e.status)

    async def _on_rejected(self, msg: Rejected, sender: Worker):
        req = self.requests.get(msg.request_id)
        if req is None or req.done or req.decode is not sender:
            return
        self._detach(req)
        req.rejected_by.add(sender.worker_id)
        asyncio.create_task(self._readmit(req))

    async def _readmit(self, req: RequestState):
        if len(req.rejected_by) >= len(self.registry.decoders()):  # everyone is full: wait, then ask again
            if time.monotonic() - req.arrival > self.admit_timeout_s:
                return self._fail(req, f"every decode worker stayed full for {self.admit_timeout_s:g} s; retry "
                                       f"after {RETRY_AFTER_S} s", status=429)
            req.rejected_by.clear()
            # longer each round: hundreds of waiting requests must not ask full workers thousands of times a second
            first, longest = READMIT_BACKOFF_S
            await asyncio.sleep(min(longest, first * 2 ** req.full_rounds))
            req.full_rounds += 1
        if req.done:
            return
        try:
            await self._dispatch(req, wait=False)
        except ClusterError as e:
            self._fail(req, str(e), e.status)

    async def _on_output(self, out: TokenOutput, sender: Worker):
        req = self.requests.get(out.request_id)
        if req is None or req.done or req.decode is not sender:
            return  # an older attempt, an aborted request, or not the sender's: the current attempt speaks for it
        if out.error is not None:
            if out.retryable:  # in a task: re-issuing may wait for workers, and this loop must keep receiving
                asyncio.create_task(self._reissue(req, out.error))
                return
            return self._fail(req, out.error, status=400)
        if req.in_prefill:
            req.in_prefill = False
            self.queued.discard(req.request_id)
            if req.prefill is not None:
                req.prefill.inflight.discard(req.attempt_id)
            if out.local_prefill and self.metrics:
                self.metrics.local_prefills.labels(role=req.decode.info.role).inc()
            if not req.output_ids:  # the prefill of the client's prompt, not of a migration
                req.num_cached_tokens = max(out.num_cached_tokens, 0)
            self._release_followers(req)
        req.output_ids.extend(out.token_ids)
        req.num_draft_tokens += out.num_draft_tokens
        req.num_accepted_tokens += out.num_accepted_tokens
        if out.finish_reason is not None:
            req.done = True
            self._detach(req)
        req.events.put_nowait(("tokens", out.token_ids, out.finish_reason, out.logprobs))

    def _fail(self, req: RequestState, message: str, status: int = 503):
        req.done = True
        self._detach(req)
        self.queued.discard(req.request_id)
        self._release_followers(req)
        req.events.put_nowait(("error", message, status))

    async def abort(self, req: RequestState):
        """The client went away or a stop string matched: free the request's resources everywhere."""
        if req.done:
            return
        req.done = True
        self._detach(req)
        self.queued.discard(req.request_id)
        self._release_followers(req)
        abort = Abort([req.attempt_id])
        for worker in (req.decode, req.prefill if req.in_prefill else None):
            if worker is not None and worker.alive:
                await self._send(worker, abort)
