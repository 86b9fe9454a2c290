"""The transport interface every backend implements, and the bookkeeping they share.

One transport per worker process wraps that worker's single KV pool. The sender (P) pushes a scattered list of
its blocks into blocks the receiver (D) reserved; both sides learn the outcome by polling, never by blocking
without a bound: every send and every expected receive has a deadline, and a deadline that passes is reported
as a failed TransferResult.
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import NamedTuple, Sequence, Union

import msgspec
import torch

from kv_transfer.layout import KVLayout, KVLayoutMismatch, check_compatible

log = logging.getLogger("kv_transfer")

DEFAULT_TIMEOUT_S = 30.0


class TransferResult(NamedTuple):
    transfer_id: str
    ok: bool
    error: str | None = None


# --- what metadata() returns: a tagged union, so a nixl side and a zmq side fail to pair with a clear message --
class NixlPeerInfo(msgspec.Struct, frozen=True, tag="nixl"):
    name: str
    layout: KVLayout
    num_blocks: int
    agent_metadata: bytes  # nixl_agent.get_agent_metadata(): UCX worker address + registered regions
    base_addr: int  # where the pool starts in the peer's address space; our descriptors point into it
    device_id: int = 0
    mem_type: str = "DRAM"  # "VRAM" once pools live on GPU
    state_base_addr: int = 0  # where the per-sequence state pool starts (layouts with a state only)


class ZmqPeerInfo(msgspec.Struct, frozen=True, tag="zmq"):
    name: str
    layout: KVLayout
    num_blocks: int
    endpoint: str  # "tcp://host:port" of the peer's ROUTER socket


PeerInfo = Union[NixlPeerInfo, ZmqPeerInfo]
_peer_decoder = msgspec.msgpack.Decoder(PeerInfo)


class KVTransport(ABC):
    """Moves whole blocks (every plane and layer: K and V, or MLA latents) of one pool into another process's pool.

    When the layout has a per-sequence state, a write also moves the state slot of src[0] into the peer's slot
    dst[0]: callers hand a sequence over from its first block, whose slot holds the sequence's state.

    Sender:   write_blocks(peer, src, dst, transfer_id) then poll_sent() -> [TransferResult]
    Receiver: expect(transfer_id) (arms a deadline; data nobody expects is refused where the backend can refuse
              it: refuses_unexpected_writes) then poll_received() -> [TransferResult]; cancel(transfer_id)
    A successful receive result means the data is in the local pool; a successful send result means it is in the
    peer's pool (NIXL: the RDMA write completed; ZMQ: the peer acknowledged after copying).
    """

    backend: str = ""  # tag of the PeerInfo this backend produces
    refuses_unexpected_writes: bool = False  # whether data for a transfer not (or no longer) expected is refused

    def __init__(self, name: str, pool: torch.Tensor, layout: KVLayout, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 state_pool: torch.Tensor | None = None):
        layout.check_pool(pool, state_pool)  # also refuses mixed kinds: the slab math assumes one shape per plane
        if not pool.is_contiguous() or (state_pool is not None and not state_pool.is_contiguous()):
            raise ValueError("the KV and state pools must be contiguous tensors (each is registered as one region)")
        self.name, self.pool, self.layout, self.timeout_s = name, pool, layout, timeout_s
        self.state_pool = state_pool
        self.num_blocks = pool.shape[2]
        self._peers: dict[str, PeerInfo] = {}
        self._send_deadlines: dict[str, float] = {}
        self._send_peers: dict[str, str] = {}  # transfer id -> peer id, so remove_peer can fail its sends
        self._recv_deadlines: dict[str, float] = {}
        self._failed_sends: list[TransferResult] = []  # sends that failed to start, reported by poll_sent
        # recently timed-out receives: data that arrives for them later is dropped, not reported as success
        self._expired: OrderedDict[str, None] = OrderedDict()

    # --- handshake ------------------------------------------------------------------------------------------
    @abstractmethod
    def metadata(self) -> bytes:
        """Everything a peer needs to pair with us (msgpack-encoded PeerInfo)."""

    def add_peer(self, peer_metadata: bytes, expected_name: str | None = None) -> str:
        """Pair with a peer from its metadata(); returns its peer id. Raises KVLayoutMismatch / ValueError, and
        changes nothing then but for a re-pairing whose new endpoint cannot be connected (the peer is forgotten).
        expected_name: the peer id the caller will write to; metadata naming another is refused."""
        try:
            info = _peer_decoder.decode(peer_metadata)
        except (msgspec.DecodeError, ValueError, RecursionError) as e:  # invalid UTF-8 raises UnicodeDecodeError
            # the metadata comes off the wire: a deeply nested value makes msgspec raise RecursionError
            raise ValueError(f"malformed peer metadata: {e}") from None
        if expected_name is not None and info.name != expected_name:
            # a caller keying its peers by another id would write to a peer id it never paired (a KeyError), and
            # re-pairing info.name would redirect that peer's writes
            raise ValueError(f"the metadata names peer {info.name!r}, not {expected_name!r}")
        if not isinstance(info, _INFO_TYPES[self.backend]):
            raise ValueError(f"peer {info.name!r} uses the {type(info).__name__} transport, this side is "
                             f"{self.backend!r}: both sides must pick the same backend")
        check_compatible(self.layout, info.layout)
        if info.name in self._peers:
            self._disconnect(info.name)
            del self._peers[info.name]  # a _connect that raises below leaves no half-known peer behind
        self._connect(info)
        self._peers[info.name] = info
        return info.name

    # --- sender ---------------------------------------------------------------------------------------------
    def write_blocks(self, peer_id: str, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
                     transfer_id: str, *, timeout_s: float | None = None) -> None:
        """Start writing local blocks src[i] into the peer's blocks dst[i]; the outcome comes from poll_sent().

        Bad arguments raise at once; transport trouble is reported through poll_sent, never raised here.
        """
        peer = self._peers.get(peer_id)
        if peer is None:
            raise KeyError(f"unknown peer {peer_id!r}; call add_peer first")
        if transfer_id in self._send_deadlines:
            raise ValueError(f"transfer {transfer_id!r} is already in flight")
        src = _block_ids(src_block_ids, self.num_blocks, "src")
        dst = _block_ids(dst_block_ids, peer.num_blocks, "dst")
        if src.numel() != dst.numel():
            raise ValueError(f"{src.numel()} src blocks but {dst.numel()} dst blocks")
        if dst.unique().numel() != dst.numel():
            raise ValueError("dst block ids repeat; the result would depend on write order")
        self._send_deadlines[transfer_id] = time.monotonic() + (timeout_s or self.timeout_s)
        self._send_peers[transfer_id] = peer_id
        try:
            self._start_write(peer, src, dst, transfer_id)
        except Exception as e:  # reported by the next poll_sent, like any other failure
            log.warning("transfer %s to %s failed to start: %s", transfer_id, peer_id, e)
            self._release_send(transfer_id)
            self._failed_sends.append(TransferResult(transfer_id, False, f"start failed: {e}"))

    def poll_sent(self, timeout_s: float = 0.0) -> list[TransferResult]:
        """Finished sends (ok or failed). Waits up to timeout_s for at least one; 0 never blocks."""
        return self._poll(self._sent_step, self._wait_sent, timeout_s)

    def _sent_step(self) -> list[TransferResult]:
        out, self._failed_sends = self._failed_sends, []
        out += self._progress_sends()
        for r in out:
            self._send_deadlines.pop(r.transfer_id, None)
            self._send_peers.pop(r.transfer_id, None)
            self._release_send(r.transfer_id)
        now = time.monotonic()
        for tid in [t for t, d in self._send_deadlines.items() if d <= now]:
            self._fail_send(tid, "timed out waiting for the transfer to complete", out)
        return out

    def _fail_send(self, transfer_id: str, error: str, out: list[TransferResult]):
        del self._send_deadlines[transfer_id]
        self._send_peers.pop(transfer_id, None)
        self._release_send(transfer_id)
        out.append(TransferResult(transfer_id, False, error))

    def remove_peer(self, peer_id: str) -> None:
        """Forget a peer (it died): its sends in flight are cancelled and reported failed by the next poll_sent."""
        if peer_id not in self._peers:
            return
        for tid in [t for t, p in self._send_peers.items() if p == peer_id]:
            self._fail_send(tid, f"peer {peer_id} was removed", self._failed_sends)
        self._disconnect(peer_id)
        del self._peers[peer_id]

    # --- receiver -------------------------------------------------------------------------------------------
    def expect(self, transfer_id: str, timeout_s: float | None = None) -> None:
        """Arm a deadline: if transfer_id has not landed by then, poll_received reports it failed."""
        self._recv_deadlines[transfer_id] = time.monotonic() + (timeout_s or self.timeout_s)

    def poll_received(self, timeout_s: float = 0.0) -> list[TransferResult]:
        """Transfers now fully in the local pool (ok) or expected ones that timed out / were refused (failed)."""
        return self._poll(self._received_step, self._wait_received, timeout_s)

    def _received_step(self) -> list[TransferResult]:
        out = []
        for r in self._progress_received():
            if r.transfer_id in self._expired:
                log.warning("transfer %s arrived after its deadline; ignored", r.transfer_id)
                continue
            self._recv_deadlines.pop(r.transfer_id, None)
            out.append(r)
        now = time.monotonic()
        for tid in [t for t, d in self._recv_deadlines.items() if d <= now]:
            del self._recv_deadlines[tid]
            self._expired[tid] = None
            out.append(TransferResult(tid, False, "timed out waiting for the data to arrive"))
        while len(self._expired) > 4096:  # bounded memory: old ids cannot plausibly still arrive
            self._expired.popitem(last=False)
        return out

    def cancel(self, transfer_id: str) -> None:
        """Stop expecting transfer_id (its blocks are being freed for reuse): data that still comes is refused where
        the transport can refuse it, and a report of its landing is ignored."""
        if self._recv_deadlines.pop(transfer_id, None) is not None:
            self._expired[transfer_id] = None

    def is_expected(self, transfer_id: str) -> bool:
        return transfer_id in self._recv_deadlines

    # --- shared plumbing ------------------------------------------------------------------------------------
    def _poll(self, step, wait, timeout_s: float) -> list[TransferResult]:
        deadline = time.monotonic() + timeout_s
        while True:
            out = step()
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            wait(min(remaining, 0.05))  # re-check deadlines at least every 50 ms

    def close(self) -> None:
        for name in list(self._peers):
            self._disconnect(name)
        self._peers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- what a backend provides ----------------------------------------------------------------------------
    @abstractmethod
    def _connect(self, info: PeerInfo) -> None: ...

    def _disconnect(self, peer_id: str) -> None: ...

    @abstractmethod
    def _start_write(self, peer: PeerInfo, src: torch.Tensor, dst: torch.Tensor, transfer_id: str) -> None: ...

    @abstractmethod
    def _progress_sends(self) -> list[TransferResult]:
        """Sends that completed or failed since the last call."""

    def _release_send(self, transfer_id: str) -> None:
        """Forget a finished or timed-out send (abort it if still running)."""

    @abstractmethod
    def _progress_received(self) -> list[TransferResult]:
        """Transfers that landed in the pool since the last call (or were refused, with their id)."""

    def _wait_sent(self, seconds: float) -> None:
        time.sleep(min(seconds, 0.0005))

    def _wait_received(self, seconds: float) -> None:
        time.sleep(min(seconds, 0.0005))


_INFO_TYPES = {"nixl": NixlPeerInfo, "zmq": ZmqPeerInfo}


def _block_ids(ids, limit: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"no {what} blocks given")
    if int(t.min()) < 0 or int(t.max()) >= limit:
        raise ValueError(f"{what} block ids must be in [0, {limit}), got {t.tolist()[:8]}...")
    return t


__all__ = ["KVTransport", "TransferResult", "NixlPeerInfo", "ZmqPeerInfo", "KVLayoutMismatch", "DEFAULT_TIMEOUT_S"]
