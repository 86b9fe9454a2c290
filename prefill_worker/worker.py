"""One prefill worker process.

A task comes from the decode worker that reserved blocks for it. The prompt goes through the engine like any
other sequence (prefix cache, chunked prefill, batched with other prompts) and stops after its first token; its
blocks stay held (engine hold_finished) while the KV transport writes the ones the decode worker lacks into the
blocks it reserved. The first token goes to the decode worker as soon as the write is posted (it starts decoding
when its transport reports the data landed); our blocks are released only once the write has completed (they stay
in our prefix cache), and a write that fails is reported to the decode worker then.

No write may start after the decode worker's lease on its blocks runs out, since after that it may reuse them and
NIXL cannot refuse a late write: a task's local deadline is its arrival time + lease - LEASE_MARGIN_S.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from common.errors import InvalidRequestError
from common.cluster.protocol import PREFILL, Abort, KVTransferred, PeerGone, PrefillDone, PrefillTask, WorkerLoad
from common.engine.sequence import Sequence, SequenceStatus
from common.cluster.flags import engine_kwargs, setup_logging
from common.cluster.runtime import WorkerRuntime
from common.engine.config import EngineConfig
from common.engine.llm_engine import LLMEngine
from kv_transfer import KVLayoutMismatch, make_transport

LEASE_MARGIN_S = 2.0
MAX_PAIRED_PEERS = 256  # decode workers paired at once: more than a cluster has, well under 1023 sockets a context

log = logging.getLogger("nano_pd.prefill")


@dataclasses.dataclass
class Task:
    msg: PrefillTask
    seq: Sequence
    deadline: float
    num_bytes: int = 0
    started: float = 0.0  # when the transfer started


class PrefillWorker:
    def __init__(self, args):
        setup_logging(PREFILL, args)
        # every step of a prefill engine is a prefill: compiling decode steps (--decode-mode compile given to a
        # whole cluster) would only cost its start tens of seconds
        self.engine = LLMEngine(EngineConfig(**{**engine_kwargs(args), "decode_mode": "eager"}), hold_finished=True)
        self.rt = WorkerRuntime(PREFILL, args, self.engine, commands=Abort | PeerGone, inbox=PrefillTask)
        self.transport = make_transport(args.kv_transport, **self.rt.transport_options())
        self.tasks: dict[str, Task] = {}  # queued or prefilling
        self.sending: dict[str, Task] = {}  # KV transfer in flight
        self.peer_metadata: dict[str, bytes] = {}  # decode worker id -> the metadata we paired with
        self.kv_bytes_sent = 0
        self.requests_done = 0

    def load(self) -> WorkerLoad:
        load = self.rt.engine_load(kv_bytes_sent=self.kv_bytes_sent, requests_done=self.requests_done)
        load.num_running += len(self.sending)
        return load

    def run(self):
        self.rt.start(self.transport.backend, self.transport.layout.compat_hash(), self.load)
        self.rt.serve(self)

    # --- the loop's hooks (WorkerRuntime.serve) ---------------------------------------------------------------
    def transfers_in_flight(self) -> bool:
        return bool(self.sending)

    def request_ids(self) -> list[str]:
        return list(self.tasks)  # a task already sending finishes its write (see _abort)

    def step(self):
        if self.engine.has_unfinished():
            for seq in self.engine.step():
                if seq.is_finished:
                    self._push(self.tasks.pop(seq.request_id))
        for result in self.transport.poll_sent():
            self._sent(result)
        # a prefill worker receives no KV, but its transport listens like any other: unread, whatever anyone sent
        # there queued in memory for ever (up to the high-water mark of a thousand messages, of any size, per
        # connection). Polled, each is refused (no transfer is expected here) and freed.
        self.transport.poll_received()
        self._expire_queued()

    def close(self):
        self.transport.close()

    # --- inputs -------------------------------------------------------------------------------------------
    def on_command(self, cmd):
        if isinstance(cmd, Abort):
            for rid in cmd.request_ids:
                self._abort(rid, notify=True)
        elif isinstance(cmd, PeerGone):
            for rid in [r for r, t in self.tasks.items() if t.msg.decode_worker == cmd.worker_id]:
                self._abort(rid, notify=False)
            if self.peer_metadata.pop(cmd.worker_id, None) is not None:
                self.transport.remove_peer(cmd.worker_id)  # its transfers in flight fail at the next poll

    def on_message(self, msg: PrefillTask):
        def refuse(error: str):
            self.rt.send_peer(msg.decode_inbox, PrefillDone(msg.request_id, error=error))

        if msg.request_id in self.tasks or msg.request_id in self.sending:
            return log.warning("duplicate task %s ignored", msg.request_id)
        try:
            self._pair(msg.decode_worker, msg.kv_metadata)
        except (KVLayoutMismatch, ValueError) as e:
            return refuse(f"prefill worker {self.rt.worker_id} cannot send KV to {msg.decode_worker}: {e}")
        total = self.engine.block_manager.blocks_needed(len(msg.token_ids))
        if not 0 <= msg.skip_blocks < total or len(msg.dst_block_ids) != total - msg.skip_blocks:
            return refuse(f"task has {msg.skip_blocks} cached + {len(msg.dst_block_ids)} blocks for "
                          f"{len(msg.token_ids)} tokens ({total} blocks)")
        if msg.skip_blocks and self.transport.layout.state_kind:
            # the state travels with the first block sent, and a recurrent state covers the whole prompt
            return refuse(f"a model with a per-sequence state needs the whole prompt's KV, got skip_blocks="
                          f"{msg.skip_blocks}")
        try:
            # a sequence stops after its first new token whatever max_tokens says (num_generated + 1 >= 1)
            seq = self.engine.new_sequence(msg.token_ids, dataclasses.replace(msg.params, max_tokens=1),
                                           msg.request_id, msg.num_generated)
        except InvalidRequestError as e:
            return refuse(str(e))
        self.engine.scheduler.add(seq)
        self.tasks[msg.request_id] = Task(msg, seq, time.monotonic() + msg.lease_s - LEASE_MARGIN_S)

    def _pair(self, decode_worker: str, metadata: bytes):
        known = self.peer_metadata.pop(decode_worker, None)  # back in last (the most recently used), if it pairs
        if known != metadata:
            if known is None:
                self._forget_idle_peers(MAX_PAIRED_PEERS - 1)
            # the transport must know the peer by the id we write to (decode_worker), or a forged task whose
            # metadata names another peer made write_blocks raise KeyError out of the main loop. If this raises,
            # a re-pairing may have dropped the old pairing: the worker stays unpaired and pairs on its next task
            self.transport.add_peer(metadata, expected_name=decode_worker)
        self.peer_metadata[decode_worker] = metadata

    def _forget_idle_peers(self, keep: int):
        """Unpair the decode workers no task of ours involves, least recently used first, until at most `keep`
        remain: only PeerGone unpaired a decode worker, so the pairings forged tasks made (their decode worker ids
        never die) piled up, a socket each, until the transport's context ran out of sockets. A live decode
        worker that is unpaired here pairs again with its next task."""
        busy = {t.msg.decode_worker for t in (*self.tasks.values(), *self.sending.values())}
        for decode_worker in [d for d in self.peer_metadata if d not in busy][:max(0, len(self.peer_metadata) - keep)]:
            del self.peer_metadata[decode_worker]
            self.transport.remove_peer(decode_worker)

    # --- the handoff ----------------------------------------------------------------------------------------
    def _push(self, task: Task):
        """The first token is sampled: write the blocks the decode worker lacks into its reserved ones."""
        msg, seq = task.msg, task.seq
        now = time.monotonic()
        if now >= task.deadline:
            self.engine.release(seq)
            return self._done(task, error="the KV was ready only after the decode worker's lease ran out")
        src = seq.block_table[msg.skip_blocks:msg.skip_blocks + len(msg.dst_block_ids)]
        layout = self.transport.layout
        # a hybrid model's sequence state travels with its first block
        task.num_bytes = len(src) * layout.block_bytes + (layout.state_bytes if src else 0)
        task.started = now
        self.sending[msg.request_id] = task
        self.engine.runner.export_blocks(src)
        try:
            self.transport.write_blocks(msg.decode_worker, src, msg.dst_block_ids, msg.request_id,
                                        timeout_s=task.deadline - now)
        except (KeyError, ValueError) as e:
            # write_blocks refuses bad arguments by raising, and the task's dst_block_ids come off the wire (out of
            # the peer's range, repeated): uncaught, a forged task ended the worker's main loop
            del self.sending[msg.request_id]
            self.engine.release(seq)
            return self._done(task, error=f"the task's blocks cannot be written: {e}")
        self._done(task, first_token=seq.token_ids[-1], logprobs=seq.logprobs[-1] if seq.logprobs else None)

    def _sent(self, result):
        task = self.sending.pop(result.transfer_id, None)
        if task is None:
            return
        self.engine.release(task.seq)
        if result.ok:
            self.kv_bytes_sent += task.num_bytes
            self.requests_done += 1
            self.rt.send_router(KVTransferred(task.num_bytes, time.monotonic() - task.started))
        else:  # the decode worker holds the blocks until it hears this (or its lease ends)
            self._done(task, error=f"KV transfer to {task.msg.decode_worker} failed: {result.error}")

    def _done(self, task: Task, first_token: int = -1, error: str | None = None, logprobs=None):
        self.rt.send_peer(task.msg.decode_inbox, PrefillDone(
            task.msg.request_id, first_token=first_token, error=error, num_cached_tokens=task.seq.num_cached_tokens,
            logprobs=logprobs))

    def _abort(self, rid: str, notify: bool):
        task = self.tasks.pop(rid, None)
        if task is not None:
            self.engine.abort(task.seq)
            if notify:  # the decode worker keeps the blocks quarantined until it hears from us
                self._done(task, error="aborted")
        # a task already sending finishes its write: our blocks stay held until then, and the decode worker
        # frees its side when the data lands

    def _expire_queued(self):
        """Queued tasks whose lease ran out before they were prefilled: never spend compute on them."""
        now = time.monotonic()
        for rid in [r for r, t in self.tasks.items()
                    if t.deadline <= now and t.seq.status == SequenceStatus.WAITING]:
            task = self.tasks.pop(rid)
            self.engine.abort(task.seq)
            self._done(task, error="waited in the prefill queue longer than the decode worker's lease")
