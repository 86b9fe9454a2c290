"""oneDNN-prepacked linear weights on CPU, eager and compiled.

At batch 1 a decode step streams every weight once, and oneDNN reads a weight reordered into its blocked layout
much faster than F.linear reads the plain one: over SmolLM2's 30 layers of projections on the 2-core CI machine,
19.5 vs 11.9 GB/s in float32 and 18.2 vs 13.7 GB/s in bfloat16. With more rows it still wins (on a Zen 4 core in
bfloat16, SmolLM2's projections take 20 % less time at 64 rows, the LM head 30 %; at 512 rows they tie), so the
runner packs every bf16 linear at load, eager or compiled (fp32 eager keeps F.linear, see model_runner).
Inductor's freezing pass would reorder the weights itself, but it does not for our dynamic-shape graphs: each
weight is reordered once here (its plain copy freed, unless another module shares it, as a tied LM head does)
and the matmul goes through one opaque op, so torch.compile never has to trace the blocked tensor, which it
cannot.
"""
import torch
import torch.nn.functional as F
from torch import nn

from common.layers import opaque_ops
from common.layers.quantized_linear import is_int4, keep_float_copy, matmul_int4, matmul_int8, uses_int8


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN reorders bf16 weights only on CPUs with bf16 instructions (AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack(module: nn.Module, free_plain: bool) -> None:
    """Give module (with a [out, in] .weight) a prepacked copy that matmul() then uses."""
    weight = module.weight
    module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # tuned for batch-1 GEMV
    module.packed_out_features = weight.shape[0]
    opaque_ops.register(module, "packed_key")
    if free_plain:
        weight.data = weight.data.new_empty(0)


def matmul(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ module.weight.T, through the int8, prepacked or int4 weight once there is one."""
    if uses_int8(module, x):
        return matmul_int8(module, x)
    key = getattr(module, "packed_key", None)
    if key is None:
        return matmul_int4(module, x) if is_int4(module) else F.linear(x, module.weight)
    if torch.compiler.is_compiling():
        return torch.ops.nano_pd.packed_linear(x, key, module.packed_out_features)
    # eager calls oneDNN itself: even the op's dispatch costs microseconds a call, over 120 calls a decode step
    return _linear_pointwise(x, module.packed_weight)


def _linear_pointwise(x: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, None, "none", [], "")


opaque_ops.define("packed_linear(Tensor x, Tensor key, int out_features) -> Tensor",
                  lambda x, key, out_features: _linear_pointwise(x, opaque_ops.lookup(key).packed_weight),
                  lambda x, key, out_features: x.new_empty(*x.shape[:-1], out_features))


def prepack_linears(model, int4_float_copy: bool) -> int:
    """Reorder every float linear's and the LM head's weight for oneDNN; a plain weight that no other module
    shares is freed. An int4 linear keeps its int4 weight, and with int4_float_copy also gets a prepacked float
    copy for its calls of many rows (quantized_linear.keep_float_copy). Returns the number of weights packed."""
    from collections import Counter

    from common.layers.embedding import ParallelLMHead
    from common.layers.linear import _ShardedLinear

    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    packed = 0
    for module in model.modules():
        if not isinstance(module, (_ShardedLinear, ParallelLMHead)) or not getattr(module, "prepack", True):
            continue
        if not is_int4(module):
            pack(module, free_plain=uses[id(module.weight)] == 1)
        elif int4_float_copy:
            keep_float_copy(module)
        else:
            continue
        packed += 1
    return packed
