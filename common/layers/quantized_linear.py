"""Weight-only int4 linears on CPU (and the int8 Q8_0 LM head, at the end of this file): 4-bit codes q in groups
of g input features, each group with a scale and an offset, w = q * scale + offset (GGUF's Q4_1 as it is, Q4_0
with offset -8 * scale, or a float checkpoint quantized at load).

Two kernels, picked per call by the number of rows. A decode step of a few sequences is bound by reading the
weights: torch's packed int4 matmul reads ~4.5 bits a weight where bf16 reads 16, and unpacks them in registers
(on the CI CPU, 2.4x faster than oneDNN's bf16 matmul at one row). With more rows the arithmetic dominates and
that kernel falls behind oneDNN's GEMM (2x slower at 64 rows), so there oneDNN multiplies a float weight: by
default a prepacked copy in the activation dtype kept beside the int4 one (keep_float_copy; two bytes a weight
more in bf16), else (`--no-int4-float-copy`) the weight expanded for the call, about one pass over a bf16 weight.

The packed int4 kernel takes bf16 activations at full speed (fp32 ones through a slow path), so `quantization auto`
keeps int4 only for bf16 engines; its scales and offsets are kept in the activation dtype, as torch requires.
"""
import torch
import torch.nn.functional as F
from torch import nn

from common.layers import opaque_ops, paged_attention_cpu

GROUP_SIZES = (32, 64, 128, 256)  # those torch's packed int4 kernel takes
# Rows up to which the packed kernel wins, by the instructions torch's kernels use: on AVX2 (the CI CPU,
# benchmarks/decode.py --quantization int4) 4; with AVX-512 (Zen 4) it is ahead up to 16 (SmolLM2's four projections
# at 8 rows: 487 vs 888 us a layer, at 32 rows behind: 1733 vs 1346)
PACKED_ROWS = 16 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 4


def quantize_float(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest int4 of a float [out, in] weight, per group of `group` inputs (Q4_1's scheme):
    codes [out, in] uint8, scales and offsets [out, in / group] float32."""
    out_features, in_features = weight.shape
    w = weight.float().view(out_features, in_features // group, group)
    low, high = w.amin(-1), w.amax(-1)
    scales = (high - low) / 15
    codes = ((w - low.unsqueeze(-1)) / scales.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)).round()
    return codes.clamp(0, 15).to(torch.uint8).view(out_features, in_features), scales, low


def check_shape(in_features: int, group: int) -> str | None:
    """Why a linear with in_features inputs cannot hold int4 groups of `group` (None: it can)."""
    if group not in GROUP_SIZES:
        return f"group size {group} is not one of {list(GROUP_SIZES)}"
    if in_features % group:
        return f"{in_features} input features are not a multiple of the group size {group}"
    return None


def make_int4(module: nn.Module, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
              dtype: torch.dtype) -> None:
    """Give module (a linear with an [out, in] .weight) its int4 weight, which matmul() then uses, and free the
    float one."""
    out_features, in_features = codes.shape
    group = in_features // scales.shape[1]
    assert check_shape(in_features, group) is None and scales.shape == offsets.shape == (out_features,
                                                                                         in_features // group)
    codes = codes.to(torch.uint8)
    # torch's kernel takes outputs in multiples of 16 and computes (q - 8) * scale + zero; padded rows are all 0
    padded = -out_features % 16
    scales_zeros = F.pad(torch.stack((scales, offsets + 8 * scales), -1), (0, 0, 0, 0, 0, padded))
    # buffers, not plain attributes: torch.compile treats a module's buffers as fixed-shape, while plain tensor
    # attributes become inputs with symbolic sizes, and a size equal to a step input's by chance recompiled the step
    for name, tensor in (
            ("int4_packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(F.pad(codes.int(), (0, 0, 0, padded)),
                                                                               1)),
            ("int4_scales_zeros", scales_zeros.transpose(0, 1).contiguous().to(dtype)),
            ("int4_nibbles", codes[:, 0::2] | (codes[:, 1::2] << 4)),  # what the expansion reads: [out, in / 2]
            ("int4_scales", scales.to(dtype).unsqueeze(-1)),
            ("int4_offsets", offsets.to(dtype).unsqueeze(-1))):
        module.register_buffer(name, tensor, persistent=False)
    module.int4_group = group
    opaque_ops.register(module, "int4_key")
    module.weight.data = module.weight.data.new_empty(0)


def is_int4(module: nn.Module) -> bool:
    return getattr(module, "int4_packed", None) is not None


def dequantize(module: nn.Module) -> torch.Tensor:
    """The int4 weight in its scales' dtype, [out, in]: by the C++ expansion where the CPU kernels are built (a
    table lookup per weight), else by torch (its uint8 element-wise ops run ~20x slower)."""
    scales = module.int4_scales
    if scales.dtype not in (torch.float32, torch.bfloat16) or not paged_attention_cpu.available():
        return dequantize_ref(module)
    out = _scratch(scales.dtype, scales.shape[0], module.int4_nibbles.shape[1] * 2)
    torch.ops.nano_pd.int4_expand(module.int4_nibbles, scales, module.int4_offsets, out)
    return out


# One buffer per dtype, as large as the largest weight, reused by every expansion: a fresh one would cost its page
# faults each time (a 3.5 MB bf16 weight takes longer to fault in than to fill). An expanded weight lives only until
# its matmul returns, and a process runs one forward at a time.
_SCRATCH: dict[torch.dtype, torch.Tensor] = {}


def _scratch(dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    buffer = _SCRATCH.get(dtype)
    if buffer is None or buffer.numel() < rows * cols:
        buffer = _SCRATCH[dtype] = torch.empty(rows * cols, dtype=dtype)
    return buffer[:rows * cols].view(rows, cols)


def dequantize_ref(module: nn.Module) -> torch.Tensor:
    nibbles, scales = module.int4_nibbles, module.int4_scales
    out_features, groups = scales.shape[0], scales.shape[1]
    codes = torch.stack((nibbles & 0x0F, nibbles >> 4), -1).view(out_features, groups, -1).to(scales.dtype)
    return torch.addcmul(module.int4_offsets, codes, scales).view(out_features, -1)


# A compiled step of several rows calls the int4 matmul through one opaque op (as packed_linear does for oneDNN
# weights). Traced, the kernel choice by a symbolic number of rows became a guard (a graph for each side) and the
# expansion into the shared buffer was functionalized into a copy of it per call, which made batch 8 slower
# compiled than eager. One row (the batch-1 graph, where the count is a constant) traces the packed kernel itself,
# without the op's dispatch


def matmul_int4(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ w.T for an int4 module (eager calls the kernels directly: the op's dispatch costs microseconds a call)."""
    if torch.compiler.is_compiling() and x.numel() != x.shape[-1]:
        return torch.ops.nano_pd.int4_linear(x, module.int4_key, module.int4_scales.shape[0])
    return _matmul_int4(module, x)


opaque_ops.define("int4_linear(Tensor x, Tensor key, int out_features) -> Tensor",
                  lambda x, key, out_features: _matmul_int4(opaque_ops.lookup(key), x),
                  lambda x, key, out_features: x.new_empty(*x.shape[:-1], out_features))


def _matmul_int4(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows <= PACKED_ROWS:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(rows, x.shape[-1]), module.int4_packed,
                                                       module.int4_group, module.int4_scales_zeros)
        out_features = module.int4_scales.shape[0]
        return (y if y.shape[1] == out_features else y[:, :out_features]).reshape(*x.shape[:-1], out_features)
    float_copy = getattr(module, "int4_float_copy", None)
    if float_copy is not None:  # oneDNN's call, as packed_linear makes it for its own weights
        return torch.ops.mkldnn._linear_pointwise(x, float_copy, None, "none", [], "")
    return F.linear(x, dequantize(module))


def keep_float_copy(module: nn.Module) -> None:
    """Give an int4 module a oneDNN-prepacked copy of its dequantized weight, which calls of more than PACKED_ROWS
    rows multiply instead of expanding the weight each time: two bytes a weight more memory, for matmuls of 32
    rows ~40 % and of 256 ~20 % faster (SmolLM2's projections on Zen 4). A plain attribute, not a buffer: only
    eager code and the opaque op read it, never a traced graph."""
    # the reorder copies: the expansion's shared scratch buffer is not kept
    module.int4_float_copy = torch.ops.mkldnn._reorder_linear_weight(dequantize(module), 1)


# Int8 weights in groups of 32 (a GGUF's Q8_0 blocks, w = q * scale), for the LM head, which is outside the
# compiled step: the C++ kernel (csrc/int8_linear.cpp) reads one byte a weight, where the bf16 LM head reads two,
# and at a few rows the read is the cost. With more rows the arithmetic is, and oneDNN's bf16 GEMM on the float
# weight (kept: a tied LM head shares it with the embedding anyway) is faster. Only AVX-512 builds have a fast
# kernel.
INT8_GROUP = 32
# SmolLM2's LM head on Zen 4 (one run), int8 vs oneDNN's prepacked bf16: 1.05 vs 1.87 ms at 1 row, 1.24 / 1.93 at 2,
# 1.81 / 2.14 at 4, 3.64 / 1.86 at 6
INT8_ROWS = 4


def int8_kernel_available() -> bool:
    return paged_attention_cpu.available() and paged_attention_cpu.build_info().get("isa") == "avx512"


def make_int8(module: nn.Module, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Give module (with an [out, in] .weight) int8 codes [out, in] and float32 scales [out, in / 32], which
    matmul() uses for calls of up to INT8_ROWS rows; its float weight stays for the others."""
    assert codes.dtype == torch.int8 and codes.shape == module.weight.shape
    assert scales.shape == (codes.shape[0], codes.shape[1] // INT8_GROUP)
    module.register_buffer("int8_codes", codes.contiguous(), persistent=False)
    module.register_buffer("int8_scales", scales.float().contiguous(), persistent=False)


def uses_int8(module: nn.Module, x: torch.Tensor) -> bool:
    return getattr(module, "int8_codes", None) is not None and x.numel() <= INT8_ROWS * x.shape[-1]


def matmul_int8(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ w.T in float32 whatever x's dtype: the LM head's logits, whose near-ties bf16 would round into ties."""
    out = torch.ops.nano_pd.int8_linear(x.reshape(-1, x.shape[-1]), module.int8_codes, module.int8_scales)
    return out.view(*x.shape[:-1], out.shape[-1])
