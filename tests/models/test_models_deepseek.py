"""DeepseekV3ForCausalLM against transformers on tiny random models: greedy parity across scheduling modes, logits
and the latent cache itself on one prompt, and the pool's size (only latent + rope key per token and layer)."""
from __future__ import annotations

import pytest
import torch

from kv_transfer import KVLayout
from tests.support.hf_reference import load_hf_model, make_llm, run_mode_and_compare
from tests.support.model_checks import cluster_serving_like_offline, prefill_logits
from tests.models.test_parity_tiny import make_prompts
from tests.support.tiny_deepseek import TinyDeepseekConfig, make_tiny_deepseek

MAX_NEW = 32
LORA_Q = TinyDeepseekConfig()  # q_lora_rank, interleaved rope, YaRN
DIRECT_Q = TinyDeepseekConfig(q_lora_rank=None, rope_interleave=False, yarn=False, seed=3)
PROMPT_LENS = [1, 7, 15, 16, 17, 40, 100, 255, 257, 300]


@pytest.fixture(scope="module")
def deepseek_dirs(tmp_path_factory):
    built = {}

    def get(cfg):
        if cfg not in built:
            built[cfg] = make_tiny_deepseek(tmp_path_factory.mktemp(cfg.id), cfg)
        return built[cfg]

    return get


def _prefix_prompts(vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(10_000 + seed)
    system = torch.randint(0, vocab, (64,), generator=g).tolist()  # 4 full blocks of 16
    return [system + torch.randint(0, vocab, (n,), generator=g).tolist() for n in [0, 1, 9, 16, 30, 77]]


@pytest.mark.parametrize("cfg,mode", [(LORA_Q, "chunked"), (LORA_Q, "preempt"), (LORA_Q, "prefix"),
                                      (DIRECT_Q, "chunked")], ids=lambda x: getattr(x, "id", x))
def test_greedy_parity(cfg, mode, deepseek_dirs):
    run_mode_and_compare(deepseek_dirs(cfg), mode, prompts=make_prompts(cfg.vocab_size, cfg.seed, PROMPT_LENS),
                         prefix_prompts=_prefix_prompts(cfg.vocab_size, cfg.seed), max_new_tokens=MAX_NEW,
                         check_logprobs_atol=2e-3)


@pytest.mark.parametrize("cfg", [LORA_Q, DIRECT_Q], ids=lambda c: c.id)
def test_logits_and_latent_cache_equal_transformers(cfg, deepseek_dirs):
    """One 200-token prefill: every position's logits, and the cached vectors equal transformers' MLA cache (its
    normalised latent and roped shared key, which it keeps as a layer's 'keys' and 'values')."""
    d = deepseek_dirs(cfg)
    ids = torch.randint(0, cfg.vocab_size, (200,), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        ref = load_hf_model(d)(ids[None], use_cache=True)
    runner = make_llm(d, num_kv_blocks=16, max_model_len=256).engine.runner
    n = len(ids)
    logits = prefill_logits(runner, ids.tolist(), [n])
    torch.testing.assert_close(logits, ref.logits[0], atol=1e-4, rtol=1e-4)
    for layer, cache in enumerate(ref.past_key_values.layers):
        expected = torch.cat([cache.keys[0, 0], cache.values[0, 0]], -1)  # [tokens, rank + rope]
        torch.testing.assert_close(runner.kv.pool[0, layer].reshape(-1, expected.shape[-1])[:n], expected,
                                   atol=1e-5, rtol=1e-5)


def test_yarn_rotary_and_softmax_scale_equal_transformers(deepseek_dirs):
    """YaRN's frequencies, its cos/sin scale (mscale != mscale_all_dim) and MLA's softmax mscale, at every position."""
    from transformers import AutoConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    from common.layers.mla import MLAttention

    hf_cfg = AutoConfig.from_pretrained(deepseek_dirs(LORA_Q))
    assert hf_cfg.rope_parameters["rope_type"] == "yarn"
    positions = torch.arange(hf_cfg.max_position_embeddings)
    cos, sin = DeepseekV3RotaryEmbedding(hf_cfg)(torch.zeros(1), positions[None])
    ours = make_llm(deepseek_dirs(LORA_Q), num_kv_blocks=4, max_model_len=64).engine.runner.model
    attn = ours.model.layers[0].self_attn
    assert isinstance(attn, MLAttention)
    torch.testing.assert_close(attn.rotary.cos, cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(attn.rotary.sin, sin[0], atol=1e-6, rtol=0)
    assert attn.attn.scale == pytest.approx(DeepseekV3Attention(hf_cfg, 0).scaling, rel=1e-12)
    assert attn.attn.scale != pytest.approx((LORA_Q.qk_nope_head_dim + LORA_Q.qk_rope_head_dim) ** -0.5)


def test_pool_holds_only_latent_and_rope_key(deepseek_dirs):
    cfg = LORA_Q
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    llm = make_llm(deepseek_dirs(cfg), kv_cache_memory_gb=2**-10, block_size=16)  # 1 MiB
    runner = llm.engine.runner
    per_token = cfg.num_layers * width * 4  # float32, one plane
    assert runner.kv.num_blocks == 2**20 // (per_token * 16)
    assert runner.kv.pool.shape == (1, cfg.num_layers, runner.kv.num_blocks, 16, 1, width)
    assert runner.kv.pool.nbytes == runner.kv.num_blocks * 16 * per_token
    layout = KVLayout.from_pool(runner.kv.pool, "m")
    assert layout.kinds == ("paged_latent",) * cfg.num_layers and layout.block_bytes == 16 * per_token


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["zmq", "nixl"])
def test_1p1d_cluster_serves_latent_cache_like_offline(transport, deepseek_dirs):
    """Prefill and decode in separate processes, the latent blocks moved by the transport: same greedy text as
    the colocated engine, and the prefill side sent whole latent blocks."""
    with cluster_serving_like_offline(str(deepseek_dirs(LORA_Q)), transport, max_tokens=16) as (c, _, _):
        def sent() -> int:  # heartbeats lag the work by up to half a second
            return c.alive("prefill")[0]["load"]["kv_bytes_sent"]

        c.wait_for(lambda: sent() > 0, "the prefill worker to report the KV it sent", timeout=10)
        latent_block = LORA_Q.num_layers * 16 * (LORA_Q.kv_lora_rank + LORA_Q.qk_rope_head_dim) * 4  # fp32
        assert sent() % latent_block == 0, sent()
