"""Moving KV blocks between worker processes: a layout descriptor, one transport interface, NIXL and ZMQ backends.

`import kv_transfer` never needs nixl; the NIXL backend imports it only when a NIXL transport is made.
"""
from __future__ import annotations

import logging

from kv_transfer.base import DEFAULT_TIMEOUT_S, KVTransport, TransferResult
from kv_transfer.layout import KVLayout, KVLayoutMismatch, check_compatible

log = logging.getLogger("kv_transfer")


def make_transport(kind: str, name: str, pool, layout: KVLayout | None = None, *, model_name: str = "",
                   state_pool=None, timeout_s: float = DEFAULT_TIMEOUT_S, **backend_kwargs) -> KVTransport:
    """kind: "nixl" | "zmq" | "auto" (NIXL when it imports and can register the pool, else ZMQ).

    state_pool: a hybrid model's per-sequence state slots (KVCache.state_pool), moved with the blocks.

    backend_kwargs go to the chosen backend (zmq: host, port, advertise_host; nixl: progress_thread); each
    backend takes only those it knows, so callers can pass every option whatever the kind. Both sides of a pair must end up on one backend;
    add_peer says so clearly when they do not.
    """
    layout = layout or KVLayout.from_pool(pool, model_name, state_pool)
    if kind == "auto":
        try:
            return make_transport("nixl", name, pool, layout, state_pool=state_pool, timeout_s=timeout_s,
                                  **backend_kwargs)
        except Exception as e:  # ImportError, no UCX plugin, registration refused, ...
            log.info("NIXL unavailable (%s); using the ZMQ KV transport", e)
            return make_transport("zmq", name, pool, layout, state_pool=state_pool, timeout_s=timeout_s,
                                  **backend_kwargs)
    if kind == "nixl":
        from kv_transfer.nixl_backend import NixlTransport
        return NixlTransport(name, pool, layout, timeout_s=timeout_s, state_pool=state_pool,
                             **_only(backend_kwargs, {"progress_thread"}))
    if kind == "zmq":
        from kv_transfer.zmq_backend import ZmqTransport
        return ZmqTransport(name, pool, layout, timeout_s=timeout_s, state_pool=state_pool,
                            **_only(backend_kwargs, {"host", "port", "advertise_host"}))
    raise ValueError(f"unknown KV transport kind {kind!r} (nixl, zmq or auto)")


def _only(kwargs: dict, keys: set) -> dict:
    return {k: v for k, v in kwargs.items() if k in keys}


__all__ = ["make_transport", "KVTransport", "TransferResult", "KVLayout", "KVLayoutMismatch", "check_compatible",
           "DEFAULT_TIMEOUT_S"]
