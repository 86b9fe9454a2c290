"""Mixture-of-experts models against transformers: routing, the expert layer, and whole tiny Qwen3-MoE and
MiniMax-M2 models (logits on a prompt, greedy tokens under chunked prefill, preemption and prefix-cache hits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.layers.moe import FusedMoE, expert_checkpoint_target, select_experts
from tests.support.hf_reference import load_hf_model, run_mode_and_compare
from tests.support.model_checks import cluster_serving_like_offline, prefill_logits
from tests.support.tiny_models import TinyMoeConfig

MAX_NEW = 32
VOCAB = 512

QWEN3_MOE = TinyMoeConfig(arch="qwen3_moe", num_layers=3, mlp_only_layers=(1,), num_heads=4, num_kv_heads=2,
                          head_dim=32, vocab_size=VOCAB, seed=21)
MINIMAX_M2 = TinyMoeConfig(arch="minimax_m2", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                           rotary_dim=16, vocab_size=VOCAB, seed=22)
MODELS = [QWEN3_MOE, MINIMAX_M2]

PROMPT_LENS = [1, 16, 17, 45, 100, 190]
SYSTEM_LEN = 64  # 4 blocks of 16
SUFFIX_LENS = [0, 5, 16, 40]


def _prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(PROMPT_LENS), generator=g).tolist()
    return [torch.randint(0, VOCAB, (PROMPT_LENS[i],), generator=g).tolist() for i in order]


def _prefix_prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(10_000 + seed)
    system = torch.randint(0, VOCAB, (SYSTEM_LEN,), generator=g).tolist()
    return [system + torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in SUFFIX_LENS]


def _by_expert(weights: torch.Tensor, ids: torch.Tensor):
    """Routing results in a canonical order (top-k order is not part of the contract)."""
    ids, order = ids.sort(-1)
    return weights.gather(-1, order), ids


# ----------------------------------------------------------------------------
# routing
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_experts_qwen3_moe(norm_topk_prob, dtype):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = Qwen3MoeConfig(hidden_size=64, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm_topk_prob)
    g = torch.Generator().manual_seed(0)
    router = Qwen3MoeTopKRouter(cfg).to(dtype)
    router.weight.data = (torch.randn(16, 64, generator=g) * 0.3).to(dtype)
    x = torch.randn(300, 64, generator=g).to(dtype)
    logits, hf_w, hf_ids = router(x)
    w, ids = select_experts(logits, 4, "softmax", renormalize=norm_topk_prob)
    w = w.to(logits.dtype)  # what Qwen3MoeSparseBlock does, as HF
    (w, ids), (hf_w, hf_ids) = _by_expert(w, ids), _by_expert(hf_w, hf_ids)
    assert torch.equal(ids, hf_ids)
    assert torch.equal(w, hf_w)


def test_select_experts_minimax_m2():
    from transformers import MiniMaxM2Config
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2TopKRouter

    cfg = MiniMaxM2Config(hidden_size=64, num_local_experts=16, num_experts_per_tok=4)
    g = torch.Generator().manual_seed(1)
    router = MiniMaxM2TopKRouter(cfg)
    router.weight.data = torch.randn(16, 64, generator=g) * 0.3
    bias = torch.randn(16, generator=g) * 0.2
    x = torch.randn(300, 64, generator=g)
    logits, hf_w, hf_ids = router(x, bias)
    w, ids = select_experts(logits, 4, "sigmoid", renormalize=True, correction_bias=bias)
    (w, ids), (hf_w, hf_ids) = _by_expert(w, ids), _by_expert(hf_w, hf_ids)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(w, hf_w, rtol=0, atol=1e-7)
    # the bias must matter here, or this test would not cover it
    _, unbiased = select_experts(logits, 4, "sigmoid", renormalize=True)
    assert (unbiased.sort(-1).values != ids).any(-1).float().mean() > 0.1


def test_select_experts_deepseek_v3():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=64, n_routed_experts=32, num_experts_per_tok=4, n_group=8, topk_group=3,
                           norm_topk_prob=True, routed_scaling_factor=2.5)
    g = torch.Generator().manual_seed(2)
    router = DeepseekV3TopkRouter(cfg)
    router.weight.data = torch.randn(32, 64, generator=g) * 0.3
    router.e_score_correction_bias.copy_(torch.randn(32, generator=g) * 0.2)
    x = torch.randn(300, 64, generator=g)
    logits, hf_w, hf_ids = router(x)
    w, ids = select_experts(F.linear(x.float(), router.weight.float()), 4, "sigmoid", renormalize=True,
                            correction_bias=router.e_score_correction_bias, num_groups=8, topk_groups=3,
                            routed_scaling_factor=2.5)
    (w, ids), (hf_w, hf_ids) = _by_expert(w, ids), _by_expert(hf_w, hf_ids)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(w, hf_w, rtol=0, atol=1e-6)
    # the group restriction must matter here, or this test would not cover it
    _, ungrouped = select_experts(logits, 4, "sigmoid", correction_bias=router.e_score_correction_bias)
    assert (ungrouped.sort(-1).values != ids).any(-1).float().mean() > 0.1


# ----------------------------------------------------------------------------
# the expert layer
# ----------------------------------------------------------------------------


def _naive_moe(x, w13, w2, weights, ids):
    """One token, one chosen expert at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            gate, up = (w13[ids[t, j]] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (w2[ids[t, j]] @ (F.silu(gate) * up))
    return out


def _random_moe(num_experts=8, hidden=32, inter=24, tokens=40, top_k=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    moe = FusedMoE(num_experts, top_k, hidden, inter)
    moe.w13.data = torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.2
    moe.w2.data = torch.randn(num_experts, hidden, inter, generator=g) * 0.2
    x = torch.randn(tokens, hidden, generator=g)
    # experts 5 and 6 never chosen: idle experts must be skipped, not mis-indexed
    choices = torch.tensor([0, 1, 2, 3, 4, 7])
    ids = torch.stack([choices[torch.randperm(6, generator=g)[:top_k]] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    return moe, x, weights, ids


def test_fused_moe_equals_naive_loop_and_hf_experts():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    moe, x, weights, ids = _random_moe()
    ours = moe(x, weights, ids)
    torch.testing.assert_close(ours, _naive_moe(x, moe.w13, moe.w2, weights, ids), rtol=1e-5, atol=1e-5)
    hf = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=24, num_experts=8))
    hf.gate_up_proj.data, hf.down_proj.data = moe.w13.data.clone(), moe.w2.data.clone()
    torch.testing.assert_close(ours, hf(x, ids, weights), rtol=1e-5, atol=1e-5)


def test_fused_moe_local_experts_partition_the_work():
    """Layers holding disjoint expert ranges (expert parallelism) sum to the layer holding them all."""
    moe, x, weights, ids = _random_moe()
    parts = []
    for local in (range(0, 3), range(3, 8)):
        part = FusedMoE(8, 2, 32, 24, local_experts=local)
        part.w13.data, part.w2.data = moe.w13.data[local.start:local.stop], moe.w2.data[local.start:local.stop]
        parts.append(part(x, weights, ids))
    torch.testing.assert_close(parts[0] + parts[1], moe(x, weights, ids), rtol=1e-5, atol=1e-6)


def test_fused_moe_loads_per_expert_and_stacked_checkpoints():
    g = torch.Generator().manual_seed(4)
    w13 = torch.randn(8, 48, 32, generator=g)
    w2 = torch.randn(8, 32, 24, generator=g)
    per_expert, stacked = FusedMoE(8, 2, 32, 24, local_experts=range(2, 6)), FusedMoE(8, 2, 32, 24,
                                                                                       local_experts=range(2, 6))
    names = {"w1": "gate", "w3": "up", "w2": "down"}
    for e in range(8):
        for proj, tensor in (("w1", w13[e, :24]), ("w3", w13[e, 24:]), ("w2", w2[e])):
            target, shard = expert_checkpoint_target(f"model.layers.0.mlp.experts.{e}.{proj}.weight", names)
            assert target == f"model.layers.0.mlp.experts.{'w2' if proj == 'w2' else 'w13'}"
            param = per_expert.w2 if proj == "w2" else per_expert.w13
            param.weight_loader(param, tensor, shard)
    for name, tensor in (("gate_up_proj", w13), ("down_proj", w2)):
        target, shard = expert_checkpoint_target(f"model.layers.0.mlp.experts.{name}", names)
        param = stacked.w13 if target.endswith("w13") else stacked.w2
        param.weight_loader(param, tensor, shard)
    for moe in (per_expert, stacked):
        assert torch.equal(moe.w13, w13[2:6]) and torch.equal(moe.w2, w2[2:6])
    assert expert_checkpoint_target("model.layers.0.mlp.gate.weight", names) is None
    assert expert_checkpoint_target("model.layers.0.mlp.shared_experts.up_proj.weight", names) is None


# ----------------------------------------------------------------------------
# whole models
# ----------------------------------------------------------------------------


def _prefill_logits(model_dir, dtype: str, prompt: list[int], splits: list[int]) -> torch.Tensor:
    from common.engine.config import EngineConfig
    from common.engine.model_runner import ModelRunner

    n = len(prompt)
    return prefill_logits(ModelRunner(EngineConfig(model=str(model_dir), dtype=dtype, block_size=16,
                                                   num_kv_blocks=n // 16 + 2)), prompt, splits)


@pytest.mark.parametrize("cfg", MODELS, ids=lambda c: c.arch)
def test_logits_match_hf(cfg, tiny_model_factory):
    """float32, every position, in two prefill chunks."""
    d = tiny_model_factory(cfg)
    hf = load_hf_model(d)
    if cfg.arch == "minimax_m2":  # the tiny checkpoint must exercise the correction bias
        assert all(layer.mlp.e_score_correction_bias.abs().min() > 0 for layer in hf.model.layers)
    prompt = _prompts(cfg.seed)[0] + _prompts(cfg.seed + 1)[0]
    ours = _prefill_logits(d, "float32", prompt, [37, len(prompt)])
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert ref.std() > 0.5, "degenerate tiny model"
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-4)


@pytest.mark.parametrize("cfg", MODELS, ids=lambda c: c.arch)
def test_bf16_logits_match_hf(cfg, tiny_model_factory):
    """bfloat16, one prefill chunk: the same operations in the same order and precision as transformers, so the
    logits agree to far below a bf16 step; a rounding taken elsewhere (routing weights cast early, expert outputs
    summed in bf16, the correction bias kept in float32) compounds through the random model into whole units."""
    from transformers import AutoModelForCausalLM

    d = tiny_model_factory(cfg)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    prompt = _prompts(cfg.seed)[0] + _prompts(cfg.seed + 1)[0]
    ours = _prefill_logits(d, "bfloat16", prompt, [len(prompt)])
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-2)


@pytest.mark.parametrize("mode", ["chunked", "preempt", "prefix"])
@pytest.mark.parametrize("cfg", MODELS, ids=lambda c: c.arch)
def test_greedy_parity(cfg, mode, tiny_model_factory):
    d = tiny_model_factory(cfg)
    _, ties = run_mode_and_compare(d, mode, prompts=_prompts(cfg.seed), prefix_prompts=_prefix_prompts(cfg.seed),
                                   max_new_tokens=MAX_NEW, check_logprobs_atol=2e-3)
    if ties:
        print(f"accepted numerical ties (prompt, step): {ties}")


# ----------------------------------------------------------------------------
# served disaggregated
# ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["zmq", "nixl"])
def test_cluster_1p1d_serves_qwen3_moe_like_offline(transport, tiny_model_factory):
    """Prefill and decode workers hand the MoE model's KV over each transport; streams equal the offline engine."""
    with cluster_serving_like_offline(str(tiny_model_factory(QWEN3_MOE)), transport):
        pass
