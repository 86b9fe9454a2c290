"""Stable hash chain over full KV blocks.

Pure Python (no torch) so the router can compute the same hashes for prefix-aware routing; stable across
processes and hosts (Python's own hash() of ints is, but a digest makes the chain independent of version).
"""
import hashlib
from array import array

ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids) -> int:
    h = hashlib.blake2b(parent_hash.to_bytes(8, "little"), digest_size=8)
    h.update(array("l", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: list[int], block_size: int, start_hashes: list[int] | None = None) -> list[int]:
    """Hashes of every full block of token_ids, extending start_hashes (the already-known leading blocks)."""
    hashes = list(start_hashes or [])
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes
