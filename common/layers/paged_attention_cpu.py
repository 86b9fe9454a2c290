"""CPU paged attention that reads K/V where they lie in the block pool (no gather copy), with its torch reference.

    paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale) -> out
        q [n, H, D]; k_cache, v_cache [num_blocks, block_size, KVH, D]; block_tables [n, max_blocks] int32;
        context_lens [n] int32 (cached tokens the query sees, its own included); out [n, H, D], q's dtype.
    paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale) -> out
        q [T, H, D] (all chunks concatenated); cu_seqlens_q [S+1] int32; context_lens [S] int32 (cached tokens +
        this chunk, whose K/V are already in the cache); query i of sequence s sits at position
        context_lens[s] - n_new_s + i and sees keys 0..that position. block_tables [S, max_blocks].

Head h reads kv head h // (H // KVH). Block-table entries past a sequence's blocks are never read (any value).

The kernels are a C++/OpenMP extension (csrc/paged_attention.cpp) built just-in-time on first use with
torch.utils.cpp_extension and cached on disk under common.cache's root (torch_extensions/ in ~/.cache/nano-pd or
$NANO_PD_CACHE), in a folder named by a hash of the source, the compiler flags and the torch
version, so a stale build is never reused. The instruction set comes from /proc/cpuinfo: AVX-512 (avx512f/bw/vl),
else AVX2+FMA, else a portable path; never -march=native. NANO_PD_PAGED_ATTENTION_ISA=avx2|portable forces a
lower one, =off disables the kernels. They are registered as torch.library ops (nano_pd::paged_attention_decode,
nano_pd::paged_attention_prefill, with fake kernels), so compiled code calls them without graph breaks; call
available() once before compiling so the build does not happen while tracing.

fp32 and bf16 go to the kernels (fp32 accumulation); anything else, non-CPU tensors, or a missing build fall back
to the pure-torch reference (*_ref), which is also what the tests compare against.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from pathlib import Path

import torch

from common.cache import cache_root

log = logging.getLogger(__name__)

# one library: the attention kernels, and quantized_linear.py's int4 weight expansion and int8 matmul
_SOURCES = [Path(__file__).resolve().parent / "csrc" / name
            for name in ("paged_attention.cpp", "int4_expand.cpp", "int8_linear.cpp")]
_ISA_ENV = "NANO_PD_PAGED_ATTENTION_ISA"
_ISAS = ("portable", "avx2", "avx512")
_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
    "portable": [],
}
_BASE_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]

STALE_LOCK_S = 300  # a cold build takes ~30 s on 2 cores
_lock = threading.Lock()
_state: bool | None = None  # None: not tried yet
_info: dict = {}


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detected_isa() -> str:
    """The widest vector path this CPU runs: avx512, avx2 or portable."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "portable"
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx2", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "portable"


def _chosen_isa() -> str:
    best = detected_isa()
    want = os.environ.get(_ISA_ENV, "").strip().lower()
    if want in _ISAS and _ISAS.index(want) < _ISAS.index(best):
        return want
    return best


def cache_dir() -> Path:
    return cache_root() / "torch_extensions"


def build_info() -> dict:
    """What available() found: isa, flags, library path, load seconds, built (compiled now) or the failure reason."""
    return dict(_info)


def _load() -> bool:
    if os.environ.get(_ISA_ENV, "").strip().lower() in ("off", "0", "none", "disable", "disabled"):
        log.warning("paged attention CPU kernels disabled by %s; using the torch reference", _ISA_ENV)
        _info["reason"] = f"disabled by {_ISA_ENV}"
        return False
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        isa = _chosen_isa()
        cflags = _BASE_FLAGS + _ISA_FLAGS[isa]
        ldflags = ["-fopenmp"]
        key = "\n".join([*(src.read_text() for src in _SOURCES), " ".join(cflags), " ".join(ldflags),
                         torch.__version__, platform.machine()])
        name = f"nano_pd_paged_attention_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        build_dir = cache_dir() / name
        lib = build_dir / f"{name}.so"
        _info.update(isa=isa, flags=cflags, name=name, path=str(lib))
        loaded = False
        # the name pins source, flags and torch, so a finished build is current; while another process builds
        # (its lock file exists) cpp_extension.load below waits for it, unless the lock is far older than a build
        # takes: its builder died (a killed process), and waiting would be forever
        lock = build_dir / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            log.warning("removing the stale build lock %s", lock)
            lock.unlink(missing_ok=True)
        if lib.exists() and not lock.exists():
            try:
                torch.ops.load_library(str(lib))
                loaded, _info["built"] = True, False
            except OSError:  # a torn or foreign file: rebuild below
                loaded = False
        if not loaded:
            cxx = os.environ.get("CXX", "c++")
            if shutil.which(cxx) is None:
                raise RuntimeError(f"no C++ compiler ({cxx!r} not found)")
            build_dir.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(name=name, sources=[str(src) for src in _SOURCES], extra_cflags=cflags,
                               extra_ldflags=ldflags, build_directory=str(build_dir), is_python_module=False, verbose=False)
            _info["built"] = True
        got = torch.ops.nano_pd.paged_attention_isa()
        if got != isa:
            raise RuntimeError(f"the build targets {got!r}, expected {isa!r}")
        _register_fakes()
    except Exception as e:  # noqa: BLE001 - any failure means: use the reference
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        errs = [ln for ln in lines if "error" in ln.lower()]
        reason = (errs[0] if errs else lines[0] if lines else type(e).__name__)[:300]
        _info["reason"] = reason
        log.warning("paged attention CPU kernels unavailable (%s: %s); using the torch reference",
                    type(e).__name__, reason)
        return False
    _info["load_s"] = time.perf_counter() - start
    return True


def available() -> bool:
    """Whether the C++ kernels are built and loaded (builds them on the first call; never raises)."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _load()
    return _state


def _register_fakes():
    @torch.library.register_fake("nano_pd::paged_attention_decode")
    def _(q, k_cache, v_cache, block_tables, context_lens, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("nano_pd::paged_attention_prefill")
    def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("nano_pd::int4_expand")
    def _(nibbles, scales, offsets, out):
        return None


def use_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the C++ kernels take these tensors (CPU, fp32/bf16, unit-stride rows, a build loaded)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and available())


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence attending to its first context_lens cached tokens: [n, H, D] -> [n, H, D]."""
    if use_kernel(q, k_cache, v_cache):
        return torch.ops.nano_pd.paged_attention_decode(q, k_cache, v_cache, _i32(block_tables), _i32(context_lens),
                                                        float(scale))
    return paged_attention_decode_ref(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Causal attention of all prefill chunks at once, keys read from the cache: [T, H, D] -> [T, H, D]."""
    if use_kernel(q, k_cache, v_cache):
        return torch.ops.nano_pd.paged_attention_prefill(q, k_cache, v_cache, _i32(block_tables), _i32(cu_seqlens_q),
                                                         _i32(context_lens), float(scale))
    return paged_attention_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)


# ---------------------------------------------------------------------------------------------------------------
# Pure-torch reference (fp32 math, output in q's dtype)
# ---------------------------------------------------------------------------------------------------------------

def paged_attention_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    n, H, D = q.shape
    bs, KVH = k_cache.shape[1], k_cache.shape[2]
    G = H // KVH
    lens = context_lens.to(device=q.device, dtype=torch.long)
    L = int(lens.max()) if n else 0
    if L == 0:
        return torch.zeros_like(q, memory_format=torch.contiguous_format)
    nb = -(-L // bs)
    col = torch.arange(nb, device=q.device)
    used = col[None, :] < ((lens + bs - 1) // bs)[:, None]
    bt = torch.where(used, block_tables[:, :nb].to(device=q.device, dtype=torch.long), 0)  # unused entries: block 0
    valid = torch.arange(L, device=q.device)[None, :] < lens[:, None]  # [n, L]
    k = k_cache[bt].flatten(1, 2)[:, :L].float().masked_fill(~valid[:, :, None, None], 0.0)  # [n, L, KVH, D]
    v = v_cache[bt].flatten(1, 2)[:, :L].float().masked_fill(~valid[:, :, None, None], 0.0)
    s = torch.einsum("nkgd,nlkd->nkgl", q.float().reshape(n, KVH, G, D), k) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).masked_fill((lens == 0)[:, None, None, None], 0.0)
    o = torch.einsum("nkgl,nlkd->nkgd", p, v)
    return o.reshape(n, H, D).to(q.dtype)


def paged_attention_prefill_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                                scale: float) -> torch.Tensor:
    T, H, D = q.shape
    bs, KVH = k_cache.shape[1], k_cache.shape[2]
    G = H // KVH
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    cu, ctx = cu_seqlens_q.tolist(), context_lens.tolist()
    for s in range(len(ctx)):
        a, b, L = cu[s], cu[s + 1], ctx[s]
        n_new = b - a
        if n_new == 0:
            continue
        blocks = block_tables[s, :-(-L // bs)].to(device=q.device, dtype=torch.long)
        k = k_cache[blocks].flatten(0, 1)[:L].float()  # [L, KVH, D]
        v = v_cache[blocks].flatten(0, 1)[:L].float()
        sc = torch.einsum("ikgd,lkd->kgil", q[a:b].float().reshape(n_new, KVH, G, D), k) * scale
        pos = torch.arange(L - n_new, L, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] <= pos[:, None]  # [n_new, L]
        p = torch.softmax(sc.masked_fill(~mask, float("-inf")), dim=-1)
        out[a:b] = torch.einsum("kgil,lkd->ikgd", p, v).reshape(n_new, H, D).to(q.dtype)
    return out
