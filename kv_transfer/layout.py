"""What a KV pool looks like, so two workers can check they agree before one writes into the other's memory.

The layout describes one *block* of the pool (all planes and layers), never the number of blocks: P and D size
their pools independently, and block ids are only meaningful on the side that owns them.

A pool is [planes, num_layers, num_blocks, block_size, num_kv_heads, head_dim]. What a plane holds is the cache
kind: "paged_kv" has two (K and V); "paged_latent" (MLA, DeepSeek-V2/V3) has one, a single vector per token (the
compressed latent followed by the roped shared key), described as num_kv_heads=1, head_dim=its width.

A hybrid model (Qwen3-Next) also keeps a per-sequence state that is not paged ("recurrent_state": its linear
layers' conv inputs and delta states, float32): a second tensor [num_blocks, state_bytes / 4] with one slot per
block id, of which a sequence uses its first block's. A hand-off moves the blocks and that one slot.
"""
from __future__ import annotations

import hashlib

import msgspec

from common.cache_kinds import PAGED_KV, PLANES, RECURRENT_STATE

_KIND_OF_PLANES = {planes: kind for kind, planes in PLANES.items()}

# torch dtype -> wire name, kept here so the layout never needs torch to be decoded (the router reads it too)
_DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


class KVLayoutMismatch(ValueError):
    """Two pools cannot exchange blocks; the message names every differing field."""


class KVLayout(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    model: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    # one entry per layer; empty means "all paged_kv" and is filled in below so equal layouts hash equal
    kinds: tuple[str, ...] = ()
    # the per-sequence state beside the pool ("" and 0 without one; left out of the encoding then, so a layout
    # without state hashes as it did before states existed)
    state_kind: str = ""
    state_bytes: int = 0

    def __post_init__(self):
        if not self.kinds:
            msgspec.structs.force_setattr(self, "kinds", (PAGED_KV,) * self.num_layers)
        if len(self.kinds) != self.num_layers:
            raise ValueError(f"kinds has {len(self.kinds)} entries for {self.num_layers} layers")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.state_kind not in ("", RECURRENT_STATE) or (self.state_kind == "") != (self.state_bytes == 0) \
                or self.state_bytes < 0:
            raise ValueError(f"bad state {self.state_kind!r} of {self.state_bytes} bytes")

    @classmethod
    def from_pool(cls, pool, model_name: str, state_pool=None) -> "KVLayout":
        """pool: [planes, num_layers, num_blocks, block_size, num_kv_heads, head_dim]; the plane count is the kind.
        state_pool: [num_blocks, n] float32, one per-sequence state slot per block id, or None."""
        kind = _KIND_OF_PLANES.get(pool.shape[0]) if pool.dim() == 6 else None
        if kind is None:
            raise ValueError(f"expected a [planes (2 = K/V, 1 = latent), L, blocks, block_size, heads, head_dim] "
                             f"pool, got {tuple(pool.shape)}")
        dtype = _DTYPE_NAMES.get(str(pool.dtype))
        if dtype is None:
            raise ValueError(f"unsupported KV dtype {pool.dtype}")
        _, layers, num_blocks, block_size, heads, head_dim = pool.shape
        state = {}
        if state_pool is not None:
            if state_pool.dim() != 2 or state_pool.shape[0] != num_blocks or str(state_pool.dtype) != "torch.float32":
                raise ValueError(f"expected a float32 [{num_blocks} slots, n] state pool, got "
                                 f"{tuple(state_pool.shape)} {state_pool.dtype}")
            state = dict(state_kind=RECURRENT_STATE, state_bytes=state_pool.shape[1] * 4)
        return cls(model=model_name, dtype=dtype, block_size=block_size, num_layers=layers,
                   num_kv_heads=heads, head_dim=head_dim, kinds=(kind,) * layers, **state)

    @property
    def num_planes(self) -> int:
        """Planes of the one pool this layout describes; every layer must share a kind the transports know."""
        kinds = set(self.kinds)
        if len(kinds) != 1 or not kinds <= PLANES.keys():
            raise ValueError(f"no transport moves a pool of kinds {sorted(kinds)} (supported: one of "
                             f"{sorted(PLANES)} for every layer)")
        return PLANES[self.kinds[0]]

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one (plane, layer, block) slab: the unit a scattered transfer is made of."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes one block occupies across all planes and layers."""
        return self.num_planes * self.num_layers * self.chunk_bytes

    def compat_hash(self) -> str:
        """Stable across processes and Python versions: JSON of the fields in declaration order."""
        return hashlib.sha256(msgspec.json.encode(self)).hexdigest()[:16]

    def check_pool(self, pool, state_pool=None) -> None:
        """Raise if the pools do not have this layout (a transport is built from all three, they must agree)."""
        check_compatible(self, KVLayout.from_pool(pool, self.model, state_pool))


def check_compatible(local: KVLayout, remote: KVLayout) -> None:
    """Raise KVLayoutMismatch naming each differing field; return None when blocks can move between them."""
    diffs = [f"{f}: local={getattr(local, f)!r} remote={getattr(remote, f)!r}"
             for f in local.__struct_fields__ if getattr(local, f) != getattr(remote, f)]
    if set(local.kinds) != set(remote.kinds):
        # say it plainly first: a field-by-field diff hides that the pools hold different things per token
        diffs.insert(0, f"cache kinds differ (local stores {'/'.join(sorted(set(local.kinds)))}, remote "
                        f"{'/'.join(sorted(set(remote.kinds)))}): pools that cache different things per token "
                        f"(e.g. an MLA model's latents and another model's K/V) cannot exchange blocks")
    if local.state_kind != remote.state_kind:
        diffs.insert(0, f"per-sequence state differs (local {local.state_kind or 'none'}, remote "
                        f"{remote.state_kind or 'none'}): a hybrid model's recurrent state has nowhere to go")
    if diffs:
        raise KVLayoutMismatch("KV layouts are incompatible: " + "; ".join(diffs))
