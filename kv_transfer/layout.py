"""What a KV pool looks like, so two workers can check they agree before one writes into the other's memory.

The layout describes one *block* of the pool (all layers, K and V), never the number of blocks: P and D size
their pools independently, and block ids are only meaningful on the side that owns them.
"""
from __future__ import annotations

import hashlib

import msgspec

PAGED_KV = "paged_kv"  # the only kind transports move today; "paged_latent" / "state" arrive with other issues

# torch dtype -> wire name, kept here so the layout never needs torch to be decoded (the router reads it too)
_DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


class KVLayoutMismatch(ValueError):
    """Two pools cannot exchange blocks; the message names every differing field."""


class KVLayout(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    # one entry per layer; empty means "all paged_kv" and is filled in below so equal layouts hash equal
    kinds: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.kinds:
            msgspec.structs.force_setattr(self, "kinds", (PAGED_KV,) * self.num_layers)
        if len(self.kinds) != self.num_layers:
            raise ValueError(f"kinds has {len(self.kinds)} entries for {self.num_layers} layers")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_pool(cls, pool, model_name: str) -> "KVLayout":
        """pool: [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim] (0 = K, 1 = V)."""
        if pool.dim() != 6 or pool.shape[0] != 2:
            raise ValueError(f"expected a [2, L, blocks, block_size, heads, head_dim] pool, got {tuple(pool.shape)}")
        dtype = _DTYPE_NAMES.get(str(pool.dtype))
        if dtype is None:
            raise ValueError(f"unsupported KV dtype {pool.dtype}")
        _, layers, _, block_size, heads, head_dim = pool.shape
        return cls(model=model_name, dtype=dtype, block_size=block_size, num_layers=layers,
                   num_kv_heads=heads, head_dim=head_dim)

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one (K or V, layer, block) slab: the unit a scattered transfer is made of."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes one block occupies across all layers, K and V."""
        return 2 * self.num_layers * self.chunk_bytes

    def compat_hash(self) -> str:
        """Stable across processes and Python versions: JSON of the fields in declaration order."""
        return hashlib.sha256(msgspec.json.encode(self)).hexdigest()[:16]

    def check_pool(self, pool) -> None:
        """Raise if `pool` does not have this layout (a transport is built from both, they must agree)."""
        check_compatible(self, KVLayout.from_pool(pool, self.model))


def check_compatible(local: KVLayout, remote: KVLayout) -> None:
    """Raise KVLayoutMismatch naming each differing field; return None when blocks can move between them."""
    diffs = [f"{f}: local={getattr(local, f)!r} remote={getattr(remote, f)!r}"
             for f in local.__struct_fields__ if getattr(local, f) != getattr(remote, f)]
    if diffs:
        raise KVLayoutMismatch("KV layouts are incompatible: " + "; ".join(diffs))
