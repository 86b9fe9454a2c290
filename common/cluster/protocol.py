"""Every control message that crosses a process boundary, as msgspec structs (never pickle).

Sockets (all ZeroMQ):
  router  ROUTER  <- worker DEALER "control" (identity = worker id): Heartbeat up; Registered/Admit/Abort/PeerGone/
                     Drain down
          ROUTER  <- worker DEALER "starting" (identity = starting_identity(worker id)): Starting, while it loads
          ROUTER  <- worker DEALER "events" (identity = events_identity(worker id)): Tokens, Rejected (decode),
                     KVTransferred (prefill), Leaving (last); the router takes them only from registered, live
                     workers
  worker  PULL "inbox" <- peers' PUSH: PrefillTask (decode -> prefill), PrefillDone (prefill -> decode)

Each socket has one decoder for the union of what may arrive on it; anything else is dropped and logged.
"""
from __future__ import annotations

import logging
from typing import Annotated

import msgspec

from common.sampling_params import SamplingParams

log = logging.getLogger("nano_pd.protocol")

MAX_LEASE_S = 86400.0  # the longest KV lease a PrefillTask may carry (--kv-lease is 60 s by default)
PREFILL, DECODE, MIXED = "prefill", "decode", "mixed"  # a mixed worker prefills and decodes its own requests
ROLES = (PREFILL, DECODE, MIXED)


class WorkerInfo(msgspec.Struct, frozen=True):
    worker_id: str  # unique per process incarnation: a restarted worker is a new worker
    role: str  # PREFILL | DECODE | MIXED
    model: str  # served model name; the router refuses workers of another model
    inbox: str  # tcp endpoint of the worker's PULL socket
    kv_transport: str  # "nixl" | "zmq": prefill and decode workers must agree ("none": a mixed worker)
    kv_layout_hash: str  # KVLayout.compat_hash(): prefill and decode workers must agree ("" for a mixed worker)
    # positive, or the router divided by zero routing to a worker that registered with block_size 0 (and failed
    # every request while it lived): the numbers come off the wire, from anyone who can reach the control port
    block_size: Annotated[int, msgspec.Meta(ge=1)]
    num_blocks: Annotated[int, msgspec.Meta(ge=1)]
    max_model_len: Annotated[int, msgspec.Meta(ge=1)]
    host: str = ""
    pid: int = 0
    # what the worker computes with, e.g. "bfloat16, int4": P and D may differ (the KV layout does not depend on
    # the weights), so this is shown on /cluster, never checked
    weights: str = ""


class WorkerLoad(msgspec.Struct, array_like=True):
    num_running: int = 0
    num_waiting: int = 0  # prefill: queued tasks; decode: admissions waiting for blocks or KV
    free_blocks: int = 0
    total_blocks: int = 0
    prefix_cache_queries: int = 0  # cumulative prompt tokens looked up
    prefix_cache_hits: int = 0  # cumulative tokens found
    num_preemptions: int = 0
    kv_bytes_sent: int = 0  # cumulative (prefill side)
    requests_done: int = 0  # cumulative requests this worker completed its part of
    spec_draft_tokens: int = 0  # cumulative speculative tokens proposed (decode)
    spec_accepted_tokens: int = 0  # of which accepted
    spec_verify_steps: int = 0  # cumulative forward passes that verified drafts
    # the autoscaling signals (router.metrics pool_signals): prompt tokens waiting to be computed here (queued or
    # part-way through a chunked prefill), and the cumulative prompt tokens computed and the seconds of the steps
    # that computed them (their ratio: this worker's measured prefill speed)
    queued_prompt_tokens: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0


# --- worker -> router ------------------------------------------------------------------------------------------
class Heartbeat(msgspec.Struct, tag="heartbeat"):
    """Sent every HEARTBEAT_INTERVAL_S; the first one registers the worker (so a restarted router relearns all)."""
    info: WorkerInfo
    load: WorkerLoad
    # the worker takes no new work (SIGTERM or Drain): it finishes what it holds, then leaves. In every beat, so a
    # restarted router learns it too; a default, so a worker that predates draining still registers
    draining: bool = False


class Starting(msgspec.Struct, tag="starting"):
    """Sent while a worker loads, before its first heartbeat (from starting_identity(worker id)): a worker of this
    role is on its way, so requests waiting for one may wait longer, up to their own timeout."""
    worker_id: str
    role: str


class TokenOutput(msgspec.Struct, array_like=True):
    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None
    retryable: bool = False  # the error is the cluster's (a peer vanished, a lease ran out), not the request's
    num_cached_tokens: int = -1  # set on a request's first output: prompt tokens the prefill cache served
    logprobs: list[dict[int, float]] | None = None  # one entry per token id, when the request asked for them
    # set on a request's last output: speculative tokens proposed for it on this worker, and how many were kept
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    local_prefill: bool = False  # set on a request's first output: the decode worker computed the prompt itself


class Tokens(msgspec.Struct, tag="tokens"):
    worker_id: str
    outputs: list[TokenOutput]


class Leaving(msgspec.Struct, tag="leaving"):
    """A worker's last message, after its last output on the same socket: it exits now, so the router moves what
    it still holds (a drain that ran out of time, a forced stop) at once instead of after a heartbeat timeout."""
    worker_id: str
    reason: str


class KVTransferred(msgspec.Struct, tag="kv_transferred"):
    """Prefill worker -> router, for the metrics: one request's KV push completed."""
    num_bytes: Annotated[int, msgspec.Meta(ge=0)]
    seconds: Annotated[float, msgspec.Meta(ge=0)]


class Rejected(msgspec.Struct, tag="rejected"):
    """A decode worker will not admit the request now (it is full); the router tries another."""
    worker_id: str
    request_id: str
    reason: str


# --- router -> worker ------------------------------------------------------------------------------------------
class Registered(msgspec.Struct, tag="registered"):
    ok: bool
    error: str = ""  # why the router refuses this worker; the worker exits with it


class Admit(msgspec.Struct, tag="admit"):
    """Router -> decode or mixed worker: reserve blocks for token_ids and have prefill_worker fill them, or, with no
    prefill_worker (a mixed worker) or a short uncached tail (--local-prefill-max-tokens), prefill them here."""
    request_id: str
    token_ids: list[int]  # the prompt, plus the tokens already streamed when a request migrates
    params: SamplingParams
    prefill_worker: str = ""
    prefill_inbox: str = ""
    num_generated: int = 0  # how many of token_ids are output already streamed (they count against max_tokens)


class Abort(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class Drain(msgspec.Struct, tag="drain"):
    """Router -> worker (POST /admin/workers/{id}/drain): do what SIGTERM does, drain and exit."""


class PeerGone(msgspec.Struct, tag="peer_gone"):
    """A worker was declared dead: drop what waits on it (nothing it owned can still touch our memory), and the
    socket kept for its inbox, which ZMQ would otherwise redial for ever (and a successor that binds the same
    address would get what was queued for the dead one)."""
    worker_id: str
    inbox: str = ""


# --- decode <-> prefill ----------------------------------------------------------------------------------------
class PrefillTask(msgspec.Struct, tag="prefill"):
    request_id: str
    token_ids: list[int]
    params: SamplingParams  # the first token is sampled by the prefill worker
    num_generated: int  # the last tokens of token_ids already generated (a migrated request)
    skip_blocks: int  # leading blocks the decode worker already holds (its own prefix cache)
    dst_block_ids: list[int]  # where the remaining blocks go in the decode worker's pool
    decode_worker: str
    decode_inbox: str
    kv_metadata: bytes  # the decode worker's KVTransport.metadata(); the prefill worker pairs on first sight
    # the decode worker frees the blocks after this long: no write may start later. Bounded (NaN and inf fail the
    # check): with a NaN lease a task's deadline never came, so a forged task held the prefill's blocks forever
    lease_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_LEASE_S)]


class PrefillDone(msgspec.Struct, tag="prefill_done"):
    """Sent as soon as the KV write is *posted*, so the decode worker can start in the same loop iteration in which
    the data lands (its transport reports that); an error is sent instead, or later if the write then fails."""
    request_id: str
    first_token: int = -1
    error: str | None = None
    num_cached_tokens: int = 0
    logprobs: dict[int, float] | None = None  # of the first token


RouterInbound = Heartbeat | Starting | Tokens | Rejected | KVTransferred | Leaving


def events_identity(worker_id: str) -> bytes:
    """The identity of a worker's events socket (its control socket's is the worker id itself)."""
    return f"{worker_id}/events".encode()


def starting_identity(worker_id: str) -> bytes:
    """The identity of the socket a worker announces itself on while it loads."""
    return f"{worker_id}/starting".encode()

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode


def worth_logging(count: int) -> bool:
    """Whether the count-th occurrence of a repeated complaint is logged: the first ten, then every thousandth, so
    a flood (anyone who reaches a port can send one) neither floods the log nor goes unseen."""
    return count <= 10 or count % 1000 == 0


class Decoder:
    """Strict decoding of one socket's union; garbage becomes None (logged, rate-limited), never an exception."""

    def __init__(self, union, where: str):
        self._decoder = msgspec.msgpack.Decoder(union)
        self.where = where
        self.num_dropped = 0

    def decode(self, data: bytes):
        try:
            return self._decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, RecursionError) as e:
            # SamplingParams.__post_init__ raises InvalidRequestError (a ValueError) for out-of-range values;
            # msgspec raises RecursionError for a deeply nested value (a few KiB of 0x91 bytes), even one it
            # only skips (an unknown field): uncaught, it ended the router's receive loop or a worker's main loop
            self.num_dropped += 1
            if worth_logging(self.num_dropped):
                log.warning("dropped an undecodable message on %s (%d so far): %s", self.where,
                            self.num_dropped, str(e)[:200])
            return None
