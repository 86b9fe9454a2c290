"""What rank 0 sends the other tensor-parallel ranks: one command per forward or block move (msgspec, never pickle)."""
from __future__ import annotations

import msgspec
import torch

from common.layers.attention import AttentionMetadata, PrefillChunk


class TensorParallelError(RuntimeError):
    """A rank died or never joined; the engine cannot run a forward without it."""


class WireTensor(msgspec.Struct, array_like=True):
    dtype: str
    shape: list[int]
    data: bytes


class Forward(msgspec.Struct, tag="forward", array_like=True):
    input_ids: WireTensor
    positions: WireTensor
    slot_mapping: WireTensor
    num_decode: int
    decode_block_tables: WireTensor | None
    decode_mask: WireTensor | None
    prefills: list[tuple[int, int, int, WireTensor | None]]  # start, end, context_len, block table
    logit_rows: list[int]  # rows whose logits rank 0 samples from (the LM head gathers them across ranks)


class MoveBlocks(msgspec.Struct, tag="move_blocks", array_like=True):
    block_ids: list[int]
    to_exchange: bool  # True: shards -> rank 0's exchange pool (export); False: the reverse (import)


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


Command = Forward | MoveBlocks | Shutdown


def _to_wire(t: torch.Tensor) -> WireTensor:
    t = t.detach().to("cpu").contiguous()
    return WireTensor(str(t.dtype).removeprefix("torch."), list(t.shape), t.numpy().tobytes())


def _from_wire(w: WireTensor, device: torch.device) -> torch.Tensor:
    dtype = getattr(torch, w.dtype)
    if not w.data:
        return torch.empty(w.shape, dtype=dtype, device=device)
    return torch.frombuffer(bytearray(w.data), dtype=dtype).reshape(w.shape).to(device)


def forward_command(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                    logit_rows: list[int]) -> Forward:
    def opt(t):
        return None if t is None else _to_wire(t)

    return Forward(_to_wire(input_ids), _to_wire(positions), _to_wire(meta.slot_mapping), meta.num_decode,
                   opt(meta.decode_block_tables), opt(meta.decode_mask),
                   [(c.start, c.end, c.context_len, opt(c.block_table)) for c in meta.prefills], logit_rows)


def forward_inputs(cmd: Forward, device: torch.device):
    """(input_ids, positions, meta, logit_rows) exactly as rank 0 ran them."""
    def opt(w):
        return None if w is None else _from_wire(w, device)

    meta = AttentionMetadata(slot_mapping=_from_wire(cmd.slot_mapping, device), num_decode=cmd.num_decode,
                             decode_block_tables=opt(cmd.decode_block_tables), decode_mask=opt(cmd.decode_mask),
                             prefills=[PrefillChunk(s, e, n, opt(t)) for s, e, n, t in cmd.prefills])
    return _from_wire(cmd.input_ids, device), _from_wire(cmd.positions, device), meta, cmd.logit_rows
