"""The engine's options, each with its default and its help: the one source of EngineConfig's fields and of the
worker flags that set them (common/cluster/flags.py generates those).

Torch-free, like the worker command line and the launcher that read it; EngineConfig (common/engine/config.py)
adds the checks, the model's HF config and the torch dtype.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field


def option(default, help: str, **flag):
    """An engine option: its default, its --help text, and where the worker flag is not the plain one made of the
    name, how it differs: flag (its spelling), type (how its text is read), choices."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class EngineArgs:
    model: str | None = option(None, "HF folder, .gguf file or the default model's name")
    dtype: str = option("auto", "weights and KV cache (auto: $NANO_PD_DTYPE if set; on a CPU bfloat16 where it is "
                        "native, else float32; on a GPU the checkpoint's dtype)",
                        choices=("auto", "float32", "bfloat16", "float16"))
    quantization: str = option(
        "auto", "weights: int4 (a GGUF's own Q4_0/Q4_1 blocks, a float checkpoint's linears quantized at load), "
                "none (the float weights; a GGUF dequantized), auto (int4 for a GGUF in bfloat16, else none)",
        choices=("auto", "none", "int4"))
    int4_float_copy: bool = option(
        True, "int4 linears keep only their int4 weight (by default they also keep a oneDNN-packed bf16 copy for "
              "steps of more than a few rows: prefill and large batches run faster, at two bytes a weight)",
        flag="--no-int4-float-copy")
    quantization_group_size: int = option(32, "inputs per int4 group of a float checkpoint (32, 64, 128 or 256)")
    block_size: int = option(16, "tokens per KV block")
    max_num_seqs: int = option(256, "sequences running at once at the most")
    max_num_batched_tokens: int = option(2048, "tokens one engine step computes at the most")
    max_model_len: int | None = option(None, "longest sequence, prompt included (default: the model's limit)")
    num_kv_blocks: int | None = option(None, "KV blocks in the pool (overrides --kv-cache-memory-gb)")
    kv_cache_memory_gb: float = option(1.0, "GB of memory for the KV pool")
    enable_prefix_caching: bool = option(True, "do not reuse the cached KV blocks of a shared prompt prefix",
                                         flag="--no-prefix-caching")
    seed: int = option(0, "torch's random seed, set when the model is built")
    speculative_config: dict | None = option(
        None, 'JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\' (decode workers)', type=json.loads)
    device: str = option("cpu", '"cpu", or "cuda" / "cuda:N" on a GPU machine')
    # EngineConfig also takes "cuda_graph" (on a CUDA device); the flag offers the CPU's modes
    decode_mode: str = option("auto", "decode-only steps: torch.compile'd or eager (auto: compiled on CPU, "
                              "unless $NANO_PD_DECODE_MODE says eager, or the compile fails)",
                              choices=("auto", "eager", "compile"))
    tensor_parallel_size: int = option(
        1, "processes sharing the model's weights and KV heads (torch.distributed: gloo / NCCL)")
    enable_expert_parallel: bool = option(
        False, "MoE: shard whole experts across the tensor-parallel ranks instead of slicing each")
    threads: int = option(0, "torch threads (0: torch's default)")
