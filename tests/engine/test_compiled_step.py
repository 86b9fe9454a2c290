"""Compiled decode steps: torch.compile on CPU gives the eager engine's tokens and logprobs, compiles a fixed number
of graphs however the batch and context grow, and is refused where it cannot run; CUDA graphs on a GPU (skipped
without one)."""
from __future__ import annotations

import pytest
import torch

from common import SamplingParams
from common.engine import LLM
from common.engine.compiled_step import AUTO_MODE_ENV, batch_buckets, resolve_mode
from common.layers.packed_linear import can_pack
from common.errors import InvalidRequestError
from tests.support.tiny_models import TinyConfig

TINY = TinyConfig(arch="qwen3", num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=128, num_layers=2)
PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40, 9, 33)]


def generate(llm: LLM, prompts, max_tokens=24, **kw):
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1, **kw)
              for _ in prompts]
    return llm.generate(prompts, params)


def test_compiled_decode_equals_eager_and_compiles_two_graphs(tiny_model_factory):
    import torch._dynamo

    model = str(tiny_model_factory(TINY))
    eager = LLM(model, num_kv_blocks=256, decode_mode="eager", dtype="float32")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = LLM(model, num_kv_blocks=256, decode_mode="compile", dtype="float32")
    assert compiled.engine.runner.decode_step is not None and eager.engine.runner.decode_step is None
    compiled_at_start = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # batch 1 and batch >= 2, compiled while the engine started: one layer's graphs, which both layers run
    assert compiled_at_start == 2
    packed = [m for m in compiled.engine.runner.model.modules() if getattr(m, "packed_key", None) is not None]
    assert len(packed) == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the LM head
    # batch 1, then a batch that shrinks as requests finish at different lengths, contexts crossing many blocks
    for prompts, lengths in (([PROMPTS[0]], [40]), (PROMPTS, [24, 40, 8, 33, 16])):
        want = [eager.generate([p], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=1))[0]
                for p, n in zip(prompts, lengths)]
        got = compiled.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=1)
                                          for n in lengths])
        for w, g in zip(want, got):
            assert g["token_ids"] == w["token_ids"]
            for lw, lg in zip(w["logprobs"], g["logprobs"]):
                assert lg.keys() == lw.keys() and all(abs(lg[t] - lw[t]) < 1e-4 for t in lw)
    # batch 1 is specialised, every larger batch and context shares one dynamic graph; no step compiled anything
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_at_start


def test_compiled_decode_with_preemption_and_prefix_hits(tiny_model_factory):
    model = str(tiny_model_factory(TINY))
    shared = list(range(100, 148))
    prompts = [shared + [7 + i] * (i + 1) for i in range(6)]
    args = dict(num_kv_blocks=12, max_num_batched_tokens=64, dtype="float32")  # preempts, chunks, hits the prefix
    want = [o["token_ids"] for o in generate(LLM(model, decode_mode="eager", **args), prompts, max_tokens=40)]
    llm = LLM(model, decode_mode="compile", **args)
    got = [o["token_ids"] for o in generate(llm, prompts, max_tokens=40)]
    assert got == want
    stats = llm.engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0


@pytest.mark.skipif(not can_pack(torch.float32, torch.device("cpu")), reason="no oneDNN in this torch build")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_prepacked_linear_equals_plain(dtype, tol):
    if not can_pack(dtype, torch.device("cpu")):
        pytest.skip(f"oneDNN cannot prepack {dtype} on this CPU (no bf16 instructions); the engine keeps it plain")
    from common.layers.linear import ColumnParallelLinear
    from common.layers.packed_linear import pack

    g = torch.Generator().manual_seed(0)
    linear = ColumnParallelLinear(64, 96, bias=True)
    linear.weight.data = torch.randn(96, 64, generator=g).to(dtype)
    linear.bias.data = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(7, 64, generator=g).to(dtype)
    want = linear(x)
    pack(linear, free_plain=True)
    assert linear.weight.numel() == 0  # the plain copy is gone: the packed one is the only weight in memory
    for rows in (slice(0, 1), slice(0, 7)):  # a decode row and a prefill-sized batch
        torch.testing.assert_close(linear(x[rows]), want[rows], rtol=tol, atol=tol)


def test_compiled_mla_model_equals_eager(tmp_path):
    """MLA reads kv_b_proj's weight directly (absorbed), so that one linear must stay unpacked."""
    from tests.support.tiny_deepseek import TinyDeepseekConfig, make_tiny_deepseek

    model = str(make_tiny_deepseek(tmp_path / "deepseek", TinyDeepseekConfig()))
    want = generate(LLM(model, num_kv_blocks=64, decode_mode="eager"), PROMPTS[:2], max_tokens=8)
    got = generate(LLM(model, num_kv_blocks=64, decode_mode="compile"), PROMPTS[:2], max_tokens=8)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]


def test_decode_mode_is_checked(tiny_model_factory):
    model = str(tiny_model_factory(TINY))
    with pytest.raises(InvalidRequestError, match="decode_mode"):
        LLM(model, num_kv_blocks=16, decode_mode="turbo")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidRequestError, match="CUDA"):
            LLM(model, num_kv_blocks=16, decode_mode="cuda_graph")
        with pytest.raises(InvalidRequestError, match="not available"):
            LLM(model, num_kv_blocks=16, device="cuda")
    assert resolve_mode("auto", torch.device("cuda")) == "cuda_graph"


def test_auto_decode_mode_compiles_on_cpu_unless_pinned(tiny_model_factory, monkeypatch):
    model = str(tiny_model_factory(TINY))
    monkeypatch.delenv(AUTO_MODE_ENV, raising=False)
    assert resolve_mode("auto", torch.device("cpu")) == "compile"
    assert LLM(model, num_kv_blocks=16, dtype="float32").engine.runner.decode_step is not None
    monkeypatch.setenv(AUTO_MODE_ENV, "eager")
    assert resolve_mode("auto", torch.device("cpu")) == "eager"
    assert resolve_mode("compile", torch.device("cpu")) == "compile"  # a named mode is not overridden
    monkeypatch.setenv(AUTO_MODE_ENV, "turbo")
    with pytest.raises(InvalidRequestError, match=AUTO_MODE_ENV):
        LLM(model, num_kv_blocks=16)


def test_auto_decode_mode_decodes_eagerly_when_compiling_fails(tiny_model_factory, monkeypatch, caplog):
    """A CPU without a working C++ compiler (inductor's CPU code is C++) still serves, eagerly; a named compile
    mode fails loudly instead."""
    import torch._inductor.config

    model = str(tiny_model_factory(TINY))
    monkeypatch.delenv(AUTO_MODE_ENV, raising=False)
    import torch._dynamo

    want = [o["token_ids"] for o in generate(LLM(model, num_kv_blocks=64, decode_mode="eager"), PROMPTS[:2])]
    # no compiler, and no cache to load a compiled graph from instead
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True}):
        torch._dynamo.reset()
        with caplog.at_level("WARNING", logger="nano_pd.runner"):
            llm = LLM(model, num_kv_blocks=64, dtype="float32")
        assert llm.engine.runner.decode_step is None and "decoding eagerly" in caplog.text
        assert [o["token_ids"] for o in generate(llm, PROMPTS[:2])] == want
        torch._dynamo.reset()
        with pytest.raises(Exception, match="c\\+\\+"):
            LLM(model, num_kv_blocks=64, decode_mode="compile", dtype="float32")
    torch._dynamo.reset()


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert batch_buckets(256)[-3:] == [224, 240, 256]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_equals_eager(tiny_model_factory):
    model = str(tiny_model_factory(TINY))
    want = [o["token_ids"] for o in generate(LLM(model, num_kv_blocks=256, decode_mode="eager", device="cuda"),
                                             PROMPTS)]
    llm = LLM(model, num_kv_blocks=256, decode_mode="cuda_graph", device="cuda", max_num_seqs=16)
    got = [o["token_ids"] for o in generate(llm, PROMPTS)]
    assert got == want
    assert sorted(llm.engine.runner.decode_step._graphs) == [1, 2, 4, 8]  # captured once per bucket used


def test_decode_worker_compiled_with_ngram_matches_offline(model_dir, offline):  # noqa: F811
    """A decode worker with --decode-mode compile and n-gram speculation: eager verify steps and compiled plain
    steps interleave, and the text is the eager offline engine's."""
    from tests.support.cluster_harness import LocalCluster
    from tests.workers.test_cluster import prompts, run_concurrently, stream_chat

    ps = prompts(6, seed=5)
    with LocalCluster(model_dir, 1, 1, transport="zmq",
                      worker_args=("--num-kv-blocks", "512", "--decode-mode", "compile", "--speculative-config",
                                   '{"method": "ngram", "num_speculative_tokens": 3}')) as c:
        client = c.openai()
        results = run_concurrently(lambda p: stream_chat(client, p, 32, ignore_eos=True), ps, workers=6)
        assert [r["text"] for r in results] == offline(ps, 32, ignore_eos=True)
