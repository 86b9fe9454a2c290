"""Qwen3NextForCausalLM against transformers on a tiny random model: logits and the recurrent state after chunked
prefills, greedy tokens under chunked prefill and preemption, the pools, and the engine features a recurrent
state rules out (prefix caching off, speculative decoding refused)."""
from __future__ import annotations

import logging

import pytest
import torch

from common.errors import InvalidRequestError
from common.layers.gated_delta import GatedDeltaNet
from tests.support.hf_reference import (check_lengths, check_outputs_against_hf, greedy_params, hf_greedy_batch,
                                load_hf_model, make_llm, run_mode_and_compare)
from tests.support.model_checks import cluster_serving_like_offline, prefill_logits
from tests.models.test_parity_tiny import make_prompts
from tests.support.tiny_qwen3_next import TinyQwen3NextConfig, make_tiny_qwen3_next

MAX_NEW = 32
CFG = TinyQwen3NextConfig()
PROMPT_LENS = [1, 3, 16, 17, 45, 100, 190]
# transformers' own float32 chunked delta rule is 6e-4 away from its float64 result on this model (random keys make
# the per-chunk triangular solve ill-conditioned); prefilling in other chunk boundaries moves ours by as much again
CHUNKED_ATOL = 2e-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen3_next(tmp_path_factory.mktemp(CFG.id), CFG)


@pytest.mark.parametrize("splits", [[150], [37, 101, 150]], ids=["one_chunk", "three_chunks"])
def test_logits_and_state_equal_transformers(splits, model_dir):
    """Every position's logits, and afterwards each linear layer's state slot (block 0's) holds transformers'
    cached conv inputs and delta state."""
    prompt = torch.randint(0, CFG.vocab_size, (150,), generator=torch.Generator().manual_seed(7)).tolist()
    with torch.inference_mode():
        ref = load_hf_model(model_dir)(torch.tensor([prompt]), use_cache=True)
    assert ref.logits.std() > 0.5, "degenerate tiny model"
    runner = make_llm(model_dir, num_kv_blocks=16, max_model_len=256).engine.runner
    ours = prefill_logits(runner, prompt, splits)
    atol = 1e-4 if len(splits) == 1 else CHUNKED_ATOL
    torch.testing.assert_close(ours, ref.logits[0], atol=atol, rtol=0)
    layers = runner.model.model.layers
    linear = [i for i, layer in enumerate(layers) if isinstance(layer.self_attn, GatedDeltaNet)]
    assert linear == [i for i, t in enumerate(runner.config.hf_config.layer_types) if t == "linear_attention"]
    for i in linear:
        cache, mixer = ref.past_key_values.layers[i], layers[i].self_attn
        kernel = mixer.kernel
        torch.testing.assert_close(mixer.conv_state[0], cache.conv_states[0][0, :, -(kernel - 1):],
                                   atol=atol, rtol=0)
        torch.testing.assert_close(mixer.delta_state[0], cache.recurrent_states[0][0], atol=atol, rtol=atol)


def test_bf16_logits_match_transformers(model_dir):
    """bfloat16, one prefill chunk: the projections, conv and gates round where transformers rounds, the delta rule
    and its state stay float32 as there, so the logits agree far below a bf16 step."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    prompt = torch.randint(0, CFG.vocab_size, (150,), generator=torch.Generator().manual_seed(8)).tolist()
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    runner = make_llm(model_dir, dtype="bfloat16", num_kv_blocks=16, max_model_len=256).engine.runner
    torch.testing.assert_close(prefill_logits(runner, prompt, [150]), ref, atol=1e-2, rtol=0)


def _run_and_compare(model_dir, prompts, **engine_args):
    llm = make_llm(model_dir, **engine_args)
    outs = llm.generate(prompts, greedy_params(MAX_NEW), use_tqdm=False)
    check_lengths(outs, MAX_NEW)
    check_outputs_against_hf(outs, prompts, hf_greedy_batch(model_dir, prompts, MAX_NEW),
                             label=str(engine_args), check_logprobs_atol=2e-3)
    return llm.stats()


def test_greedy_parity_chunked_prefill(model_dir):
    """A 37-token budget: every prompt over 36 tokens is prefilled in chunks whose boundaries fall at no block,
    kernel or 64-token delta-rule chunk boundary, while other sequences decode in the same steps."""
    prompts = make_prompts(CFG.vocab_size, CFG.seed, PROMPT_LENS)
    stats = _run_and_compare(model_dir, prompts, max_num_batched_tokens=37, max_model_len=512)
    assert stats["prefix_cache_hit_tokens"] == 0


def test_greedy_parity_preempted(model_dir):
    """Blocks for the longest sequence and a few more: sequences are preempted, freed blocks (and so their state
    slots) go to others, and a recomputed sequence starts its state again from zero."""
    prompts = make_prompts(CFG.vocab_size, CFG.seed + 1, PROMPT_LENS)
    run_mode_and_compare(model_dir, "preempt", prompts=prompts, prefix_prompts=[], max_new_tokens=MAX_NEW,
                         check_logprobs_atol=2e-3)


def test_prefix_caching_is_off_and_repeats_start_fresh(model_dir, caplog):
    """Prefix caching is switched off with a log line; the same prompts again (into blocks, and so state slots,
    that earlier sequences used) give the same tokens."""
    prompts = make_prompts(CFG.vocab_size, CFG.seed + 2, [1, 40, 70])  # a 1-token prompt runs as a decode
    with caplog.at_level(logging.INFO, logger="nano_pd.config"):
        llm = make_llm(model_dir, enable_prefix_caching=True, num_kv_blocks=32, max_model_len=256)
    assert "prefix caching is off" in caplog.text
    assert not llm.engine.config.enable_prefix_caching and not llm.engine.block_manager.enable_prefix_caching
    first = llm.generate(prompts, greedy_params(8), use_tqdm=False)
    again = llm.generate(prompts + prompts, greedy_params(8), use_tqdm=False)
    assert [o["token_ids"] for o in again] == [o["token_ids"] for o in first] * 2
    assert llm.stats()["prefix_cache_hit_tokens"] == 0


@pytest.mark.parametrize("spec", [{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2},
                                  {"method": "draft_model", "model": "SELF", "num_speculative_tokens": 2}],
                         ids=["ngram", "draft"])
def test_speculative_decoding_is_refused(spec, model_dir):
    spec = {k: (str(model_dir) if v == "SELF" else v) for k, v in spec.items()}
    with pytest.raises(InvalidRequestError, match="recurrent state that cannot be rolled back"):
        make_llm(model_dir, speculative_config=spec)


def test_recurrent_draft_model_is_refused(model_dir, tiny_model_factory):
    from common.engine import LLM
    from tests.support.tiny_models import TinyConfig

    target = tiny_model_factory(TinyConfig(vocab_size=CFG.vocab_size))
    with pytest.raises(InvalidRequestError, match="draft model .* recurrent state"):
        LLM(str(target), num_kv_blocks=64,
            speculative_config={"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 2})


def test_pools(model_dir):
    """Only the full-attention layers have paged K/V; every block id has one float32 state slot holding each
    linear layer's conv inputs (kernel - 1 per channel) and delta state; a memory budget pays for both."""
    conv_dim = 2 * CFG.linear_num_key_heads * CFG.linear_key_head_dim + \
        CFG.linear_num_value_heads * CFG.linear_value_head_dim
    per_layer = conv_dim * (CFG.conv_kernel - 1) + \
        CFG.linear_num_value_heads * CFG.linear_key_head_dim * CFG.linear_value_head_dim
    num_linear = CFG.num_layers - CFG.num_layers // CFG.full_attention_interval
    runner = make_llm(model_dir, kv_cache_memory_gb=2**-10, block_size=16).engine.runner  # 1 MiB
    kv_block = 2 * (CFG.num_layers - num_linear) * 16 * CFG.num_kv_heads * CFG.head_dim * 4
    assert runner.kv.num_blocks == 2**20 // (kv_block + num_linear * per_layer * 4)
    assert runner.kv.pool.shape == (2, CFG.num_layers - num_linear, runner.kv.num_blocks, 16, CFG.num_kv_heads,
                                    CFG.head_dim)
    assert runner.kv.state_pool.shape == (runner.kv.num_blocks, num_linear * per_layer)
    assert runner.kv.state_pool.dtype == torch.float32 and runner.decode_mode == "eager"


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["zmq", "nixl"])
def test_cluster_1p1d_serves_like_offline(transport, model_dir):
    """The prefill worker hands each request's full-attention K/V blocks and its recurrent state over the
    transport; the decode worker continues from that state: streams equal the offline engine's greedy text."""
    from tests.workers.test_cluster import metric_value

    with cluster_serving_like_offline(str(model_dir), transport) as (c, llm, ps):
        runner = llm.engine.runner
        block_bytes = runner.kv.pool[:, :, 0].numel() * runner.kv.pool.element_size()
        state_bytes = runner.kv.state_pool.shape[1] * runner.kv.state_pool.element_size()
        # the byte counter holds whole blocks plus one state slot per request
        sent = lambda: metric_value(c.get("/metrics")[1].decode(), "nano_pd:kv_transfer_bytes_total")  # noqa: E731
        c.wait_for(lambda: sent() > len(ps) * state_bytes, "every KV push in /metrics", 10)
        assert (sent() - len(ps) * state_bytes) % block_bytes == 0
