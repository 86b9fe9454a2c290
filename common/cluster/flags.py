"""The worker command line: the flags both worker roles take, and the engine arguments they give."""
from __future__ import annotations

import argparse
import json
import logging


def add_worker_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--router", required=True, help="HOST:PORT of the router's control endpoint")
    ap.add_argument("--model", default=None, help="HF folder, .gguf file or the default model's name")
    ap.add_argument("--served-model-name", default=None, help="the model name clients use (default: from --model)")
    ap.add_argument("--name", default=None, help="worker name prefix (the pid is appended)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind the worker's sockets on")
    ap.add_argument("--advertise-host", default=None, help="address peers use to reach this worker (default --host)")
    ap.add_argument("--kv-transport", default="auto", choices=["auto", "nixl", "zmq"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--speculative-config", type=json.loads, default=None,
                    help='JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\' (decode workers)')
    ap.add_argument("--decode-mode", default="auto", choices=["auto", "eager", "compile"],
                    help="decode-only steps: torch.compile'd or eager (auto: eager on CPU)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="processes sharing the model's weights and KV heads (torch.distributed: gloo / NCCL)")
    ap.add_argument("--enable-expert-parallel", action="store_true",
                    help="MoE: shard whole experts across the tensor-parallel ranks instead of slicing each")
    ap.add_argument("--log-level", default="info")
    return ap


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig's arguments from the parsed worker flags."""
    return dict(model=args.model, dtype=args.dtype, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                kv_cache_memory_gb=args.kv_cache_memory_gb, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                enable_prefix_caching=not args.no_prefix_caching, speculative_config=args.speculative_config,
                decode_mode=args.decode_mode, tensor_parallel_size=args.tensor_parallel_size,
                enable_expert_parallel=args.enable_expert_parallel, threads=args.threads)


def setup_logging(role: str, args: argparse.Namespace):
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s {role} %(levelname)s %(message)s")
