"""One decode worker process.

Admission is where backpressure lives: a request first reserves blocks here (reusing blocks this worker already
caches for its prefix), and only then is a prefill worker asked to fill the rest, so a full decode worker costs no
prefill compute. A request that cannot get blocks waits in a bounded FIFO; beyond that it is refused and the
router tries another decode worker.

Reserved blocks have a lease (the receive deadline of the KV transport). A request joins the continuous batch
in the loop iteration where both the prefill worker's first token and the transport's "data landed" are in; when
the lease runs out first the blocks are freed and the router retries the request. An aborted reservation stays
quarantined until its data lands, the prefill worker reports the write failed, or the lease ends, because a
write in flight could still land in those blocks; only a prefill worker declared dead frees its reservations
at once.

Not every prompt needs a prefill worker. A mixed worker (--role mixed) computes every prompt itself, and a decode
worker does so when its own prefix cache leaves at most --local-prefill-max-tokens of it uncached (a multi-turn
follow-up), where a hand-off would cost more than it saves: the sequence joins the running batch and the engine
chunks its prefill beside the decodes under the token budget.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import deque

from common.errors import InvalidRequestError
from common.cluster.protocol import (DECODE, Abort, Admit, PeerGone, PrefillDone, PrefillTask, Rejected,
                                     TokenOutput, Tokens, WorkerLoad)
from common.engine.sequence import Sequence
from common.cluster.flags import engine_kwargs, setup_logging
from common.cluster.runtime import WorkerRuntime
from common.engine.config import EngineConfig
from common.engine.llm_engine import LLMEngine
from kv_transfer import make_transport

log = logging.getLogger("nano_pd.decode")


@dataclasses.dataclass
class Admission:
    msg: Admit
    seq: Sequence
    aborted: bool = False
    first_token: int | None = None  # from PrefillDone
    first_logprobs: dict[int, float] | None = None
    num_cached_tokens: int = 0
    landed: bool = False  # the transport reported the KV in our blocks
    dst_block_ids: list[int] = dataclasses.field(default_factory=list)  # the blocks the prefill worker fills


class DecodeWorker:
    def __init__(self, args):
        setup_logging(args.role, args)
        self.engine = LLMEngine(EngineConfig(**engine_kwargs(args)))
        self.rt = WorkerRuntime(args.role, args, self.engine, commands=Admit | Abort | PeerGone, inbox=PrefillDone)
        # a mixed worker exchanges no KV: no transport (NIXL's progress thread would spin a core for nothing)
        self.transport = make_transport(args.kv_transport, **self.rt.transport_options()) \
            if args.role == DECODE else None
        self.kv_metadata = self.transport.metadata() if self.transport else b""
        self.local_prefill_max_tokens = args.local_prefill_max_tokens
        self.lease_s = args.kv_lease
        self.max_pending = args.max_pending or 4 * args.max_num_seqs
        bm = self.engine.block_manager
        self.watermark = max(1, bm.num_blocks // 100)  # kept free for the running sequences to grow into
        self.pending: deque[Admission] = deque()  # waiting for blocks
        self.reserved: dict[str, Admission] = {}  # blocks reserved, waiting for the KV and first token
        self.running: dict[str, Sequence] = {}
        self.prefilling: set[str] = set()  # running, prefilled here, first token not sampled yet
        self.requests_done = 0
        self._outputs: list[TokenOutput] = []

    def load(self) -> WorkerLoad:
        return self.rt.engine_load(num_waiting=len(self.pending) + len(self.reserved),
                                   requests_done=self.requests_done)

    def run(self):
        if self.transport is None:
            self.rt.start("none", "", self.load)
        else:
            self.rt.start(self.transport.backend, self.transport.layout.compat_hash(), self.load)
        self.rt.serve(self)

    # --- the loop's hooks (WorkerRuntime.serve) ---------------------------------------------------------------
    def transfers_in_flight(self) -> bool:
        return bool(self.reserved)

    def request_ids(self) -> list[str]:
        return [*self.running, *self.reserved, *(a.msg.request_id for a in self.pending)]

    def step(self):
        for result in self.transport.poll_received() if self.transport else ():
            if result.ok:
                self._on_landed(result.transfer_id)
            else:
                self._lease_expired(result.transfer_id, result.error)
        self._admit()
        if self.engine.has_unfinished():
            for seq in self.engine.step():
                if seq.request_id in self.prefilling:  # its first output: the prompt was computed here
                    self.prefilling.discard(seq.request_id)
                    self._emit(seq, seq.token_ids[-seq.num_new_tokens:], num_cached_tokens=seq.num_cached_tokens,
                               local_prefill=True)
                else:
                    self._emit(seq, seq.token_ids[-seq.num_new_tokens:])
        self._flush()

    def close(self):
        if self.transport is not None:
            self.transport.close()

    # --- router commands ----------------------------------------------------------------------------------
    def on_command(self, cmd):
        if isinstance(cmd, Admit):
            self._on_admit(cmd)
        elif isinstance(cmd, Abort):
            for rid in cmd.request_ids:
                self._abort(rid)
        elif isinstance(cmd, PeerGone):
            # not reserved yet: it would ask the gone worker for its KV and hold blocks for a lease for nothing
            for adm in [a for a in self.pending if a.msg.prefill_worker == cmd.worker_id]:
                self.pending.remove(adm)
                self._error(adm.msg.request_id, f"prefill worker {cmd.worker_id} is gone", retryable=True)
            for rid in [r for r, a in self.reserved.items() if a.msg.prefill_worker == cmd.worker_id]:
                adm = self.reserved[rid]
                if not adm.aborted:
                    adm.aborted = True
                    self._error(rid, f"prefill worker {cmd.worker_id} died", retryable=True)
                # the process may be hung rather than dead, and write when it wakes: where the transport refuses
                # that write the blocks can go now; where it cannot (NIXL), they stay quarantined until the lease
                # ends (_lease_expired), after which a prefill worker never starts a write
                if self.transport.refuses_unexpected_writes:
                    del self.reserved[rid]
                    self.transport.cancel(rid)
                    self.engine.release(adm.seq)

    def _on_admit(self, msg: Admit):
        rid = msg.request_id
        if rid in self.reserved or rid in self.running or any(a.msg.request_id == rid for a in self.pending):
            return log.warning("duplicate admission %s ignored", rid)
        if self.rt.draining:  # sent before the router heard of the drain: it goes to another worker
            return self.rt.send_router(Rejected(self.rt.worker_id, rid, "decode worker is draining"))
        try:
            seq = self.engine.new_sequence(msg.token_ids, msg.params, rid, msg.num_generated)
        except InvalidRequestError as e:
            return self._error(rid, str(e), retryable=False)
        if len(self.pending) >= self.max_pending:
            return self.rt.send_router(Rejected(self.rt.worker_id, rid, "decode worker is full"))
        self.pending.append(Admission(msg, seq))

    def _abort(self, rid: str):
        if rid in self.running:
            self.engine.abort(self.running.pop(rid))
            self.prefilling.discard(rid)
        elif rid in self.reserved:
            self.reserved[rid].aborted = True
            self._maybe_start(self.reserved[rid])  # frees it now if its data has already landed
        else:
            for adm in self.pending:
                if adm.msg.request_id == rid:
                    self.pending.remove(adm)
                    break

    # --- admission and handoff ------------------------------------------------------------------------------
    def _admit(self):
        scheduler = self.engine.scheduler
        while self.pending and len(scheduler.running) + len(scheduler.waiting) + len(self.reserved) \
                < scheduler.max_num_seqs:
            adm = self.pending[0]
            # with nothing else holding blocks, a request may use all of them
            idle = not self.engine.has_unfinished() and not self.reserved
            if not self.engine.reserve(adm.seq, 0 if idle else self.watermark):
                return
            self.pending.popleft()
            seq, bm = adm.seq, self.engine.block_manager
            if not adm.msg.prefill_worker or seq.num_tokens - seq.num_computed_tokens <= self.local_prefill_max_tokens:
                self.engine.start_prefill(seq)
                self.running[seq.request_id] = seq
                self.prefilling.add(seq.request_id)
                continue
            skip = seq.num_computed_tokens // bm.block_size
            self.reserved[seq.request_id] = adm
            adm.dst_block_ids = seq.block_table[skip:]
            self.transport.expect(seq.request_id, self.lease_s)
            self.rt.send_peer(adm.msg.prefill_inbox, PrefillTask(
                request_id=seq.request_id, token_ids=seq.token_ids, params=seq.params,
                num_generated=seq.num_output_tokens, skip_blocks=skip,
                dst_block_ids=adm.dst_block_ids, decode_worker=self.rt.worker_id,
                decode_inbox=self.rt.inbox_endpoint, kv_metadata=self.kv_metadata, lease_s=self.lease_s))

    def on_message(self, msg: PrefillDone):
        adm = self.reserved.get(msg.request_id)
        if adm is None:
            return log.info("late answer for %s ignored (lease over or aborted)", msg.request_id)
        if msg.error:  # nothing more will be written: the blocks can go
            del self.reserved[msg.request_id]
            self.transport.cancel(msg.request_id)
            self.engine.release(adm.seq)
            if not adm.aborted:
                self._error(msg.request_id, msg.error, retryable=True)
            return
        adm.first_token, adm.num_cached_tokens, adm.first_logprobs = msg.first_token, msg.num_cached_tokens, msg.logprobs
        self._maybe_start(adm)

    def _on_landed(self, rid: str):
        adm = self.reserved.get(rid)
        if adm is not None:
            adm.landed = True
            if not adm.aborted:
                self.engine.runner.import_blocks(adm.dst_block_ids)
            self._maybe_start(adm)

    def _maybe_start(self, adm: Admission):
        seq = adm.seq
        if adm.aborted and adm.landed:
            del self.reserved[seq.request_id]
            self.engine.release(seq)
        elif adm.landed and adm.first_token is not None:
            del self.reserved[seq.request_id]
            if seq.logprobs is not None:
                seq.logprobs.append(adm.first_logprobs or {})
            if self.engine.start_decoding(seq, adm.first_token) is None:
                self.running[seq.request_id] = seq
            self._emit(seq, [adm.first_token], num_cached_tokens=adm.num_cached_tokens)

    def _lease_expired(self, rid: str, error: str | None):
        adm = self.reserved.pop(rid, None)
        if adm is None:
            return
        self.engine.release(adm.seq)
        if not adm.aborted:
            self._error(rid, f"no KV from prefill worker {adm.msg.prefill_worker} within the lease: {error}",
                        retryable=True)

    # --- output ---------------------------------------------------------------------------------------------
    def _emit(self, seq: Sequence, token_ids: list[int], **first_output_stats):
        if seq.is_finished:
            self.running.pop(seq.request_id, None)
            self.requests_done += 1
            first_output_stats.update(num_draft_tokens=seq.num_spec_draft_tokens,
                                      num_accepted_tokens=seq.num_spec_accepted_tokens)
        logprobs = seq.logprobs[-len(token_ids):] if seq.logprobs is not None else None
        self._outputs.append(TokenOutput(seq.request_id, token_ids, seq.finish_reason, logprobs=logprobs,
                                         **first_output_stats))

    def _error(self, rid: str, error: str, retryable: bool):
        self._outputs.append(TokenOutput(rid, [], "error", error=error, retryable=retryable))

    def _flush(self):
        if self._outputs:
            self.rt.send_router(Tokens(self.rt.worker_id, self._outputs))
            self._outputs = []
