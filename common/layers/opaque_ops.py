"""Opaque ops of a compiled step, and the modules they reach by key, so the compiler never traces what those hold.

The paged KV pool (attention), oneDNN's blocked weights (which dynamo cannot fake) and the int4 kernels' scratch
expansion stay behind ops the compiler treats as black boxes; each op finds its module here. The key is a 0-dim
tensor buffer of the module, not an int attribute: dynamo bakes a module's int attributes into the graph as
constants, so every decoder layer would get a graph of its own, where a tensor input lets all the layers of a model
share one compiled layer (common/engine/compiled_step.py compiles one layer, not the model).
"""
import itertools
import weakref
from typing import Callable

import torch
from torch import nn

_MODULES: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()
_NEXT_KEY = itertools.count()


def register(module: nn.Module, name: str) -> None:
    """Key module under a fresh id, kept as its non-persistent buffer `name`."""
    key = next(_NEXT_KEY)
    _MODULES[key] = module
    module.register_buffer(name, torch.tensor(key), persistent=False)


def lookup(key: torch.Tensor) -> nn.Module:
    return _MODULES[int(key)]


# torch.library.Library rather than torch.library.custom_op: its dispatch costs ~3.5 us a call where custom_op's
# costs ~10, and a compiled step of SmolLM2 makes up to 150 of these calls (4 matmuls and attention a layer)
_LIBRARY = torch.library.Library("nano_pd", "FRAGMENT")


def define(schema: str, impl: Callable, fake: Callable) -> None:
    """torch.ops.nano_pd.<name> from schema ("name(Tensor x, ...) -> Tensor"), run by impl on CPU tensors; fake
    gives the compiler the output's shape. Without a mutation annotated in schema, the op must not write its
    inputs: what it writes it reaches through a key, and its output feeds the next op, so the compiler can neither
    drop it nor reorder it."""
    _LIBRARY.define(schema)
    name = schema.split("(", 1)[0]
    _LIBRARY.impl(name, impl, "CPU")
    torch.library.register_fake(f"nano_pd::{name}")(fake)
