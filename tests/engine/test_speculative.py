"""Speculative decoding (n-gram and draft model): the proposer, output identical to decoding without speculation
(greedy and seeded sampling, batched, with prefix hits and with preemption), offline and in a decode worker;
sampled output distributed as the target's (chi-square); per-request and global acceptance metrics."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections import Counter

import pytest
import torch

from common import SamplingParams
from common.engine import LLM
from common.errors import InvalidRequestError, ModelLoadError
from common.engine.spec_decode.ngram import propose_ngram
from tests.support.cluster_harness import LocalCluster, assert_idle
from tests.support.tiny_models import SERVING_TINY as TINY
from tests.support.tiny_models import TinyConfig

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}
# another architecture and size with TINY's vocabulary (the tiny tokenizer is trained deterministically)
OTHER_DRAFT = TinyConfig(arch="qwen3", num_heads=2, num_kv_heads=1, head_dim=32, hidden_size=64, num_layers=1,
                         vocab_size=512, seed=1)


def test_propose_ngram():
    assert propose_ngram([1, 2, 3, 4, 1, 2], 3, 4, 1) == [3, 4, 1]
    assert propose_ngram([5, 6, 7, 5, 6, 7, 5, 6], 4, 3, 1) == [7, 5, 6]  # the latest, longest match
    assert propose_ngram([1, 2, 3], 2, 4, 1) == []
    assert propose_ngram([9, 9], 2, 4, 1) == [9]
    assert propose_ngram([1, 256, 0, 0, 0, 0, 0, 0, 0, 1], 2, 1, 1) == [256, 0]  # byte-level near-misses ignored
    assert propose_ngram([1, 2, 1, 2], 0, 4, 1) == []


@pytest.mark.parametrize("bad", [{"method": "medusa"}, {"num_speculative_tokens": 0},
                                 {"prompt_lookup_min": 3, "prompt_lookup_max": 2}, {"nonsense": 1}])
def test_bad_config(bad, tiny_model_factory):
    with pytest.raises(InvalidRequestError):
        LLM(str(tiny_model_factory(TINY)), num_kv_blocks=64, speculative_config=bad)


def copy_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud".split()
    out = []
    for i in range(n):
        base = " ".join(rng.choice(words) for _ in range(rng.randint(8, 30)))
        out.append(f"#{i} copy: {base}\n{base}\n{base[:rng.randint(5, 40)]}")
    return out


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=11)],
                         ids=["greedy", "seeded"])
@pytest.mark.parametrize("engine_args", [dict(num_kv_blocks=1024), dict(num_kv_blocks=24),
                                         dict(num_kv_blocks=1024, max_num_batched_tokens=64)],
                         ids=["plain", "preempting", "small-budget"])
def test_outputs_identical_to_plain_decoding(tiny_model_factory, sampling, engine_args):
    model = str(tiny_model_factory(TINY))
    prompts = copy_prompts(8)
    params = SamplingParams(max_tokens=48, ignore_eos=True, **sampling)
    plain = LLM(model, **engine_args)
    spec = LLM(model, speculative_config=NGRAM, **engine_args)
    want = [o["token_ids"] for o in plain.generate(prompts, params, use_tqdm=False)]
    got = [o["token_ids"] for o in spec.generate(prompts, params, use_tqdm=False)]
    assert got == want
    # again: prompts now hit the prefix cache
    assert [o["token_ids"] for o in spec.generate(prompts, params, use_tqdm=False)] == want
    stats = spec.stats()
    assert stats["spec_draft_tokens"] > 0 and stats["free_blocks"] == stats["total_blocks"]
    if engine_args["num_kv_blocks"] == 24:
        assert stats["num_preemptions"] > 0


def test_disable_by_batch_size(tiny_model_factory):
    model = str(tiny_model_factory(TINY))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = LLM(model, num_kv_blocks=512, speculative_config={**NGRAM, "disable_by_batch_size": 2})
    llm.generate(copy_prompts(4), params, use_tqdm=False)  # 4 running: never drafts
    assert llm.stats()["spec_draft_tokens"] == 0
    llm.generate(copy_prompts(1), params, use_tqdm=False)
    assert llm.stats()["spec_draft_tokens"] > 0


@pytest.mark.slow
def test_smollm2_copy_task_identical_and_accepting(smollm2_dir):
    code = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
    msg = [{"role": "user", "content": "Repeat this code exactly:\n\n" + code}]
    params = SamplingParams(temperature=0.0, max_tokens=80)
    plain = LLM(smollm2_dir, num_kv_blocks=256).chat(msg, params)[0]["token_ids"]
    spec_llm = LLM(smollm2_dir, num_kv_blocks=256, speculative_config={"method": "ngram",
                                                                         "num_speculative_tokens": 5})
    assert spec_llm.chat(msg, params)[0]["token_ids"] == plain
    stats = spec_llm.stats()
    assert stats["spec_accepted_tokens"] >= 10, stats


@pytest.mark.parametrize("shape", [dict(prefill=1, decode=1), dict(prefill=0, decode=0, mixed=1)],
                         ids=["1P1D", "mixed"])
def test_decode_worker_with_speculation_matches_offline(model_dir, offline, shape):
    """n-gram speculation on the worker that decodes (and, mixed, also prefills): greedy output unchanged, drafts
    counted, no block held afterwards."""
    from tests.workers.test_cluster import metric_value, prompts, run_concurrently, stream_chat

    ps = prompts(8, seed=3)
    with LocalCluster(model_dir, **shape, transport="zmq",
                      worker_args=("--num-kv-blocks", "512", "--speculative-config",
                                   '{"method": "ngram", "num_speculative_tokens": 3}')) as c:
        client = c.openai()
        results = run_concurrently(lambda p: stream_chat(client, p, 40, ignore_eos=True), ps, workers=8)
        assert [r["text"] for r in results] == offline(ps, 40, ignore_eos=True)
        c.wait_for(lambda: metric_value(c.get("/metrics")[1].decode(),
                                        'vllm:spec_decode_num_draft_tokens_total{model_name="tiny"}') > 0,
                   "the worker's draft counter in /metrics", 5)
        assert_idle(c)


# --- draft-model speculation --------------------------------------------------------------------------------------
def truncated_copy(src, dst, num_layers: int, **config_overrides) -> str:
    """src's first num_layers layers (with its embeddings, final norm and head) as a model folder: a draft that
    agrees with src part of the time (layer-skip self-speculation)."""
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    tensors = {}
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name.endswith(".safetensors"):
            for key, value in load_file(path).items():
                layer = re.search(r"\.layers\.(\d+)\.", key)
                if layer is None or int(layer.group(1)) < num_layers:
                    tensors[key] = value.contiguous()
        elif os.path.isfile(path):
            shutil.copy(path, dst)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**config, "num_hidden_layers": num_layers, **config_overrides}, f)
    return str(dst)


@pytest.fixture(scope="module")
def drafts(tiny_model_factory, tmp_path_factory):
    """name -> draft model folder for TINY: another model, TINY's first layer, and TINY itself."""
    target = str(tiny_model_factory(TINY))
    return {"other": str(tiny_model_factory(OTHER_DRAFT)),
            "truncated": truncated_copy(target, tmp_path_factory.mktemp("tiny-1layer"), 1),
            "self": target}


def draft_config(path: str, k: int = 4, **extra) -> dict:
    return {"method": "draft_model", "model": path, "num_speculative_tokens": k, **extra}


def check_metrics(llm: LLM, outs: list[dict]):
    """Per-request counts add up to the engine's, and the mean acceptance length follows from them."""
    stats = llm.stats()
    assert sum(o["num_draft_tokens"] for o in outs) <= stats["spec_draft_tokens"]
    assert all(0 <= o["num_accepted_tokens"] <= o["num_draft_tokens"] for o in outs)
    if stats["spec_verify_steps"]:
        assert stats["spec_mean_acceptance_length"] == pytest.approx(
            1 + stats["spec_accepted_tokens"] / stats["spec_verify_steps"])


@pytest.mark.parametrize("draft,sampling,engine_args", [
    ("other", dict(temperature=0.0), dict(num_kv_blocks=1024)),
    ("truncated", dict(temperature=0.0), dict(num_kv_blocks=1024)),
    ("self", dict(temperature=0.0), dict(num_kv_blocks=1024)),
    ("truncated", dict(temperature=1.0, top_p=0.9, seed=11), dict(num_kv_blocks=1024)),
    ("truncated", dict(temperature=0.0), dict(num_kv_blocks=24)),
    ("self", dict(temperature=1.0, top_p=0.9, seed=11), dict(num_kv_blocks=24)),
    ("truncated", dict(temperature=0.0), dict(num_kv_blocks=1024, max_num_batched_tokens=64)),
    ("self", dict(temperature=0.0), dict(num_kv_blocks=1024, max_num_batched_tokens=64)),
], ids=["other-greedy", "truncated-greedy", "self-greedy", "truncated-seeded", "truncated-preempting",
        "self-seeded-preempting", "truncated-small-budget", "self-small-budget"])
def test_draft_model_outputs_identical_to_plain_decoding(tiny_model_factory, drafts, draft, sampling, engine_args):
    model = str(tiny_model_factory(TINY))
    prompts = copy_prompts(8)  # 20 to 110 tokens each
    params = [SamplingParams(max_tokens=24 + 4 * i, ignore_eos=True, **sampling) for i in range(len(prompts))]
    want = [o["token_ids"] for o in LLM(model, **engine_args).generate(prompts, params, use_tqdm=False)]
    spec = LLM(model, speculative_config=draft_config(drafts[draft]), **engine_args)
    outs = spec.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == want
    check_metrics(spec, outs)
    # again: prompts now hit the prefix cache, whose draft KV the draft model must compute itself
    outs = spec.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == want
    stats = spec.stats()
    assert stats["prefix_cache_hit_tokens"] > 0 and stats["free_blocks"] == stats["total_blocks"]
    assert stats["spec_draft_tokens"] > 0 and all(o["num_draft_tokens"] > 0 for o in outs)
    if engine_args["num_kv_blocks"] == 24:
        assert stats["num_preemptions"] > 0
    if draft == "self" and sampling["temperature"] == 0:
        # its own greedy proposals: only fp32 rounding between the draft's and the target's passes can differ
        assert stats["spec_accepted_tokens"] >= 0.95 * stats["spec_draft_tokens"], stats
        assert stats["spec_mean_acceptance_length"] > 4.5, stats
    if draft == "truncated":
        assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"], stats


def test_draft_model_computes_its_own_kv_for_prefix_hits(tiny_model_factory):
    """Prompts whose blocks the target computed while nobody drafted (a batch above disable_by_batch_size) come back
    as prefix hits: the draft has no KV there, so it must prefill them itself; trusting the hit would read empty
    draft KV and the model drafting for itself would stop being accepted."""
    model = str(tiny_model_factory(TINY))
    prompts = copy_prompts(3, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    llm = LLM(model, num_kv_blocks=512, speculative_config=draft_config(model, disable_by_batch_size=1))
    want = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.stats()["spec_draft_tokens"] == 0
    for prompt, expected in zip(prompts, want):
        hits = llm.stats()["prefix_cache_hit_tokens"]
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        assert out["token_ids"] == expected and llm.stats()["prefix_cache_hit_tokens"] > hits
        assert out["num_accepted_tokens"] >= 0.95 * out["num_draft_tokens"] > 0, out


def test_draft_model_near_the_context_limit(tiny_model_factory, drafts, tmp_path):
    """Drafts stop at max_model_len, and at the draft model's own shorter context (its rotary table ends there)."""
    model = str(tiny_model_factory(TINY))
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    prompt = list(range(3, 100))
    want = LLM(model, num_kv_blocks=64, max_model_len=130).generate(prompt, params, use_tqdm=False)[0]
    llm = LLM(model, num_kv_blocks=64, max_model_len=130, speculative_config=draft_config(drafts["self"]))
    got = llm.generate(prompt, params, use_tqdm=False)[0]
    assert got["token_ids"] == want["token_ids"] and got["finish_reason"] == "length"
    assert got["num_accepted_tokens"] > 0
    short_draft = truncated_copy(model, tmp_path / "short", TINY.num_layers, max_position_embeddings=110)
    short = LLM(model, num_kv_blocks=64, speculative_config=draft_config(short_draft))
    got = short.generate(prompt, SamplingParams(temperature=0.0, max_tokens=33, ignore_eos=True), use_tqdm=False)[0]
    assert got["token_ids"] == want["token_ids"][:33]
    assert 0 < got["num_draft_tokens"] <= 110 - len(prompt)


@pytest.mark.parametrize("kind", ["no model", "missing model", "vocab mismatch", "model for ngram", "not a dict"])
def test_bad_draft_model_config(kind, tiny_model_factory):
    model = str(tiny_model_factory(TINY))
    config, error = {
        "no model": ({"method": "draft_model", "num_speculative_tokens": 3}, InvalidRequestError),
        "missing model": (draft_config("/nonexistent/draft-model"), ModelLoadError),
        "vocab mismatch": (draft_config(str(tiny_model_factory(TinyConfig(vocab_size=384)))), InvalidRequestError),
        "model for ngram": ({**NGRAM, "model": model}, InvalidRequestError),
        "not a dict": ('{"method": "ngram"}', InvalidRequestError),
    }[kind]
    with pytest.raises(error) as info:
        LLM(model, num_kv_blocks=64, speculative_config=config)
    if kind == "vocab mismatch":
        assert "384" in str(info.value) and "512" in str(info.value)


def test_draft_model_method_inferred_from_model(tiny_model_factory, drafts):
    llm = LLM(str(tiny_model_factory(TINY)), num_kv_blocks=64,
              speculative_config={"model": drafts["other"], "num_speculative_tokens": 2})
    assert llm.engine.config.speculative.method == "draft_model" and llm.engine.drafter is not None


def test_per_request_metrics_ngram(tiny_model_factory):
    model = str(tiny_model_factory(TINY))
    llm = LLM(model, num_kv_blocks=512, speculative_config=NGRAM)
    outs = llm.generate(copy_prompts(4), SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True),
                        use_tqdm=False)
    stats = llm.stats()
    assert sum(o["num_draft_tokens"] for o in outs) == stats["spec_draft_tokens"] > 0
    assert sum(o["num_accepted_tokens"] for o in outs) == stats["spec_accepted_tokens"]
    check_metrics(llm, outs)
    plain = LLM(model, num_kv_blocks=64).generate("hi", SamplingParams(max_tokens=4), use_tqdm=False)[0]
    assert plain["num_draft_tokens"] == plain["num_accepted_tokens"] == 0


# --- distribution of sampled output ----------------------------------------------------------------------------
# small weights make the next token depend mostly on the last one, so a prompt sampled from the model itself gives
# n-gram drafts that are often accepted (with the default 0.15 init they almost never are); the LM head is then
# scaled up (LM_HEAD_SCALE) so the top-k probabilities differ enough for the test to have power
SMOOTH = TinyConfig(arch="llama", num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=128, num_layers=2,
                    vocab_size=512, init_std=0.05)
LM_HEAD_SCALE = 6.0
TOP_K, NEW_TOKENS, NUM_SAMPLES = 3, 4, 2000


def chi_square_p_value(observed: Counter, expected: dict) -> float:
    """Pearson's test; cells expecting fewer than 5 samples are pooled so the chi-square approximation holds."""
    n = sum(observed.values())
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for outcome, p in expected.items():
        if n * p >= 5:
            cells.append((observed[outcome], n * p))
        else:
            pooled_obs, pooled_exp = pooled_obs + observed[outcome], pooled_exp + n * p
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                   torch.tensor(stat / 2, dtype=torch.float64)).item()  # chi2(df) survival


def hf_sequence_probs(hf, prompt: list[int], temperature: float = 1.0) -> tuple[dict[tuple, float], float]:
    """The probability of every NEW_TOKENS-token continuation under top-k sampling, from transformers' logits, and
    the smallest gap between the k-th and (k+1)-th logit on the way (a near-tie would let rounding change the
    support)."""
    paths, margin = {(): 1.0}, float("inf")
    for _ in range(NEW_TOKENS):
        keys = list(paths)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + list(k) for k in keys])).logits[:, -1].double()
        top = logits.topk(TOP_K + 1)
        margin = min(margin, (top.values[:, TOP_K - 1] - top.values[:, TOP_K]).min().item())
        probs = (top.values[:, :TOP_K] / temperature).softmax(-1)
        paths = {k + (t,): paths[k] * p for i, k in enumerate(keys)
                 for t, p in zip(top.indices[i, :TOP_K].tolist(), probs[i].tolist())}
    return paths, margin


@pytest.fixture(scope="module")
def smooth_model(tiny_model_factory, tmp_path_factory):
    """(model folder, a prompt of 100 tokens sampled from the model, and the continuation probabilities at
    temperatures 1 and 1.3). The prompt is the first of a fixed series of seeds with no top-k near-tie on the way,
    so the test is deterministic."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = str(tmp_path_factory.mktemp("smooth-sharp"))
    shutil.copytree(tiny_model_factory(SMOOTH), model, dirs_exist_ok=True)
    weights = load_file(os.path.join(model, "model.safetensors"))
    weights["lm_head.weight"] *= LM_HEAD_SCALE
    save_file(weights, os.path.join(model, "model.safetensors"), metadata={"format": "pt"})
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    llm = LLM(model, num_kv_blocks=64)
    for seed in range(20):
        params = SamplingParams(temperature=1.0, top_k=TOP_K, max_tokens=97, ignore_eos=True, seed=seed)
        prompt = [1, 2, 3] + llm.generate([[1, 2, 3]], params, use_tqdm=False)[0]["token_ids"]
        probs, margin = hf_sequence_probs(hf, prompt)
        if margin > 1e-4:
            return model, prompt, probs, hf_sequence_probs(hf, prompt, temperature=1.3)[0]
    raise AssertionError("no prompt without a top-k near-tie")


@pytest.mark.parametrize("seeded", [False, True], ids=["unseeded", "seeded"])
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_sampled_output_follows_target_distribution(smooth_model, method, seeded):
    """The joint distribution of the first NEW_TOKENS sampled tokens (81 outcomes under top-3) over NUM_SAMPLES
    requests equals transformers' (Pearson chi-square, p > 0.001, deterministic: fixed seeds). Tokens 2 to 4 come
    from verification passes, many of them at accepted draft positions. The model drafts for itself: its greedy
    proposals are accepted about a third of the time here, and were they accepted unchecked the output would be
    far from the target's distribution."""
    model, prompt, expected, hotter = smooth_model
    spec = {"method": "ngram", "num_speculative_tokens": 3} if method == "ngram" else draft_config(model, k=3)
    llm = LLM(model, num_kv_blocks=4096, max_num_seqs=1024, max_num_batched_tokens=16384, speculative_config=spec)
    params = [SamplingParams(temperature=1.0, top_k=TOP_K, max_tokens=NEW_TOKENS, ignore_eos=True,
                             seed=i if seeded else None) for i in range(NUM_SAMPLES)]
    torch.manual_seed(1234)
    observed = Counter(tuple(o["token_ids"]) for o in llm.generate([prompt] * NUM_SAMPLES, params, use_tqdm=False))
    stats = llm.stats()
    assert stats["spec_accepted_tokens"] > 0.1 * NUM_SAMPLES, stats  # the draft positions are well exercised
    assert set(observed) <= set(expected), "sampled a continuation outside the top-k support"
    assert chi_square_p_value(observed, expected) > 1e-3
    # the test can tell a modestly different distribution apart (same support, temperature 1.3)
    assert chi_square_p_value(observed, hotter) < 1e-3


@pytest.mark.slow
def test_smollm2_draft_model_identical(smollm2_dir, tmp_path_factory):
    """SmolLM2 with its first 6 of 30 layers as the draft (no smaller SmolLM2 is available offline)."""
    draft = truncated_copy(smollm2_dir, tmp_path_factory.mktemp("smollm2-6layers"), 6)
    msgs = [[{"role": "user", "content": "Repeat exactly: one two three four five six seven eight"}],
            [{"role": "user", "content": "What is the capital of France?"}]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = [o["token_ids"] for o in LLM(smollm2_dir, num_kv_blocks=64).chat(msgs, params)]
    llm = LLM(smollm2_dir, num_kv_blocks=64, speculative_config=draft_config(draft, k=3))
    outs = llm.chat(msgs, params)
    assert [o["token_ids"] for o in outs] == want
    assert llm.stats()["spec_accepted_tokens"] > 0, llm.stats()
    check_metrics(llm, outs)


def test_decode_worker_with_draft_model_matches_offline(model_dir, offline, drafts):  # noqa: F811
    """The decode worker loads the draft and computes the draft KV of prompts whose target KV a prefill worker sent."""
    from tests.workers.test_cluster import metric_value, prompts, run_concurrently, stream_chat

    ps = prompts(6, seed=4)
    config = json.dumps(draft_config(drafts["self"], k=3))
    with LocalCluster(model_dir, 1, 1, transport="zmq",
                      worker_args=("--num-kv-blocks", "512", "--speculative-config", config)) as c:
        client = c.openai()
        results = run_concurrently(lambda p: stream_chat(client, p, 32, ignore_eos=True), ps, workers=6)
        assert [r["text"] for r in results] == offline(ps, 32, ignore_eos=True)
        series = 'vllm:spec_decode_num_{}_tokens_total{{model_name="tiny"}}'
        c.wait_for(lambda: metric_value(c.get("/metrics")[1].decode(), series.format("accepted")) > 0,
                   "the decode worker's accepted-draft counter in /metrics", 5)
        text = c.get("/metrics")[1].decode()
        # the model drafting for itself is accepted nearly always, which it could not be on empty draft KV
        assert metric_value(text, series.format("accepted")) >= 0.9 * metric_value(text, series.format("draft"))
        assert metric_value(text, 'vllm:spec_decode_num_drafts_total{model_name="tiny"}') > 0
        # one acceptance rate per finished request, from the counts its decode worker sent with its last tokens
        rates = 'nano_pd:request_spec_acceptance_rate_{}{{model_name="tiny"}}'
        assert metric_value(text, rates.format("count")) == len(ps)
        assert metric_value(text, rates.format("sum")) >= 0.9 * len(ps)
