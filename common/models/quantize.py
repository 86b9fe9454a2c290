"""Int4 weights for a loaded model (common/layers/quantized_linear.py): a GGUF's own Q4_0 / Q4_1 blocks, or a
float checkpoint's linears quantized at load; and a GGUF's Q8_0 LM head as its int8 blocks. Embeddings, norms and
a GGUF's other tensor types keep the engine's dtype."""
import logging

import torch
from torch import nn

from common.errors import ModelLoadError
from common.layers.linear import _ShardedLinear
from common.layers.quantized_linear import check_shape, int8_kernel_available, make_int4, make_int8, quantize_float
from common.models.loader import checkpoint_target

log = logging.getLogger("nano_pd.quantize")


def _linears(model: nn.Module) -> dict[str, _ShardedLinear]:
    """The linears whose weight is only multiplied (MLA reads its kv_b_proj weight directly: prepack False)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, _ShardedLinear) and getattr(m, "prepack", True)}


def quantize_linears(model: nn.Module, group: int, dtype: torch.dtype) -> int:
    """Quantize every linear whose input features hold whole groups; returns how many."""
    count = 0
    for name, module in _linears(model).items():
        why = check_shape(module.weight.shape[1], group)
        if why:
            log.info("%s stays %s: %s", name, dtype, why)
            continue
        make_int4(module, *quantize_float(module.weight.data, group), dtype)
        count += 1
    return count


def load_gguf_quantized(model: nn.Module, gguf_path: str, dtype: torch.dtype) -> tuple[int, bool]:
    """Replace the (dequantized) weights of the linears the GGUF file holds as Q4_0 / Q4_1 by those blocks, fused
    projections (q/k/v, gate/up) assembled through each layer's own shard loader, and give the LM head the file's
    Q8_0 blocks of its weight (its own, or the embedding's when the two are tied) where the int8 kernel is fast.
    Returns how many linears are int4, and whether the LM head has int8 blocks."""
    from common.models.gguf import read_quantized_tensors

    linears = _linears(model)
    head = model.lm_head
    head_name = "model.embed_tokens.weight" if head.weight is model.model.embed_tokens.weight else "lm_head.weight"
    int8_head = False
    parts: dict[str, list] = {}  # module name -> [codes, scales, offsets, rows filled]
    wanted = frozenset({head_name} if int8_kernel_available() else ())
    for name, kind, tensors in read_quantized_tensors(gguf_path, wanted):
        if kind == "int8":
            if tensors[0].shape == head.weight.shape:
                make_int8(head, *tensors)
                int8_head = True
            continue
        target, shard = checkpoint_target(model, name)
        module_name = target.rsplit(".", 1)[0]
        module = linears.get(module_name)
        if module is None or not target.endswith(".weight"):
            continue  # not a linear of ours (a 4-bit embedding, say): its dequantized copy is used
        out_features, in_features = module.weight.shape
        if module_name not in parts:
            groups = tensors[1].shape[1]
            parts[module_name] = [torch.empty(out_features, in_features, dtype=torch.uint8),
                                  torch.empty(out_features, groups), torch.empty(out_features, groups), 0]
        entry = parts[module_name]
        for buffer, loaded in zip(entry[:3], tensors):
            param = nn.Parameter(buffer, requires_grad=False)
            module.weight_loader(param, loaded) if shard is None else module.weight_loader(param, loaded, shard)
        entry[3] += tensors[0].shape[0]
    for module_name, (codes, scales, offsets, rows) in parts.items():
        if rows != codes.shape[0]:
            raise ModelLoadError(f"{gguf_path}: {module_name} has {rows} of its {codes.shape[0]} rows in 4-bit "
                                 f"blocks; its projections differ in type")
        make_int4(linears[module_name], codes, scales, offsets, dtype)
    return len(parts), int8_head
