"""Int4 and int8 linears (common/layers/quantized_linear.py) against dequantize-then-matmul, and the GGUF 4-bit
and Q8_0 blocks (common/models/gguf.py read_quantized_tensors) against the dequantized weights the parity path
loads."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.layers.packed_linear import can_pack, matmul
from common.layers.quantized_linear import (GROUP_SIZES, INT8_ROWS, PACKED_ROWS, check_shape, dequantize,
                                            int8_kernel_available, keep_float_copy, make_int4, make_int8, matmul_int4,
                                            quantize_float)

# (out, in, group): odd output counts, every group size, inputs of one and of many groups
SHAPES = [(1, 32, 32), (7, 64, 32), (33, 96, 32), (96, 128, 64), (130, 256, 128), (64, 512, 256), (1000, 256, 32)]
ROWS = [1, 3, PACKED_ROWS, PACKED_ROWS + 1, 17, 130]  # both kernels


def _random_int4(out_features, in_features, group, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.uint8)
    scales = torch.rand(out_features, in_features // group, generator=g) * 0.05 + 1e-3
    offsets = torch.randn(out_features, in_features // group, generator=g) * 0.1
    return codes, scales, offsets


def _reference(codes, scales, offsets):
    group = codes.shape[1] // scales.shape[1]
    return codes.double() * scales.double().repeat_interleave(group, 1) + offsets.double().repeat_interleave(group, 1)


def _module(codes, scales, offsets, dtype):
    m = nn.Linear(codes.shape[1], codes.shape[0], bias=False)
    make_int4(m, codes, scales, offsets, dtype)
    return m


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_equals_dequantize_then_matmul(shape, rows):
    codes, scales, offsets = _random_int4(*shape, seed=rows)
    m = _module(codes, scales, offsets, torch.float32)
    assert m.weight.numel() == 0, "the float weight is freed"
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(1))
    want = x.double() @ _reference(codes, scales, offsets).T
    got = matmul_int4(m, x)
    assert got.dtype == torch.float32 and got.shape == (rows, shape[0])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("rows", [1, PACKED_ROWS + 1, 64])
@pytest.mark.parametrize("shape", SHAPES[2:5], ids=lambda s: "x".join(map(str, s)))
def test_bf16_within_a_bf16_step(shape, rows):
    codes, scales, offsets = _random_int4(*shape, seed=rows)
    m = _module(codes, scales, offsets, torch.bfloat16)
    x = torch.randn(2, rows, shape[1], generator=torch.Generator().manual_seed(2)).bfloat16()  # leading dims kept
    want = x.double() @ _reference(codes, scales, offsets).T
    got = matmul_int4(m, x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, shape[0])
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float_copy_serves_many_rows_and_the_int4_kernel_a_few(dtype):
    if not can_pack(dtype, torch.device("cpu")):
        pytest.skip(f"oneDNN cannot prepack {dtype} weights on this CPU")
    codes, scales, offsets = _random_int4(130, 256, 32, seed=5)
    m = _module(codes, scales, offsets, dtype)
    keep_float_copy(m)
    dequantize(_module(*_random_int4(130, 256, 32, seed=6), dtype))  # overwrites the expansion's scratch buffer
    x = torch.randn(PACKED_ROWS + 9, 256, generator=torch.Generator().manual_seed(7)).to(dtype)
    want = x.double() @ _reference(codes, scales, offsets).T
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for rows in (1, PACKED_ROWS, PACKED_ROWS + 1, PACKED_ROWS + 9):
        got = matmul(m, x[:rows])
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want[:rows], rtol=tol, atol=tol * want.abs().max().item())
    m.int4_float_copy = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(130, 256, dtype=dtype), 1)
    assert matmul(m, x[:PACKED_ROWS]).abs().max() > 0, "a few rows: the int4 kernel"
    assert matmul(m, x[:PACKED_ROWS + 1]).abs().max() == 0, "more: the float copy"


def test_dequantize_is_exact_in_fp32():
    codes, scales, offsets = _random_int4(33, 96, 32, seed=3)
    got = dequantize(_module(codes, scales, offsets, torch.float32))
    torch.testing.assert_close(got.double(), _reference(codes, scales, offsets), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("group", GROUP_SIZES)
def test_quantize_float_round_trip(group):
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(group))
    codes, scales, offsets = quantize_float(w, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scales.shape == offsets.shape == (48, 512 // group)
    error = (_reference(codes, scales, offsets) - w.double()).abs()
    assert (error <= scales.double().repeat_interleave(group, 1) / 2 + 1e-6).all(), "off by more than half a step"


def test_quantize_float_constant_group():
    """A group of equal weights (scale 0) comes back exactly, not as NaN."""
    w = torch.full((2, 32), 0.25)
    codes, scales, offsets = quantize_float(w, 32)
    torch.testing.assert_close(_reference(codes, scales, offsets).float(), w)


def test_shapes_refused():
    assert check_shape(96, 32) is None
    assert "multiple" in check_shape(100, 32)
    assert "group size" in check_shape(96, 48)


# ------------------------------------------------------------------ int8 (Q8_0) linears
def _random_int8(out_features, in_features, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (out_features, in_features), generator=g, dtype=torch.int8)
    return codes, torch.rand(out_features, in_features // 32, generator=g) * 0.01 + 1e-4


def _reference_int8(codes, scales):
    return codes.double() * scales.double().repeat_interleave(32, 1)


needs_int8_kernel = pytest.mark.skipif(not int8_kernel_available(), reason="no AVX-512 build of the kernels here")


@needs_int8_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (65, 96), (1000, 576)], ids=lambda s: "x".join(map(str, s)))
def test_int8_kernel_equals_dequantize_then_matmul(shape, rows):
    codes, scales = _random_int8(*shape, seed=rows)
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(3))
    want = x.double() @ _reference_int8(codes, scales).T
    got = torch.ops.nano_pd.int8_linear(x, codes, scales)
    assert got.dtype == torch.float32 and got.shape == (rows, shape[0])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    got = torch.ops.nano_pd.int8_linear(x.bfloat16(), codes, scales)  # bf16 in, fp32 out (logits keep fp32)
    want = x.bfloat16().double() @ _reference_int8(codes, scales).T
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@needs_int8_kernel
def test_int8_weight_serves_a_few_rows_and_the_float_weight_the_rest():
    codes, scales = _random_int8(48, 64, seed=0)
    m = nn.Linear(64, 48, bias=False)
    m.weight.data = _reference_int8(codes, scales).float()
    make_int8(m, codes, scales)
    x = torch.randn(INT8_ROWS + 3, 64, generator=torch.Generator().manual_seed(4))
    want = x.double() @ m.weight.double().T
    for rows in (1, INT8_ROWS, INT8_ROWS + 3):
        torch.testing.assert_close(matmul(m, x[:rows]).double(), want[:rows], rtol=1e-4, atol=1e-4)
    assert matmul(m, x[:2].view(2, 1, 64)).shape == (2, 1, 48)  # leading dimensions kept
    m.weight.data.zero_()  # now the two paths differ: a few rows still read the int8 codes, more the float weight
    assert matmul(m, x[:INT8_ROWS]).abs().max() > 0
    assert matmul(m, x[:INT8_ROWS + 1]).abs().max() == 0


@needs_int8_kernel
def test_int8_kernel_refuses_bad_inputs():
    codes, scales = _random_int8(8, 64, seed=0)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.nano_pd.int8_linear(torch.randn(1, 48), codes[:, :48].contiguous(), scales[:, :1].contiguous())
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.nano_pd.int8_linear(torch.randn(1, 64), codes, scales.double())
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.nano_pd.int8_linear(torch.randn(1, 32), codes, scales)


# ------------------------------------------------------------------ GGUF blocks
def _write_gguf(path, tensors: dict[str, tuple[np.ndarray, object]], n_head=4, n_head_kv=2):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.attention.head_count", n_head)
    w.add_uint32("llama.attention.head_count_kv", n_head_kv)
    for name, (array, qtype) in tensors.items():
        data = gguf.quants.quantize(array, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_q4_blocks_equal_the_dequantized_weights(tmp_path):
    """Q4_0 and Q4_1 tensors, with llama's q/k row permutation undone, read as codes, scales and offsets, equal
    what the conversion to float (the parity path) loads, and so do Q8_0 tensors read as codes and scales."""
    import gguf

    from common.models.gguf import _read_weights, read_quantized_tensors

    rng = np.random.default_rng(0)
    q4_0, q4_1, q8_0 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    tensors = {"blk.0.attn_q.weight": (rng.standard_normal((32, 64), dtype=np.float32), q4_1),
               "blk.0.attn_k.weight": (rng.standard_normal((16, 64), dtype=np.float32), q4_0),
               "blk.0.ffn_down.weight": (rng.standard_normal((24, 96), dtype=np.float32), q4_0),
               "blk.0.ffn_up.weight": (rng.standard_normal((24, 64), dtype=np.float32), q8_0)}
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, tensors)
    floats = _read_weights(gguf.GGUFReader(str(path)), "llama", torch.float32)
    assert all(kind == "int4" for _, kind, _ in read_quantized_tensors(str(path)))  # Q8_0 only where named
    blocks = list(read_quantized_tensors(str(path), frozenset({"model.layers.0.mlp.up_proj.weight"})))
    got = {name: tensors for name, kind, tensors in blocks if kind == "int4"}
    assert sorted(got) == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                           "model.layers.0.self_attn.q_proj.weight"]
    for name, (codes, scales, offsets) in got.items():
        assert codes.dtype == torch.uint8 and codes.shape == floats[name].shape
        torch.testing.assert_close(_reference(codes, scales, offsets).float(), floats[name], rtol=0, atol=1e-6)
    int8 = {name: tensors for name, kind, tensors in blocks if kind == "int8"}
    assert list(int8) == ["model.layers.0.mlp.up_proj.weight"]
    codes, scales = int8["model.layers.0.mlp.up_proj.weight"]
    assert codes.dtype == torch.int8 and scales.shape == (24, 2)
    torch.testing.assert_close(_reference_int8(codes, scales).float(), floats["model.layers.0.mlp.up_proj.weight"],
                               rtol=0, atol=1e-6)
