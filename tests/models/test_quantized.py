"""Int4 weights end to end.

Tiny models: a checkpoint whose linears already lie on an int4 grid, served with quantization int4 in float32,
equals transformers on that checkpoint token for token, through both kernels (a few rows: torch's packed int4
matmul; more: the expansion) and every scheduling mode. SmolLM2's GGUF kept in its own Q4_1 blocks, in bfloat16:
its greedy choices agree with transformers in float32 on the dequantized weights at >= 97 % of positions (in float32
at all of them), and its perplexity on README.md is within 1 % of that model's.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from common.layers.quantized_linear import dequantize_ref, int8_kernel_available, is_int4, quantize_float
from tests.models.test_parity_tiny import CONFIGS, make_prefix_prompts, make_prompts
from tests.support.hf_reference import load_hf_model, make_llm, run_mode_and_compare

GROUP = 32
MAX_NEW = 24
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", params=[CONFIGS[1], CONFIGS[5]], ids=lambda c: c.id)
def grid_model(request, tiny_model_factory, tmp_path_factory):
    """A tiny model whose linear weights are their own int4 round trip (so quantizing them again is lossless)."""
    from safetensors.torch import load_file, save_file

    src = tiny_model_factory(request.param)
    dst = tmp_path_factory.mktemp(f"int4-{request.param.id}")
    for name in os.listdir(src):
        if name != "model.safetensors":
            shutil.copy(os.path.join(src, name), dst / name)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    for name, w in tensors.items():
        if name.rsplit(".", 2)[-2] in LINEARS:
            codes, scales, offsets = quantize_float(w, GROUP)
            tensors[name] = (codes.float().view(*scales.shape, GROUP) * scales[..., None]
                             + offsets[..., None]).view_as(w).contiguous()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return request.param, dst


def test_every_linear_is_int4(grid_model):
    cfg, d = grid_model
    llm = make_llm(d, quantization="int4", quantization_group_size=GROUP)
    model = llm.engine.runner.model
    int4 = [name for name, m in model.named_modules() if is_int4(m)]
    assert len(int4) == 4 * json.loads((d / "config.json").read_text())["num_hidden_layers"]  # qkv, o, gate_up, down
    hf = load_hf_model(d)
    w = hf.model.layers[0].self_attn.o_proj.weight
    torch.testing.assert_close(dequantize_ref(model.model.layers[0].self_attn.o_proj), w, rtol=0, atol=1e-6)


@pytest.fixture
def packed_rows_4(monkeypatch):
    """The packed kernel up to 4 rows, as on AVX2, so that decode steps of more rows take the expansion on every
    CPU (with AVX-512 the packed kernel would take up to 16)."""
    import common.layers.quantized_linear as quantized_linear

    monkeypatch.setattr(quantized_linear, "PACKED_ROWS", 4)
    return 4


@pytest.mark.parametrize("mode", ["block16", "chunked", "preempt", "prefix"])
def test_greedy_parity_through_int4(grid_model, mode, packed_rows_4):
    """block16 runs 3 prompts (decode rows <= 4: the packed kernel); the others 16 (the expansion)."""
    cfg, d = grid_model
    prompts = make_prompts(cfg.vocab_size, cfg.seed)
    run_mode_and_compare(d, mode, prompts=prompts[:3] if mode == "block16" else prompts,
                         prefix_prompts=make_prefix_prompts(cfg.vocab_size, cfg.seed), max_new_tokens=MAX_NEW,
                         check_logprobs_atol=2e-3, quantization="int4", quantization_group_size=GROUP)


def test_compiled_decode_through_int4_equals_eager(grid_model, packed_rows_4):
    """torch.compile'd decode steps over int4 weights: both kernels (the packed one up to PACKED_ROWS rows, above
    it the float copy a compiled engine keeps, its prefill too) give the tokens and logprobs of the eager float32
    engine (which packs nothing, so above PACKED_ROWS it expands the weight), in the two graphs of any compiled
    engine."""
    import torch._dynamo

    from common import SamplingParams

    cfg, d = grid_model
    if cfg is not CONFIGS[1]:
        pytest.skip("the compiled int4 path is the same code for every architecture; one is enough")
    prompts = make_prompts(cfg.vocab_size, cfg.seed)
    args = dict(quantization="int4", quantization_group_size=GROUP, num_kv_blocks=256)
    eager = make_llm(d, decode_mode="eager", **args)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = make_llm(d, decode_mode="compile", **args)
    assert compiled.engine.runner.decode_mode == "compile"
    for llm, copies in ((eager, False), (compiled, True)):
        int4 = [m for m in llm.engine.runner.model.modules() if is_int4(m)]
        assert int4 and all((getattr(m, "int4_float_copy", None) is not None) == copies for m in int4)
    compiled_at_start = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)
    for batch in (prompts[:1], prompts[:packed_rows_4], prompts[:packed_rows_4 + 4]):
        for w, g in zip(eager.generate(batch, params), compiled.generate(batch, params)):
            assert g["token_ids"] == w["token_ids"]
            for lw, lg in zip(w["logprobs"], g["logprobs"]):
                assert lg.keys() == lw.keys() and all(abs(lg[t] - lw[t]) < 1e-4 for t in lw)
    # batch 1 and every larger batch, compiled while the engine started: the kernel choice by rows is made inside
    # the int4 op, not traced into a guard
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_at_start <= 2


def test_float_copy_is_an_option(grid_model):
    """A bf16 engine gives its int4 linears a float copy for calls of many rows unless told not to."""
    from common.layers.packed_linear import can_pack

    cfg, d = grid_model
    if cfg is not CONFIGS[1] or not can_pack(torch.bfloat16, torch.device("cpu")):
        pytest.skip("one architecture is enough; oneDNN prepacks bf16 weights only on CPUs with bf16 instructions")
    for copy in (True, False):
        llm = make_llm(d, dtype="bfloat16", decode_mode="eager", quantization="int4", quantization_group_size=GROUP,
                       int4_float_copy=copy)
        int4 = [m for m in llm.engine.runner.model.modules() if is_int4(m)]
        assert int4 and all((getattr(m, "int4_float_copy", None) is not None) == copy for m in int4)


def test_int4_refused_where_it_cannot_run(tiny_model_factory):
    from common.errors import InvalidRequestError

    tiny_dir = tiny_model_factory(CONFIGS[0])
    with pytest.raises(InvalidRequestError, match="quantization"):
        make_llm(tiny_dir, quantization="int8")
    with pytest.raises(InvalidRequestError, match="group"):
        make_llm(tiny_dir, quantization="int4", quantization_group_size=48)
    with pytest.raises(InvalidRequestError, match="sharded"):
        make_llm(tiny_dir, quantization="int4", tensor_parallel_size=2)


# ------------------------------------------------------------------ SmolLM2's GGUF, kept in its Q4_1 blocks
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Water boils at", "Once upon a time, a small robot",
           "The three primary colors are", "To make a cup of tea, first", "import numpy as np\nx =",
           "The largest planet in the solar system is"]


@pytest.fixture(scope="module")
def gguf_int4():
    from common.models.gguf import default_gguf_path

    llm = make_llm(default_gguf_path(), dtype="bfloat16", quantization="auto")
    model = llm.engine.runner.model
    assert sum(is_int4(m) for m in model.modules()) == 30 * 4
    # the LM head, tied to the file's Q8_0 embedding, multiplies a few rows by those blocks
    assert (getattr(model.lm_head, "int8_codes", None) is not None) == int8_kernel_available()
    return llm


# A position where transformers prefers another token by less than this many logits is a tie: bfloat16
# activations alone (no quantization) part from float32 at 3 % of positions, all of them within 0.13 logits.
TIE_LOGITS = 0.25


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gguf_greedy_agreement(gguf_int4, smollm2_dir, dtype):
    """At each position of our greedy continuation, transformers (float32, dequantized weights, fed the same
    tokens) would have chosen our token: always in float32 (the int4 weights are exact), and in bfloat16 but for
    ties."""
    from common import SamplingParams
    from common.models.gguf import default_gguf_path
    from transformers import AutoTokenizer

    llm = gguf_int4 if dtype == "bfloat16" else make_llm(default_gguf_path(), dtype=dtype, quantization="int4")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    hf = load_hf_model(smollm2_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    same = ties = total = 0
    for prompt, out in zip(prompts, outs):
        with torch.inference_mode():
            logits = hf(torch.tensor([prompt + out["token_ids"]])).logits[0, len(prompt) - 1:-1]
        ours = torch.tensor(out["token_ids"])
        margin = logits.max(-1).values - logits.gather(-1, ours[:, None])[:, 0]
        same += int((margin == 0).sum())
        ties += int(((margin > 0) & (margin < TIE_LOGITS)).sum())
        total += len(ours)
    print(f"{dtype}: greedy agreement with the dequantized model {same}/{total} = {same / total:.3f}, "
          f"{ties} more within {TIE_LOGITS} logits")
    assert (same if dtype == "float32" else same + ties) / total >= 0.97


def test_gguf_perplexity(gguf_int4, smollm2_dir):
    """Perplexity on the start of README.md (512 tokens, one prefill) within 1 % of the dequantized model's."""
    from transformers import AutoTokenizer

    from tests.support.model_checks import prefill_logits

    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(readme)["input_ids"][:512]

    def perplexity(logits):
        return math.exp(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).item())

    ours = perplexity(prefill_logits(gguf_int4.engine.runner, ids, [len(ids)]))
    with torch.inference_mode():
        ref = perplexity(load_hf_model(smollm2_dir)(torch.tensor([ids])).logits[0])
    print(f"perplexity on README.md: int4 bf16 {ours:.3f}, dequantized fp32 {ref:.3f}")
    assert abs(ours - ref) / ref <= 0.01
