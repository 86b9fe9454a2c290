"""ZMQ backend, for machines without NIXL: the sender gathers the blocks into one contiguous tensor and sends it
as one zero-copy frame; the receiver copies it into its pool inside poll_received and acknowledges.

Sockets: each transport binds a ROUTER (receives data, answers acks) and opens one DEALER per peer it sends to.
A DEALER/ROUTER pair rather than PUSH/PULL because the sender must learn that the data *landed* (PUSH cannot
carry an answer back), and acks let a refused transfer fail fast instead of waiting for its deadline.
Everything that arrives is decoded with a strict schema and size-checked; garbage is logged and dropped.
With a per-sequence state (hybrid models) the state slot of the first source block travels as a third frame and
lands in the slot of the first destination block, copied together with the blocks before the acknowledgement.
"""
from __future__ import annotations

import math
import warnings

import msgspec
import numpy as np
import torch
import zmq

from common.cluster.protocol import worth_logging
from kv_transfer.base import DEFAULT_TIMEOUT_S, KVTransport, TransferResult, ZmqPeerInfo, log
from kv_transfer.layout import KVLayout

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BlocksHeader(msgspec.Struct, array_like=True, frozen=True):
    """Frame 1 of a data message; frame 2 is the raw bytes of a [planes, L, n, block_size, heads, head_dim] tensor,
    frame 3 (layouts with a state only) one state slot."""
    transfer_id: str
    dst_block_ids: list[int]
    dtype: str
    shape: tuple[int, ...]


class Ack(msgspec.Struct, array_like=True, frozen=True):
    transfer_id: str
    ok: bool
    error: str = ""


_header_decoder = msgspec.msgpack.Decoder(BlocksHeader)
_ack_decoder = msgspec.msgpack.Decoder(Ack)
_encoder = msgspec.msgpack.Encoder()


def _tensor(buffer, dtype: str) -> torch.Tensor:
    """A flat tensor over a received frame, without a copy."""
    with warnings.catch_warnings():  # zmq's buffer is read-only; we only read from it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8)).view(_TORCH_DTYPES[dtype])


class ZmqTransport(KVTransport):
    backend = "zmq"
    refuses_unexpected_writes = True  # the receiver copies each message into the pool itself (_receive)

    def __init__(self, name: str, pool: torch.Tensor, layout: KVLayout, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 state_pool: torch.Tensor | None = None, host: str = "127.0.0.1", port: int = 0,
                 advertise_host: str | None = None):
        super().__init__(name, pool, layout, timeout_s=timeout_s, state_pool=state_pool)
        self._ctx = zmq.Context(io_threads=1)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        if port:
            self._router.bind(f"tcp://{host}:{port}")
        else:
            port = self._router.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{advertise_host or host}:{port}"
        self._dealers: dict[str, zmq.Socket] = {}  # peer name -> socket
        self._inflight: dict[str, list[torch.Tensor]] = {}  # transfer id -> gathered frames (zmq may still read)
        self._acks: list[TransferResult] = []
        self._send_poller = zmq.Poller()
        self._recv_poller = zmq.Poller()
        self._recv_poller.register(self._router, zmq.POLLIN)
        self._shape_tail = (layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self._planes = layout.num_planes
        self._frames = 3 if layout.state_bytes else 2
        self._num_dropped = 0  # messages dropped or refused that no transfer of ours expected (_warn_dropped)

    def metadata(self) -> bytes:
        return msgspec.msgpack.encode(ZmqPeerInfo(name=self.name, layout=self.layout, num_blocks=self.num_blocks,
                                                  endpoint=self.endpoint))

    def _connect(self, info: ZmqPeerInfo) -> None:
        # the endpoint comes off the wire (a PrefillTask's kv_metadata): a malformed one, or a context out of
        # sockets, is a refused pairing (ValueError), not a ZMQError out of the worker's main loop
        try:
            sock = self._ctx.socket(zmq.DEALER)
        except zmq.ZMQError as e:
            raise ValueError(f"cannot open a socket to peer {info.name!r}: {e}") from None
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(info.endpoint)
        except zmq.ZMQError as e:
            sock.close()
            raise ValueError(f"peer {info.name!r} has a bad endpoint {info.endpoint[:100]!r}: {e}") from None
        self._dealers[info.name] = sock
        self._send_poller.register(sock, zmq.POLLIN)

    def _disconnect(self, peer_id: str) -> None:
        sock = self._dealers.pop(peer_id)
        self._send_poller.unregister(sock)
        sock.close()

    # --- sender ---------------------------------------------------------------------------------------------
    def _start_write(self, peer: ZmqPeerInfo, src: torch.Tensor, dst: torch.Tensor, transfer_id: str) -> None:
        # one gather over the block dim for all planes and layers at once; .cpu() is a no-op for CPU pools
        data = self.pool.index_select(2, src.to(self.pool.device)).cpu()
        header = BlocksHeader(transfer_id, dst.tolist(), self.layout.dtype, tuple(data.shape))
        frames = [data]
        if self.state_pool is not None:
            frames.append(self.state_pool[int(src[0])].to("cpu", copy=True))  # a copy, like the gathered blocks
        self._inflight[transfer_id] = frames  # keeps the buffers alive while zmq's I/O thread sends them
        self._dealers[peer.name].send_multipart(
            [_encoder.encode(header)] + [f.view(-1).view(torch.uint8).numpy() for f in frames], copy=False)

    def _progress_sends(self) -> list[TransferResult]:
        for sock in self._dealers.values():
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    ack = _ack_decoder.decode(frames[-1]) if len(frames) == 1 else None
                except (msgspec.DecodeError, ValueError, RecursionError):  # RecursionError: a deeply nested value
                    ack = None
                if ack is None or ack.transfer_id not in self._inflight:
                    self._warn_dropped("dropping unexpected ack from a peer (%d frames)", len(frames))
                    continue
                self._acks.append(TransferResult(ack.transfer_id, ack.ok, ack.error or None))
        out, self._acks = self._acks, []
        return out

    def _release_send(self, transfer_id: str) -> None:
        self._inflight.pop(transfer_id, None)

    def _wait_sent(self, seconds: float) -> None:
        self._send_poller.poll(max(1, int(seconds * 1000)))

    # --- receiver -------------------------------------------------------------------------------------------
    def _progress_received(self) -> list[TransferResult]:
        out = []
        while True:
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            ident, rest = frames[0].bytes, frames[1:]
            tid, error = self._receive(rest)
            if tid is None:
                continue  # undecodable: nobody to answer
            self._router.send_multipart([ident, _encoder.encode(Ack(tid, error is None, error or ""))])
            if error is None:
                out.append(TransferResult(tid, True))
            elif tid in self._recv_deadlines:  # an expected transfer that was refused: fail it now
                out.append(TransferResult(tid, False, error))

    def _receive(self, frames) -> tuple[str | None, str | None]:
        """Validate and copy one message into the pool. Returns (transfer_id or None, error or None)."""
        if len(frames) != self._frames:
            self._warn_dropped("dropping a message of %d frames (expected header + data%s)", len(frames),
                               " + state" if self._frames == 3 else "")
            return None, None
        try:
            h = _header_decoder.decode(frames[0].buffer)
        except (msgspec.DecodeError, ValueError, RecursionError) as e:  # invalid UTF-8 raises UnicodeDecodeError
            # and a deeply nested value (even in an ignored trailing element) RecursionError: uncaught, it ended the
            # worker's main loop
            self._warn_dropped("dropping a message with a malformed header: %s", e)
            return None, None
        n = len(h.dst_block_ids)
        expected_shape = (self._planes, self._shape_tail[0], n, *self._shape_tail[1:])
        payload = frames[1].buffer
        if not self.is_expected(h.transfer_id):
            # late, cancelled or never asked for: the blocks it names may hold another sequence's KV by now
            error = "not expected (it arrived after the receiver's deadline, was cancelled, or was never asked for)"
        elif h.dtype != self.layout.dtype or tuple(h.shape) != expected_shape:
            error = f"shape/dtype {h.shape}/{h.dtype} does not match {expected_shape}/{self.layout.dtype}"
        elif payload.nbytes != (want := math.prod(expected_shape) * self.layout.itemsize):
            error = f"payload has {payload.nbytes} bytes, header implies {want}"
        elif n == 0 or min(h.dst_block_ids) < 0 or max(h.dst_block_ids) >= self.num_blocks:
            error = f"dst block ids out of range [0, {self.num_blocks})"
        elif len(set(h.dst_block_ids)) != n:
            error = "dst block ids repeat"
        elif self._frames == 3 and frames[2].buffer.nbytes != self.layout.state_bytes:
            error = f"state frame has {frames[2].buffer.nbytes} bytes, the layout {self.layout.state_bytes}"
        else:
            data = _tensor(payload, h.dtype).view(expected_shape).to(self.pool.device)
            idx = torch.tensor(h.dst_block_ids, dtype=torch.int64, device=self.pool.device)
            self.pool.index_copy_(2, idx, data)
            if self._frames == 3:
                self.state_pool[h.dst_block_ids[0]].copy_(_tensor(frames[2].buffer, "float32"))
            return h.transfer_id, None
        if h.transfer_id in self._recv_deadlines:  # one of ours, refused: worth a line each
            log.warning("refusing transfer %s: %s", h.transfer_id, error)
        else:
            self._warn_dropped("refusing transfer %.100r: %s", h.transfer_id, error)
        return h.transfer_id, error

    def _warn_dropped(self, fmt: str, *args):
        """Log what a stranger (or a late peer) sent, rate-limited: anyone who reaches the port can send a flood, and
        one line per message would be a flood in the log."""
        self._num_dropped += 1
        if worth_logging(self._num_dropped):
            log.warning(fmt + " (%d dropped so far)", *args, self._num_dropped)

    def _wait_received(self, seconds: float) -> None:
        self._recv_poller.poll(max(1, int(seconds * 1000)))

    def close(self) -> None:
        if self._ctx.closed:
            return
        super().close()
        self._inflight.clear()
        self._router.close()
        self._ctx.term()
