"""Tensor and expert parallelism (2 CPU processes over gloo): greedy tokens equal to transformers (and so to TP=1)
for a dense, a MoE and an MLA model; expert parallelism; a prefill worker with TP=2 handing off to a decode worker
with TP=1 and the reverse; bad parallel settings refused; a dead rank reported, not waited on."""
from __future__ import annotations

import pytest

from common import SamplingParams
from common.engine import LLM
from common.errors import InvalidRequestError
from common.parallel.ranks import TensorParallelError
from tests.support.hf_reference import run_mode_and_compare
from tests.support.model_checks import cluster_serving_like_offline
from tests.models.test_parity_tiny import make_prompts
from tests.support.tiny_deepseek import TinyDeepseekConfig, make_tiny_deepseek
from tests.support.tiny_models import TinyConfig, TinyMoeConfig, make_tiny_model_from_config

MAX_NEW = 32
VOCAB = 512
# GQA 4:2: each rank holds one KV head; the 4:1 model has fewer KV heads than ranks, so both ranks hold a copy
DENSE = TinyConfig(arch="llama", num_heads=4, num_kv_heads=2, head_dim=32, vocab_size=VOCAB, seed=31)
SHARED_KV = TinyConfig(arch="qwen3", num_heads=4, num_kv_heads=1, head_dim=32, vocab_size=VOCAB, seed=32)
MOE = TinyMoeConfig(arch="qwen3_moe", num_layers=3, mlp_only_layers=(1,), num_heads=4, num_kv_heads=2, head_dim=32,
                    vocab_size=VOCAB, seed=33)
MLA = TinyDeepseekConfig(seed=34)
PROMPT_LENS = [1, 16, 17, 45, 100, 190]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    built = {}

    def get(cfg):
        if cfg not in built:
            make = make_tiny_deepseek if isinstance(cfg, TinyDeepseekConfig) else make_tiny_model_from_config
            built[cfg] = make(tmp_path_factory.mktemp(cfg.id), cfg)
        return built[cfg]

    return get


@pytest.mark.parametrize("cfg,mode,parallel", [
    (DENSE, "chunked", dict(tensor_parallel_size=2)),
    (DENSE, "preempt", dict(tensor_parallel_size=2)),
    (SHARED_KV, "chunked", dict(tensor_parallel_size=2)),
    (MOE, "chunked", dict(tensor_parallel_size=2)),
    (MOE, "preempt", dict(tensor_parallel_size=2)),
    (MOE, "chunked", dict(tensor_parallel_size=2, enable_expert_parallel=True)),
    (MOE, "preempt", dict(tensor_parallel_size=2, enable_expert_parallel=True)),
    (MLA, "chunked", dict(tensor_parallel_size=2)),
], ids=lambda x: getattr(x, "id", None) or (x if isinstance(x, str) else "ep2" if x.get("enable_expert_parallel")
                                             else "tp2"))
def test_parallel_greedy_equals_transformers(cfg, mode, parallel, model_dirs):
    """Greedy tokens of the sharded engine equal transformers' (the tests of each architecture show TP=1 does), with
    chunked prefill or preemption forced."""
    run_mode_and_compare(model_dirs(cfg), mode, make_prompts(VOCAB, cfg.seed, PROMPT_LENS), None, MAX_NEW, **parallel)


def test_tp2_logprobs_match_tp1(model_dirs):
    """Beyond equal tokens: the sharded sums change only the rounding of the logprobs."""
    prompts = make_prompts(VOCAB, 7, PROMPT_LENS)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    results = []
    for tp in (1, 2):
        with LLM(str(model_dirs(MOE)), tensor_parallel_size=tp) as llm:
            results.append(llm.generate(prompts, params, use_tqdm=False))
    for one, two in zip(*results):
        assert one["token_ids"] == two["token_ids"]
        for a, b in zip(one["logprobs"], two["logprobs"]):
            assert a.keys() == b.keys()
            assert max(abs(a[t] - b[t]) for t in a) < 1e-4


@pytest.mark.parametrize("args,message", [
    (dict(tensor_parallel_size=3), "must divide the 4 attention heads"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be a positive integer"),
    (dict(enable_expert_parallel=True), "needs a mixture-of-experts model"),
    (dict(tensor_parallel_size=2, speculative_config={"method": "draft_model", "model": "x",
                                                      "num_speculative_tokens": 2}), "draft model is not supported"),
])
def test_bad_parallel_settings_are_refused(args, message, model_dirs):
    with pytest.raises(InvalidRequestError, match=message):
        LLM(str(model_dirs(DENSE)), **args)


def test_recurrent_model_refuses_tensor_parallelism(tmp_path):
    from tests.support.tiny_qwen3_next import TinyQwen3NextConfig, make_tiny_qwen3_next

    model_dir = make_tiny_qwen3_next(tmp_path / "next", TinyQwen3NextConfig())
    with pytest.raises(InvalidRequestError, match="linear-attention layers are not sharded"):
        LLM(str(model_dir), tensor_parallel_size=2)


def test_dead_rank_is_an_error_not_a_hang(model_dirs):
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm = LLM(str(model_dirs(DENSE)), tensor_parallel_size=2)
    try:
        assert len(llm.generate([[1, 2, 3]], params, use_tqdm=False)[0]["token_ids"]) == 4
        follower = llm.engine.runner.ranks.procs[0]
        follower.kill()
        follower.wait()
        with pytest.raises(TensorParallelError, match="rank 1 .* exited"):
            llm.generate([[1, 2, 3]], params, use_tqdm=False)
    finally:
        llm.close()
    # the process group is gone with the engine: the next one starts cleanly
    with LLM(str(model_dirs(DENSE)), tensor_parallel_size=2) as llm:
        assert len(llm.generate([[4, 5]], params, use_tqdm=False)[0]["token_ids"]) == 4


@pytest.mark.slow
@pytest.mark.parametrize("transport,prefill_tp,decode_tp", [("zmq", 2, 1), ("nixl", 1, 2)])
def test_cluster_with_different_tp_on_prefill_and_decode(transport, prefill_tp, decode_tp, model_dirs):
    """The transfer moves full-head blocks whatever each side's TP: outputs equal the TP=1 offline engine's."""
    with cluster_serving_like_offline(str(model_dirs(DENSE)), transport, num_prompts=8,
                                      prefill_args=("--tensor-parallel-size", str(prefill_tp)),
                                      decode_args=("--tensor-parallel-size", str(decode_tp))) as (cluster, _, _):
        assert len(cluster.alive("prefill")) == len(cluster.alive("decode")) == 1
