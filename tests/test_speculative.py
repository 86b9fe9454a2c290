"""n-gram speculative decoding: the proposer, and output identical to decoding without speculation (greedy and
seeded sampling, batched, with prefix hits and with preemption), offline and in a decode worker."""
from __future__ import annotations

import random

import pytest

from common import LLM, SamplingParams
from common.errors import InvalidRequestError
from common.speculative import propose_ngram
from tests.cluster_harness import LocalCluster
from tests.test_cluster import TINY, model_dir, offline  # noqa: F401  (module fixtures, reused)

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}


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


def test_decode_worker_with_speculation_matches_offline(model_dir, offline):  # noqa: F811
    from tests.test_cluster import prompts, run_concurrently, stream_chat

    ps = prompts(8, seed=3)
    with LocalCluster(model_dir, 1, 1, transport="zmq",
                      worker_args=("--num-kv-blocks", "512", "--speculative-config",
                                   '{"method": "ngram", "num_speculative_tokens": 3}')) as c:
        client = c.openai()
        results = run_concurrently(lambda p: stream_chat(client, p, 40, ignore_eos=True), ps, workers=8)
        assert [r["text"] for r in results] == offline(ps, 40, ignore_eos=True)
        from tests.test_cluster import metric_value

        c.wait_for(lambda: metric_value(c.get("/metrics")[1].decode(),
                                        'vllm:spec_decode_num_draft_tokens_total{model_name="tiny"}') > 0,
                   "the decode worker's draft counter in /metrics", 5)
