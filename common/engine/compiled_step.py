"""Decode-only steps without eager overhead: torch.compile on CPU, CUDA-graph replay on GPU.

A decode step runs the same few hundred small kernels every time, so at small batch sizes the Python and dispatch
cost of eager mode is a large part of it. Prefill and mixed batches (and speculative verification, which queries
several tokens per sequence) always run eager.

- "compile" (CPU, the default there): one decoder layer torch.compile'd with dynamic batch size and context
  length, called by every layer (regional compilation: the layers' weights are inputs of the graph, so a model
  of 30 identical layers traces and compiles one; the embedding and the final norm stay eager). Dynamo
  specialises batch size 1, so there are two graphs per kind of layer (batch 1, batch >= 2), compiled while the
  engine starts (ModelRunner), never per step; bucketing by batch size would only add compiles and padding.
  Inductor's cache lives in nano-pd's cache folder, so a restart loads the generated code instead of generating
  it again. On SmolLM2 (Zen 4) compiling the whole model took 79 s with an empty cache and 11-14 s with a warm
  one (dynamo traces every layer on every start, whatever the cache holds); one layer takes 22 s and 3 s, for
  the same forward time. Attention goes through the opaque `nano_pd::paged_decode` op, so the compiled code
  never copies the KV pool, and the prepacked and int4 matmuls through opaque ops of their own
  (common/layers/opaque_ops.py).
- "cuda_graph" (GPU): one graph per batch-size bucket, captured on first use with static input buffers sized for
  the longest context; a smaller batch is padded to its bucket, the padding rows writing their K/V into the
  runner's scratch block. UNVERIFIED: written for a GPU and not yet run on one (README says so).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from common.cache import cache_root
from common.layers.attention import AttentionMetadata, KernelInputs

MODES = ("auto", "eager", "compile", "cuda_graph")


# What decode_mode=auto means on a CPU can be pinned for a whole deployment or a test suite (whose engines would
# otherwise each compile at construction)
AUTO_MODE_ENV = "NANO_PD_DECODE_MODE"


def resolve_mode(mode: str, device: torch.device) -> str:
    if mode == "auto":
        return "cuda_graph" if device.type == "cuda" else os.environ.get(AUTO_MODE_ENV) or "compile"
    return mode


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to max_batch (as vLLM captures)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


def _decode_layer(layer, positions, x, slot_mapping, block_tables, mask, kernel_tables, context_lens):
    kernel = None if context_lens is None else KernelInputs(kernel_tables, context_lens, None, None, None)
    meta = AttentionMetadata(slot_mapping=slot_mapping, num_decode=x.shape[0],
                             decode_block_tables=block_tables, decode_mask=mask, opaque=True, kernel=kernel)
    return layer(positions, x, meta)


class CompiledDecode:
    """Callable like the model's forward, for batches whose every query is one decode token."""

    def __init__(self, model, mode: str, max_batch: int, max_blocks: int, block_size: int, scratch_slot: int | None):
        self.model, self.mode, self.max_batch = model, mode, max_batch
        self.max_blocks, self.block_size, self.scratch_slot = max_blocks, block_size, scratch_slot
        if mode == "compile":
            # inductor's caches (FX graphs, generated kernels) default to /tmp, which a reboot or a new container
            # empties; kept with nano-pd's other caches, a restarted worker loads its compiled steps in seconds
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
            self._layer_step = torch.compile(_decode_layer, dynamic=True)
        elif mode == "cuda_graph":
            if scratch_slot is None:
                raise ValueError("CUDA-graph decode needs a scratch slot for padding rows")
            self.buckets = batch_buckets(max_batch)
            self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}
            self._pool = None
        else:
            raise ValueError(f"unknown compiled decode mode {mode!r}")

    def _forward(self, input_ids, positions, *attention):
        body = self.model.model  # every model here is a LlamaModel: embedding, decoder layers, final norm
        x = body.embed_tokens(input_ids)
        for layer in body.layers:
            x = self._layer_step(layer, positions, x, *attention)
        return body.norm(x)

    def supports(self, meta: AttentionMetadata) -> bool:
        return not meta.prefills and 0 < meta.num_decode <= self.max_batch

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.mode == "compile":
            tables, mask, kin = meta.decode_block_tables, meta.decode_mask, meta.kernel
            kernel_tables, lens = (kin.decode_block_tables, kin.decode_context_lens) if kin else (None, None)
            if tables.shape[1] == 1:  # dynamo specialises size-1 dims: a one-block context would get its own graph
                tables = F.pad(tables, (0, 1))
                mask = F.pad(mask, (0, self.block_size))
                kernel_tables = None if kernel_tables is None else F.pad(kernel_tables, (0, 1))
            return self._forward(input_ids, positions, meta.slot_mapping, tables, mask, kernel_tables, lens)
        return self._replay(input_ids, positions, meta)

    # --- CUDA graphs --------------------------------------------------------------------------------------------
    def _replay(self, input_ids, positions, meta):
        n = input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        if bucket not in self._graphs:
            self._capture(bucket, input_ids.device)
        graph, buf, out = self._graphs[bucket]
        width = meta.decode_block_tables.shape[1]
        buf["input_ids"][:n].copy_(input_ids)
        buf["positions"][:n].copy_(positions)
        buf["slot_mapping"][:n].copy_(meta.slot_mapping)
        buf["slot_mapping"][n:].fill_(self.scratch_slot)
        buf["block_tables"].zero_()
        buf["block_tables"][:n, :width].copy_(meta.decode_block_tables)
        buf["block_tables"][n:, 0].fill_(self.scratch_slot // self.block_size)
        buf["mask"].zero_()
        buf["mask"][:n, ..., :width * self.block_size].copy_(meta.decode_mask)
        buf["mask"][n:, ..., 0] = True  # a padding row attends its own scratch slot, so its softmax is defined
        graph.replay()
        return out[:n]

    def _capture(self, bucket: int, device: torch.device):
        context = self.max_blocks * self.block_size
        buf = {"input_ids": torch.zeros(bucket, dtype=torch.long, device=device),
               "positions": torch.zeros(bucket, dtype=torch.long, device=device),
               "slot_mapping": torch.full((bucket,), self.scratch_slot, dtype=torch.long, device=device),
               "block_tables": torch.full((bucket, self.max_blocks), self.scratch_slot // self.block_size,
                                          dtype=torch.long, device=device),
               "mask": torch.zeros(bucket, 1, 1, context, dtype=torch.bool, device=device)}
        buf["mask"][..., 0] = True

        def forward():
            meta = AttentionMetadata(slot_mapping=buf["slot_mapping"], num_decode=bucket,
                                     decode_block_tables=buf["block_tables"], decode_mask=buf["mask"])
            return self.model(buf["input_ids"], buf["positions"], meta)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()  # allocator and library warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = forward()
        self._pool = graph.pool()
        self._graphs[bucket] = (graph, buf, out)
