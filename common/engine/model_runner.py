"""Owns the model and its paged KV pool; turns a scheduled batch into one forward pass and samples."""
import logging
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.engine.compiled_step import CompiledDecode, resolve_mode
from common.engine.config import EngineConfig
from common.engine.kv_cache import KVCache
from common.layers import paged_attention_cpu
from common.layers.attention import AttentionMetadata, KernelInputs, PrefillChunk, kernels_available
from common.engine.sampler import sample
from common.models.loader import load_weights
from common.layers.packed_linear import can_pack, prepack_linears
from common.layers.quantized_linear import INT8_ROWS
from common.parallel.state import tp_size
from common.models import model_class
from common.engine.sequence import Sequence
from common.sampling_params import SamplingParams
from common.parallel.ranks import TensorParallelRanks
from common.parallel.wire import Forward, MoveBlocks, TensorParallelError, forward_command, forward_inputs

log = logging.getLogger("nano_pd.runner")


class ModelRunner:
    def __init__(self, config: EngineConfig, lead: bool = True):
        """lead: this process schedules and samples; with tensor parallelism it is rank 0 and starts the other
        ranks, which build their runner with lead=False and only follow (common/parallel/ranks.py)."""
        self.config = config
        self.device = torch.device(config.device)
        if lead and config.threads:
            torch.set_num_threads(config.threads)
        if lead and dist.is_initialized():
            raise TensorParallelError("a tensor-parallel engine is still open in this process; close it first")
        self.ranks = TensorParallelRanks(config) if lead and config.tensor_parallel_size > 1 else None
        try:
            self._build(config, lead)
        except BaseException:
            self.close()
            raise

    def _build(self, config: EngineConfig, lead: bool):
        hf = config.hf_config
        torch.manual_seed(config.seed)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(config.torch_dtype)
        try:
            with torch.device(self.device):
                self.model = model_class(hf)(hf)
        finally:
            torch.set_default_dtype(default_dtype)
        load_weights(self.model, config.model)
        if config.quantization == "int4":
            self._quantize(config)
        self.model.eval()
        if self.device.type == "cpu":
            paged_attention_cpu.available()  # built or loaded now, not in the first step (nor while compiling)
        self.block_size = config.block_size
        has_state = hasattr(self.model, "state_layers") and bool(self.model.state_layers())
        self.decode_mode = resolve_mode(config.decode_mode, self.device)
        if has_state and self.decode_mode != "eager":
            # the compiled steps reach only the paged pool through an opaque op; the state is updated in place
            log.info("decode_mode %s does not cover recurrent-state layers; decoding eagerly", self.decode_mode)
            self.decode_mode = "eager"
        if tp_size() > 1 and self.decode_mode != "eager":
            # the collectives inside the layers would have to be traced (or captured) too; not verified yet
            log.info("decode_mode %s is not used with tensor parallelism; decoding eagerly", self.decode_mode)
            self.decode_mode = "eager"
        # CUDA-graph padding rows write into one scratch block past those the block manager hands out
        scratch = 1 if self.decode_mode == "cuda_graph" else 0
        self.kv = KVCache(self.model, config, lead, scratch)
        # eager float32 keeps F.linear: the packed kernel's summation order moves hybrid models' fp32 logits past
        # the parity tolerance, and the measured eager gain is bf16's
        if can_pack(config.torch_dtype, self.device) and (self.decode_mode == "compile"
                                                          or config.torch_dtype == torch.bfloat16):
            log.info("%d linear weights prepacked for oneDNN", prepack_linears(self.model, config.int4_float_copy))
        self.decode_step = None
        if self.decode_mode != "eager":
            self.decode_step = CompiledDecode(
                self.model, self.decode_mode, max_batch=config.max_num_seqs,
                max_blocks=-(-config.max_model_len // self.block_size), block_size=self.block_size,
                scratch_slot=self.kv.num_blocks * self.block_size if scratch else None)
            if self.decode_mode == "compile" and lead:
                try:
                    self._compile_decode_steps(config.max_num_seqs)
                except Exception as e:  # noqa: BLE001 - inductor's failures have no common type (no compiler, ...)
                    if config.decode_mode != "auto":
                        raise
                    log.warning("compiling the decode step failed, decoding eagerly: %s", e)
                    self.decode_step, self.decode_mode = None, "eager"

    def _compile_decode_steps(self, max_batch: int):
        """Compile the decode step's graphs now, while the engine starts (a worker before it registers), not in the
        first requests' steps: batch 1 and a batch of two (dynamo's two graphs). A compile cached on disk loads in
        seconds. The dummy rows write their KV into block 0, which nothing holds yet."""
        start = time.perf_counter()
        batches = [b for b in (1, 2) if b <= max_batch]
        log.info("compiling the decode steps for batch sizes %s (cache %s: seconds when warm, tens of seconds "
                 "when empty)", batches, os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        for batch in batches:
            seqs = [Sequence([0, 0], SamplingParams(temperature=0.0, max_tokens=1)) for _ in range(batch)]
            for seq in seqs:
                seq.block_table, seq.num_computed_tokens = [0], 1
            self.run([(seq, 1) for seq in seqs])
        log.info("decode steps compiled for batch sizes %s in %.1f s", batches, time.perf_counter() - start)

    def _quantize(self, config: EngineConfig):
        from common.models.quantize import load_gguf_quantized, quantize_linears

        if config.gguf_file:
            count, int8_head = load_gguf_quantized(self.model, config.gguf_file, config.torch_dtype)
            source = "the GGUF's blocks"
            if int8_head:
                log.info("LM head: the GGUF's Q8_0 blocks for calls of up to %d rows", INT8_ROWS)
        else:
            count = quantize_linears(self.model, config.quantization_group_size, config.torch_dtype)
            source = f"quantized at load, groups of {config.quantization_group_size}"
        log.info("int4 weights (%s): %d linears; activations %s", source, count, config.dtype)

    def prepare(self, scheduled: list[tuple[Sequence, int]]):
        """Flattened token ids, positions and attention metadata; single-token queries first.

        Python touches each sequence once (its token slice and block table); positions and KV slots of every token
        come from tensor ops over one padded block-table matrix, never from a per-token loop."""
        decodes = [(s, n) for s, n in scheduled if n == 1]
        prefills = [(s, n) for s, n in scheduled if n > 1]
        ordered = decodes + prefills
        input_ids, starts, counts = [], [], []
        for seq, n in ordered:
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            starts.append(start)
            counts.append(n)
        bs = self.block_size
        width = max(len(s.block_table) for s, _ in ordered)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s, _ in ordered],
                              dtype=torch.long)
        counts_t = torch.tensor(counts)
        row = torch.repeat_interleave(torch.arange(len(ordered)), counts_t)  # each token's sequence
        first = torch.repeat_interleave(counts_t.cumsum(0) - counts_t, counts_t)  # its sequence's first row
        positions = torch.tensor(starts)[row] + torch.arange(len(input_ids)) - first
        slots = tables[row, positions // bs] * bs + positions % bs
        dev = self.device
        meta = AttentionMetadata(slot_mapping=slots.to(dev))
        if decodes:
            n = len(decodes)
            decode_width = max(len(s.block_table) for s, _ in decodes)
            context = positions[:n].to(dev) + 1
            meta.num_decode = n
            meta.decode_block_tables = tables[:n, :decode_width].to(dev)
            meta.decode_mask = (torch.arange(decode_width * bs, device=dev)[None, :]
                                < context[:, None]).view(n, 1, 1, -1)
        offset = len(decodes)
        for i, (seq, n) in enumerate(prefills, start=len(decodes)):
            cached = seq.num_computed_tokens
            table = tables[i, :-(-(cached + n) // bs)].to(dev) if cached else None
            meta.prefills.append(PrefillChunk(offset, offset + n, cached + n, table))
            offset += n
        if kernels_available(dev):  # else no step pays for inputs nothing reads
            meta.kernel = self._kernel_inputs(tables, torch.tensor(starts) + counts_t, counts_t, len(decodes), dev)
        # a sequence samples once all its tokens are computed; its logits come from its last token, and from each
        # draft position too when it verifies speculative tokens
        sample_rows, sample_seqs, sample_positions, offset = [], [], [], 0
        for seq, n in ordered:
            offset += n
            if seq.num_computed_tokens + n == seq.num_tokens:
                rows = 1 + seq.num_draft
                sample_rows.extend(range(offset - rows, offset))
                sample_seqs.extend([seq] * rows)
                sample_positions.extend(range(seq.num_tokens - rows + 1, seq.num_tokens + 1))
        return (torch.tensor(input_ids, dtype=torch.long, device=dev), positions.to(dev), meta, sample_rows,
                sample_seqs, sample_positions)

    @staticmethod
    def _kernel_inputs(tables: torch.Tensor, context_lens: torch.Tensor, counts: torch.Tensor,
                       num_decode: int, device: torch.device) -> KernelInputs:
        """The paged-attention kernels' view of the batch (decode rows first, then the prefill chunks), built on
        the CPU and moved to the device of the kernels that read it."""
        def int32(t):
            return t.to(device=device, dtype=torch.int32)

        chunks = counts[num_decode:]
        return KernelInputs(
            decode_block_tables=int32(tables[:num_decode]) if num_decode else None,
            decode_context_lens=int32(context_lens[:num_decode]) if num_decode else None,
            prefill_block_tables=int32(tables[num_decode:]) if len(chunks) else None,
            cu_seqlens_q=int32(F.pad(chunks.cumsum(0), (1, 0))) if len(chunks) else None,
            prefill_context_lens=int32(context_lens[num_decode:]) if len(chunks) else None)

    def _forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        if self.decode_step is not None and self.decode_step.supports(meta):
            return self.decode_step(input_ids, positions, meta)
        return self.model(input_ids, positions, meta)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]):
        """One forward pass; returns the sequences that sampled, their tokens and logprobs entries."""
        input_ids, positions, meta, rows, seqs, sample_positions = self.prepare(scheduled)
        if self.ranks is not None:
            self.ranks.send(forward_command(input_ids, positions, meta, rows))
        hidden = self._forward(input_ids, positions, meta)
        if not seqs:
            return [], [], []
        logits = self.model.compute_logits(hidden[rows]).float()
        constrained = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if constrained:
            from common.grammar import allocate_bitmask, apply_bitmask

            bitmask = allocate_bitmask(len(seqs), logits.shape[1])
            for i in constrained:
                seqs[i].grammar.fill_bitmask(bitmask, i)
            apply_bitmask(logits, bitmask, constrained)
        tokens, logprobs = sample(logits, seqs, sample_positions)
        return seqs, tokens, logprobs

    @torch.inference_mode()
    def follow(self, cmd: Forward | MoveBlocks):
        """A rank > 0: run what rank 0 runs (its logits are gathered to every rank; rank 0 alone samples)."""
        if isinstance(cmd, MoveBlocks):
            return self.kv.move_blocks(cmd.block_ids, cmd.to_exchange)
        input_ids, positions, meta, rows = forward_inputs(cmd, self.device)
        hidden = self._forward(input_ids, positions, meta)
        if rows:
            self.model.compute_logits(hidden[rows])

    def export_blocks(self, block_ids: list[int]):
        """Before a KV transport reads these blocks from kv.exchange_pool: bring every rank's heads into it."""
        self._lead_move_blocks(block_ids, to_exchange=True)

    def import_blocks(self, block_ids: list[int]):
        """After a KV transport wrote these blocks into kv.exchange_pool: hand each rank its heads."""
        self._lead_move_blocks(block_ids, to_exchange=False)

    def _lead_move_blocks(self, block_ids: list[int], to_exchange: bool):
        if self.ranks is not None and block_ids:  # one rank: the exchange pool is the KV pool itself
            self.ranks.send(MoveBlocks(list(block_ids), to_exchange))
            self.kv.move_blocks(block_ids, to_exchange)

    def close(self):
        if self.ranks is not None:
            self.ranks.close()
            self.ranks = None
