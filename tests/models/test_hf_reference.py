"""Self-checks of the parity harness itself (no engine needed): tiny model builder,
HF greedy oracle, and the greedy comparison's pass/fail/tie behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support import hf_reference as H
from tests.support.tiny_models import SPECIAL_TOKENS, TinyConfig

LLAMA = TinyConfig(arch="llama", num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=128,
                   vocab_size=512, tie_word_embeddings=False)
QWEN3_TIED = TinyConfig(arch="qwen3", num_heads=4, num_kv_heads=1, head_dim=64, hidden_size=128,
                        vocab_size=480, tie_word_embeddings=True)
N = 32


def _prompt(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.fixture(scope="module", params=[LLAMA, QWEN3_TIED], ids=lambda c: c.id)
def tiny(request, tiny_model_factory):
    return request.param, tiny_model_factory(request.param)


def test_tiny_folder_contents(tiny):
    cfg, d = tiny
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    hc = AutoConfig.from_pretrained(d)
    assert hc.model_type == cfg.arch
    assert (hc.num_attention_heads, hc.num_key_value_heads, hc.head_dim) == (
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    assert hc.tie_word_embeddings == cfg.tie_word_embeddings
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not cfg.tie_word_embeddings)
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == cfg.vocab_size == hc.vocab_size
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == hc.eos_token_id
    assert tok.pad_token == "<|endoftext|>" and tok.bos_token == "<|im_start|>"
    for s in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(s) < 3
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode("hello world, the prefix cache block", add_special_tokens=False)
    assert tok.decode(ids) == "hello world, the prefix cache block"
    assert len(ids) < 12  # BPE actually merged something
    # deterministic build
    assert json.loads((d / "tiny_config.json").read_text())["seed"] == cfg.seed


def test_tiny_build_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from tests.support.tiny_models import make_tiny_model_from_config

    a = make_tiny_model_from_config(tmp_path / "a", LLAMA)
    b = make_tiny_model_from_config(tmp_path / "b", LLAMA)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_hf_greedy_deterministic_and_exact_length(tiny):
    cfg, d = tiny
    p = _prompt(37, cfg.vocab_size, seed=1)
    ids, logits = H.hf_greedy(d, p, N)
    assert len(ids) == N and logits.shape == (N, cfg.vocab_size)
    # bypass the cache: a fresh run gives bit-identical results
    H._REF_CACHE.clear()
    ids2, logits2 = H.hf_greedy(d, p, N)
    assert ids == ids2
    assert torch.equal(logits, logits2)


def test_tiny_outputs_are_varied(tiny):
    """Weight-init sanity: greedy continuations aren't one repeated token and the
    top-2 logits are usually well separated."""
    cfg, d = tiny
    margins, uniq = [], []
    for n in (1, 50, 300):
        ids, logits = H.hf_greedy(d, _prompt(n, cfg.vocab_size, seed=n), N)
        uniq.append(len(set(ids)))
        margins.append(H.top2_margins(logits))
    m = torch.cat(margins)
    assert min(uniq) > 2, uniq  # never a single repeated token / 2-cycle
    assert sum(uniq) / len(uniq) >= N / 2, uniq
    assert float(m.median()) > 0.05, float(m.median())


def test_hf_eos_disabled(tiny):
    """Even if the model's generation_config says the token produced at step 3 is EOS,
    hf_greedy still produces exactly N tokens with the same ids."""
    cfg, d = tiny
    p = _prompt(20, cfg.vocab_size, seed=2)
    ids, logits = H.hf_greedy(d, p, N)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    m.generation_config.eos_token_id = ids[3]
    m.config.eos_token_id = ids[3]
    ids2, logits2 = H.hf_greedy(m, p, N)
    assert ids2 == ids
    assert torch.allclose(logits, logits2, atol=1e-5, rtol=0)
    assert m.generation_config.eos_token_id == ids[3]  # restored


def test_hf_logits_align_with_forward(tiny):
    """logits[i] is the distribution that produced token i: check against one full
    forward pass over prompt + generated tokens."""
    cfg, d = tiny
    p = _prompt(45, cfg.vocab_size, seed=3)
    ids, logits = H.hf_greedy(d, p, N)
    m = H.load_hf_model(d)
    with torch.inference_mode():
        full = m(torch.tensor([p + ids[:-1]])).logits[0, len(p) - 1:]
    assert full.shape == logits.shape
    assert torch.allclose(full, logits, atol=1e-4, rtol=0), float((full - logits).abs().max())


def test_assert_greedy_match_hf_vs_hf(tiny):
    cfg, d = tiny
    p = _prompt(64, cfg.vocab_size, seed=4)
    ids, logits = H.hf_greedy(d, p, N)
    lp = torch.log_softmax(logits, -1)
    ours_lp = [{int(t): float(lp[i, t]) for t in torch.topk(lp[i], 2).indices} for i in range(N)]
    assert H.assert_greedy_match(ids, ours_lp, ids, logits) == N
    assert H.assert_greedy_match(ids, None, ids, logits) == N


def test_assert_greedy_match_fails_on_doctored(tiny):
    cfg, d = tiny
    p = _prompt(64, cfg.vocab_size, seed=4)
    ids, logits = H.hf_greedy(d, p, N)
    margins = H.top2_margins(logits)
    step = next(i for i in range(5, N) if margins[i] > 1e-2)
    bad = list(ids)
    bad[step] = int(torch.topk(logits[step], 2).indices[1])  # HF's runner-up
    with pytest.raises(AssertionError, match=rf"first mismatch at step {step}/{N}.*margin"):
        H.assert_greedy_match(bad, None, ids, logits)
    # wrong length
    with pytest.raises(AssertionError, match="length mismatch"):
        H.assert_greedy_match(ids[:-1], None, ids, logits)
    # right tokens but wrong logprob values (e.g. logits instead of logprobs)
    wrong_lp = [{t: float(logits[i, t])} for i, t in enumerate(ids)]
    with pytest.raises(AssertionError, match="logprob"):
        H.assert_greedy_match(ids, wrong_lp, ids, logits)


def _synthetic_tie(vocab=50, n=10, tie_step=4, margin=1e-6):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, vocab, generator=g) * 3
    top = logits.max(-1).values
    # make step tie_step a near-tie between tokens 7 (winner) and 9
    logits[tie_step, 7] = top[tie_step] + 1.0
    logits[tie_step, 9] = top[tie_step] + 1.0 - margin
    ids = logits.argmax(-1).tolist()
    lp = torch.log_softmax(logits, -1)
    return ids, logits, lp


def test_assert_greedy_match_tie_rule():
    ids, logits, lp = _synthetic_tie()
    assert ids[4] == 7
    ours = ids[:4] + [9] + [0] * 5  # took the runner-up at the tie, then diverged
    ours_lp = [{t: float(lp[i, t]) for t in torch.topk(lp[i], 2).indices.tolist()} for i in range(10)]
    assert H.assert_greedy_match(ours, ours_lp, ids, logits) == 4
    # our top-2 logprobs disagree with HF's -> fail even though it is a tie
    off = [dict(d) for d in ours_lp]
    off[4] = {9: float(lp[4, 9]), 7: float(lp[4, 7]) - 0.01}
    with pytest.raises(AssertionError, match="tie: our logprob"):
        H.assert_greedy_match(ours, off, ids, logits)
    # token not in HF's top-2 -> fail
    bad = ids[:4] + [11] + [0] * 5
    with pytest.raises(AssertionError, match="not in HF's top-2"):
        H.assert_greedy_match(bad, ours_lp, ids, logits)
    # a margin above tie_margin is a real mismatch
    ids2, logits2, lp2 = _synthetic_tie(margin=1e-3)
    ours2 = ids2[:4] + [9] + [0] * 5
    ours2_lp = [{t: float(lp2[i, t]) for t in torch.topk(lp2[i], 2).indices.tolist()} for i in range(10)]
    with pytest.raises(AssertionError, match="first mismatch at step 4"):
        H.assert_greedy_match(ours2, ours2_lp, ids2, logits2)
    # a tie needs our logprobs to judge
    with pytest.raises(AssertionError, match="no logprobs"):
        H.assert_greedy_match(ours, None, ids, logits)
