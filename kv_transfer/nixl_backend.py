"""NIXL (UCX underneath) backend: P writes straight into D's registered pool, D's CPU is not involved.

The pool is registered once as one region. At pairing time each side's pool is also described as a prepped
descriptor list with one entry per (plane, layer, block) slab, index (plane * L + layer) * num_blocks + block; a
transfer then just picks indices on both sides (vectorised, no per-block Python), and NIXL merges runs of
adjacent slabs into single UCX puts. One WRITE request per transfer carries the transfer id as its
notification, which UCX delivers only after the data, so the receiver's get_new_notifs means "it is in the pool".

A per-sequence state pool (hybrid models) is registered as a second region; its slots are appended to the same
descriptor lists (index planes * L * num_blocks + slot), so a sequence's state rides in the same WRITE and
arrives before the same notification.
"""
from __future__ import annotations

import itertools
import os
import time

import msgspec
import numpy as np
import torch

from kv_transfer.base import DEFAULT_TIMEOUT_S, KVTransport, NixlPeerInfo, TransferResult, log
from kv_transfer.layout import KVLayout

NOTIF_PREFIX = b"kvx1:"  # other notifications (future control messages) share the channel; ours are tagged
_agent_ids = itertools.count()


def _import_nixl():
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except Exception as e:  # ImportError, or the wheel failing to load its UCX libraries
        raise ImportError(f"the 'nixl' KV transport needs the nixl package with a working UCX plugin "
                          f"(pip install 'nixl[cu12]'); use kind='zmq' on this machine ({e})") from e
    return nixl_agent, nixl_agent_config


class NixlTransport(KVTransport):
    backend = "nixl"
    refuses_unexpected_writes = False  # one-sided WRITEs: the data is in the pool before anyone can look at it

    def __init__(self, name: str, pool: torch.Tensor, layout: KVLayout, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 state_pool: torch.Tensor | None = None, progress_thread: bool = False):
        super().__init__(name, pool, layout, timeout_s=timeout_s, state_pool=state_pool)
        nixl_agent, nixl_agent_config = _import_nixl()
        # No progress thread by default: NIXL runs it with zero delay, i.e. it spins a whole core even when idle,
        # which a CPU box cannot spare. UCX then progresses inside our polls, so BOTH sides must poll: on this
        # transport (CMA puts + a TCP notification) the sender's DONE waits on the receiver's progress too.
        # agent names must be unique among the agents that meet; a suffix keeps a restarted worker distinct
        config = nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"])
        self.agent = nixl_agent(f"{name}-{os.getpid()}-{next(_agent_ids)}", config)
        if "UCX" not in self.agent.backends:
            raise RuntimeError("NIXL has no UCX backend on this machine")
        self.mem_type = "DRAM" if pool.device.type == "cpu" else "VRAM"
        self.device_id = 0 if pool.device.type == "cpu" else pool.device.index or 0
        self._reg = self.agent.register_memory(pool)
        self._state_reg = self.agent.register_memory(state_pool) if state_pool is not None else None
        self._local_dlist = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", self._slab_table(
            pool.data_ptr(), self.num_blocks, self._state_addr()), self.mem_type)
        self._remote: dict[str, tuple[str, object]] = {}  # peer name -> (nixl agent name, prepped remote dlist)
        self._inflight: dict[str, object] = {}  # transfer id -> nixl_xfer_handle
        self._leaked: list[object] = []  # handles NIXL refused to release (still running); kept alive on purpose

    def _state_addr(self) -> int:
        return self.state_pool.data_ptr() if self.state_pool is not None else 0

    def _slab_table(self, base_addr: int, num_blocks: int, state_addr: int) -> np.ndarray:
        """Nx3 (addr, len, dev) rows for every slab of a pool starting at base_addr, in index order, then (with a
        state) one row per state slot of the state pool at state_addr."""
        slabs = self.layout.num_planes * self.layout.num_layers * num_blocks
        n = slabs + (num_blocks if self.layout.state_bytes else 0)
        if n >= 2**31:
            raise ValueError("pool has too many slabs for NIXL's int32 descriptor indices")
        table = np.empty((n, 3), dtype=np.uint64)
        table[:slabs, 0] = base_addr + np.arange(slabs, dtype=np.uint64) * np.uint64(self.layout.chunk_bytes)
        table[:slabs, 1] = self.layout.chunk_bytes
        table[slabs:, 0] = state_addr + np.arange(n - slabs, dtype=np.uint64) * np.uint64(self.layout.state_bytes)
        table[slabs:, 1] = self.layout.state_bytes
        table[:, 2] = self.device_id
        return table

    def _slab_indices(self, blocks: torch.Tensor, num_blocks: int) -> np.ndarray:
        slabs = self.layout.num_planes * self.layout.num_layers
        rows = np.arange(slabs, dtype=np.int64)[:, None] * num_blocks
        indices = (rows + blocks.numpy()[None, :]).ravel()
        if self.layout.state_bytes:  # the sequence's state: the slot of its first block
            indices = np.append(indices, slabs * num_blocks + int(blocks[0]))
        return indices.astype(np.int32)

    def metadata(self) -> bytes:
        return msgspec.msgpack.encode(NixlPeerInfo(
            name=self.name, layout=self.layout, num_blocks=self.num_blocks,
            agent_metadata=self.agent.get_agent_metadata(), base_addr=self.pool.data_ptr(),
            device_id=self.device_id, mem_type=self.mem_type, state_base_addr=self._state_addr()))

    def _connect(self, info: NixlPeerInfo) -> None:
        agent_name = self.agent.add_remote_agent(info.agent_metadata)
        dlist = self.agent.prep_xfer_dlist(agent_name, self._slab_table(info.base_addr, info.num_blocks,
                                                                        info.state_base_addr), info.mem_type)
        self._remote[info.name] = (agent_name, dlist)

    def _disconnect(self, peer_id: str) -> None:
        agent_name, dlist = self._remote.pop(peer_id)
        dlist.release()
        try:
            self.agent.remove_remote_agent(agent_name)
        except Exception as e:  # a dead peer may fail the disconnect; nothing more to do about it
            log.debug("remove_remote_agent(%s): %s", agent_name, e)

    def _start_write(self, peer: NixlPeerInfo, src: torch.Tensor, dst: torch.Tensor, transfer_id: str) -> None:
        _, remote_dlist = self._remote[peer.name]
        handle = self.agent.make_prepped_xfer(
            "WRITE", self._local_dlist, self._slab_indices(src, self.num_blocks),
            remote_dlist, self._slab_indices(dst, peer.num_blocks), NOTIF_PREFIX + transfer_id.encode())
        self._inflight[transfer_id] = handle
        if self.agent.transfer(handle) == "ERR":
            raise RuntimeError("NIXL refused to post the transfer")

    def _progress_sends(self) -> list[TransferResult]:
        out = []
        for tid, handle in self._inflight.items():
            try:
                state = self.agent.check_xfer_state(handle)
            except Exception as e:
                state, err = "ERR", str(e)
            else:
                err = "NIXL reported a transfer error"
            if state == "DONE":
                out.append(TransferResult(tid, True))
            elif state == "ERR":
                out.append(TransferResult(tid, False, err))
        return out

    def _release_send(self, transfer_id: str) -> None:
        handle = self._inflight.pop(transfer_id, None)
        if handle is None:
            return
        try:
            handle.release()  # also cancels a transfer still running, where UCX can
        except Exception as e:
            log.warning("could not release NIXL transfer %s (%s); keeping its handle", transfer_id, e)
            self._leaked.append(handle)

    def _progress_received(self) -> list[TransferResult]:
        out = []
        for msgs in self.agent.get_new_notifs().values():
            for msg in msgs:
                if msg.startswith(NOTIF_PREFIX):
                    out.append(TransferResult(msg[len(NOTIF_PREFIX):].decode(errors="replace"), True))
                else:
                    log.warning("ignoring unknown NIXL notification %r", msg[:64])
        return out

    def close(self) -> None:
        if getattr(self, "agent", None) is None:
            return
        for tid in list(self._inflight):
            self._release_send(tid)
        super().close()
        self._local_dlist.release()
        self.agent.deregister_memory(self._reg)
        if self._state_reg is not None:
            self.agent.deregister_memory(self._state_reg)
        # Destroy the agent now, while UCX and everything it points into are alive: every handle object holds a
        # reference to the native agent, and one that outlives close() gets destroyed at interpreter exit, where
        # UCX was seen to abort (arbiter assertion) after a peer had died.
        self._local_dlist = self._reg = self._state_reg = None
        for _ in range(20):  # let UCX finish tearing down endpoints (a dead peer's error handling) first
            self.agent.get_new_notifs()
            time.sleep(0.001)
        self._leaked.clear()
        self.agent = None
