"""Owns the model and its paged KV pool; turns a scheduled batch into one forward pass and samples."""
import math

import torch

from common.compiled_step import CompiledDecode, resolve_mode
from common.config import EngineConfig
from common.layers.attention import AttentionMetadata, PrefillChunk
from common.layers.sampler import sample
from common.loader import load_weights
from common.models import model_class
from common.sequence import Sequence
from kv_transfer.layout import PAGED_KV, PLANES


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = torch.device(config.device)
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
        self.model.eval()
        self.block_size = config.block_size
        layers = self.model.attention_layers()
        first = layers[0]
        # what a token leaves in the cache: K and V planes, or (MLA) one plane holding the compressed latent
        planes = PLANES[getattr(self.model, "kv_cache_kind", PAGED_KV)]
        token_shape = (planes, len(layers), first.num_kv_heads, first.head_dim)
        self.num_blocks = config.num_kv_blocks or self._blocks_for_budget(config.kv_cache_memory_gb, token_shape)
        self.decode_mode = resolve_mode(config.decode_mode, self.device)
        # CUDA-graph padding rows write into one scratch block past those the block manager hands out
        scratch = 1 if self.decode_mode == "cuda_graph" else 0
        # one pool for every layer, so a transfer engine can register it once
        self.kv_pool = torch.zeros(planes, len(layers), self.num_blocks + scratch, self.block_size,
                                   first.num_kv_heads, first.head_dim, dtype=config.torch_dtype, device=self.device)
        for i, attn in enumerate(layers):
            # a latent pool's single plane is MLA's keys and (its first kv_lora_rank dims) its values
            attn.k_cache, attn.v_cache = self.kv_pool[0, i], self.kv_pool[planes - 1, i]
        self.decode_step = None
        if self.decode_mode != "eager":
            self.decode_step = CompiledDecode(
                self.model, self.decode_mode, max_batch=config.max_num_seqs,
                max_blocks=-(-config.max_model_len // self.block_size), block_size=self.block_size,
                scratch_slot=self.num_blocks * self.block_size if scratch else None)

    def _blocks_for_budget(self, gigabytes: float, token_shape: tuple[int, ...]) -> int:
        per_token = math.prod(token_shape)
        per_block = per_token * self.block_size * torch.empty(0, dtype=self.config.torch_dtype).element_size()
        return max(1, int(gigabytes * 2**30 // per_block))

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, scheduled: list[tuple[Sequence, int]]):
        """Flattened token ids, positions and attention metadata; single-token queries first."""
        decodes = [(s, n) for s, n in scheduled if n == 1]
        prefills = [(s, n) for s, n in scheduled if n > 1]
        ordered = decodes + prefills
        input_ids, positions, slots = [], [], []
        for seq, n in ordered:
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(self._slots(seq, start, start + n))
        dev = self.device
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev))
        if decodes:
            width = max(len(s.block_table) for s, _ in decodes)
            tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s, _ in decodes],
                                  dtype=torch.long, device=dev)
            context = torch.tensor([s.num_computed_tokens + 1 for s, _ in decodes], device=dev)
            meta.num_decode = len(decodes)
            meta.decode_block_tables = tables
            meta.decode_mask = (torch.arange(width * self.block_size, device=dev)[None, :]
                                < context[:, None]).view(len(decodes), 1, 1, -1)
        offset = len(decodes)
        for seq, n in prefills:
            cached = seq.num_computed_tokens
            table = None
            if cached:
                num_blocks = -(-(cached + n) // self.block_size)
                table = torch.tensor(seq.block_table[:num_blocks], dtype=torch.long, device=dev)
            meta.prefills.append(PrefillChunk(offset, offset + n, cached + n, table))
            offset += n
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
        return (torch.tensor(input_ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev), meta, sample_rows, sample_seqs,
                sample_positions)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]):
        """One forward pass; returns the sequences that sampled, their tokens and logprobs entries."""
        input_ids, positions, meta, rows, seqs, sample_positions = self.prepare(scheduled)
        if self.decode_step is not None and self.decode_step.supports(meta):
            hidden = self.decode_step(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, meta)
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
