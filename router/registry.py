"""The worker registry: who joined (and who may), their heartbeats and loads, who is alive, and the cluster's health.

A worker registers with its first heartbeat. A draining one (its heartbeat says so, or the router asked it to) is
alive but takes no new work. One that misses heartbeats for heartbeat_timeout_s, or says it is leaving, is dead;
the dead stay listed for a minute (the /cluster page), then their cumulative counters join the per-role totals of
`retired`, so the cluster's counters never go down.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from typing import Awaitable, Callable

import msgspec

from common.cluster.protocol import (DECODE, MIXED, PREFILL, ROLES, Heartbeat, Registered, Starting, WorkerInfo,
                                     WorkerLoad, events_identity, starting_identity, worth_logging)

log = logging.getLogger("nano_pd.router")

DEAD_LISTED_S = 60.0  # how long a dead worker stays listed before it is retired
MONITOR_INTERVAL_S = 0.1


@dataclasses.dataclass
class Worker:
    info: WorkerInfo
    load: WorkerLoad
    last_seen: float
    alive: bool = True
    draining: bool = False  # finishing what it holds, then leaving: no new work goes to it
    inflight: set[str] = dataclasses.field(default_factory=set)  # request ids at this worker's stage
    assigned: int = 0  # requests ever routed here
    cached_prefix: OrderedDict[int, None] = dataclasses.field(default_factory=OrderedDict)  # prefill: LRU shadow

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def takes_work(self) -> bool:
        return self.alive and not self.draining


class WorkerRegistry:
    def __init__(self, model_name: str, heartbeat_timeout_s: float = 2.0):
        self.model_name = model_name
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.workers: dict[str, Worker] = {}
        self.starting: dict[str, tuple[str, float]] = {}  # worker id -> (role, last announcement): still loading
        # (kv transport, layout hash) every prefill and decode worker must share; mixed workers exchange no KV
        self._reference: tuple[str, str] | None = None
        # cumulative counters of workers no longer listed, by role, so cluster totals never go down
        self.retired = {role: WorkerLoad() for role in ROLES}
        self.num_refused = 0  # heartbeats refused registration

    # --- health ---------------------------------------------------------------------------------------------
    def alive(self, role: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.alive and w.info.role == role]

    def routable(self, role: str) -> list[Worker]:
        """The workers of role new work may go to: alive and not draining."""
        return [w for w in self.alive(role) if not w.draining]

    def sender(self, identity: bytes) -> Worker | None:
        """The live worker whose events socket has this identity (protocol.events_identity), or None."""
        worker_id = identity.decode(errors="replace").removesuffix("/events")
        worker = self.workers.get(worker_id)
        return worker if worker is not None and worker.alive and identity == events_identity(worker_id) else None

    def decoders(self) -> list[Worker]:
        """The workers an attempt can be sent to: mixed ones, and decode ones while a prefill worker takes work
        (draining ones take none)."""
        return (self.routable(DECODE) if self.routable(PREFILL) else []) + self.routable(MIXED)

    @property
    def healthy(self) -> bool:
        return bool(self.decoders())

    @property
    def max_model_len(self) -> int | None:
        lens = [w.info.max_model_len for w in self.workers.values() if w.alive]
        return min(lens) if lens else None

    def missing_roles(self) -> str:
        missing = [r for r in (PREFILL, DECODE) if not self.routable(r)]
        if not missing or self.routable(MIXED):
            return "cluster unavailable"
        draining = any(w.draining for r in missing for w in self.alive(r))
        return f"no live {' or '.join(missing)} worker in the cluster" + (" (draining ones take no new work)"
                                                                         if draining else "")

    def note_starting(self, identity: bytes, msg: Starting):
        """A worker announced that it is loading (common.cluster.runtime.announce_starting)."""
        if identity == starting_identity(msg.worker_id) and msg.role in ROLES and msg.worker_id not in self.workers:
            self.starting[msg.worker_id] = (msg.role, time.monotonic())

    def starting_roles(self) -> set[str]:
        """The roles of the workers still loading (announced within the heartbeat timeout, not registered yet)."""
        now = time.monotonic()
        for wid in [w for w, (_, seen) in self.starting.items() if now - seen > self.heartbeat_timeout_s]:
            del self.starting[wid]
        return {role for role, _ in self.starting.values()}

    # --- joining and heartbeats -----------------------------------------------------------------------------
    def heartbeat(self, identity: bytes, hb: Heartbeat) -> Registered | None:
        """Record a heartbeat from the socket identity; the reply it needs (a registration's verdict, or the
        refusal of a worker already declared dead), or None."""
        info, now = hb.info, time.monotonic()
        worker = self.workers.get(info.worker_id)
        if worker is not None:
            if identity != info.worker_id.encode():
                return None  # another socket borrowing its id: it must not set the load or keep a hung worker alive
            if not worker.alive:  # it was declared dead and its requests moved: it must not come back half-known
                return Registered(False, "declared dead after missing heartbeats; restart it")
            worker.load, worker.last_seen = hb.load, now
            # once draining, always: a beat sent before the worker got the router's Drain must not undo it
            worker.draining = worker.draining or hb.draining
            return None
        error = self.registration_error(identity, info)
        if error:
            self.num_refused += 1
            if worth_logging(self.num_refused):  # a misconfigured worker beats twice a second
                log.error("refusing worker %s: %s (%d refusals so far)", info.worker_id, error, self.num_refused)
            return Registered(False, error)
        self.workers[info.worker_id] = Worker(info, hb.load, now, draining=hb.draining)
        self.starting.pop(info.worker_id, None)
        if self._reference is None and info.role != MIXED:
            self._reference = (info.kv_transport, info.kv_layout_hash)
        log.info("worker %s joined (%s, %d blocks, inbox %s)", info.worker_id, info.role, info.num_blocks,
                 info.inbox)
        return Registered(True)

    def registration_error(self, identity: bytes, info: WorkerInfo) -> str | None:
        if identity != info.worker_id.encode():
            return "heartbeats must come from the worker's control socket (identity = worker id)"
        if info.role not in ROLES:
            return f"unknown role {info.role!r}"
        if info.model != self.model_name:
            return f"the worker serves {info.model!r} but this router serves {self.model_name!r}"
        if info.role != MIXED and self._reference and (info.kv_transport, info.kv_layout_hash) != self._reference:
            return (f"KV transport/layout {info.kv_transport}/{info.kv_layout_hash} differs from the cluster's "
                    f"{self._reference[0]}/{self._reference[1]} (same model, dtype, block size and "
                    f"--kv-transport on every worker)")
        return None

    # --- death and retirement -------------------------------------------------------------------------------
    def mark_dead(self, worker: Worker) -> bool:
        """Mark worker dead; False if it already was."""
        if not worker.alive:
            return False
        worker.alive = False
        if not self.alive(PREFILL) and not self.alive(DECODE):
            self._reference = None  # an empty cluster may be restarted with another transport
        return True

    async def monitor(self, declare_dead: Callable[[Worker, str], Awaitable[None]]):
        """Forever: hand each worker whose heartbeats stopped to declare_dead, and retire the long dead."""
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            now = time.monotonic()
            for worker in list(self.workers.values()):
                if worker.alive and now - worker.last_seen > self.heartbeat_timeout_s:
                    await declare_dead(worker, f"no heartbeat for {now - worker.last_seen:.1f} s")
            self.retire_dead(now)

    def retire_dead(self, now: float):
        """Unlist the workers dead for DEAD_LISTED_S; their cumulative counters join `retired`."""
        for wid in [w for w, x in self.workers.items() if not x.alive and now - x.last_seen > DEAD_LISTED_S]:
            gone = self.workers.pop(wid)
            retired = self.retired[gone.info.role]
            for name in msgspec.structs.asdict(retired):
                setattr(retired, name, getattr(retired, name) + getattr(gone.load, name))

    def snapshot(self) -> list[dict]:
        """The /cluster page's worker list."""
        now = time.monotonic()
        return [{"worker_id": w.worker_id, "role": w.info.role, "alive": w.alive, "draining": w.draining,
                 "host": w.info.host,
                 "pid": w.info.pid, "inbox": w.info.inbox, "kv_transport": w.info.kv_transport,
                 "weights": w.info.weights,
                 "num_blocks": w.info.num_blocks, "inflight": len(w.inflight), "assigned": w.assigned,
                 "seconds_since_heartbeat": round(now - w.last_seen, 3), "load": msgspec.structs.asdict(w.load)}
                for w in self.workers.values()]
