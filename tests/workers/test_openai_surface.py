"""The OpenAI sampling surface over a real 1P1D cluster and a mixed worker, compared with the offline engine:
logprobs, n, seed, logit_bias; and access control: API key, request size limit, X-Request-Id."""
from __future__ import annotations

import math

import pytest

from router.openai_api import choice_params
from tests.support.cluster_harness import LocalCluster

KEY = "sekret"
MESSAGES = [{"role": "user", "content": "river stone music"}]


@pytest.fixture(scope="module")
def llm(model_dir):
    from common.engine import LLM

    return LLM(model_dir, num_kv_blocks=1024)


@pytest.fixture(scope="module", params=["1P1D", "mixed"])
def cluster(model_dir, request):
    shape = dict(prefill=1, decode=1) if request.param == "1P1D" else dict(prefill=0, decode=0, mixed=1)
    with LocalCluster(model_dir, **shape, transport="zmq",
                      router_args=("--api-key", KEY, "--max-request-bytes", "20000")) as c:
        c.prompt_role = "prefill" if request.param == "1P1D" else "mixed"  # whose prefix cache the prompts hit
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    return cluster.openai(api_key=KEY)


def offline(llm, **params):
    from common import SamplingParams

    return llm.chat(MESSAGES, SamplingParams(**params))[0]


def test_logprobs_match_the_offline_engine(llm, client):
    want = offline(llm, temperature=0.0, max_tokens=8, logprobs=5)
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=8,
                                         logprobs=True, top_logprobs=5)
    content = got.choices[0].logprobs.content
    assert len(content) == len(want["token_ids"])
    tok = llm.tokenizer
    for item, token_id, entry in zip(content, want["token_ids"], want["logprobs"]):
        assert item.token == tok.decode([token_id])
        assert math.isclose(item.logprob, entry[token_id], abs_tol=1e-4)
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:5]
        assert [t.token for t in item.top_logprobs] == [tok.decode([t]) for t, _ in top]
        assert all(math.isclose(a.logprob, b, abs_tol=1e-4) for a, (_, b) in zip(item.top_logprobs, top))
        assert item.bytes == list(item.token.encode())
    # streamed: the same entries, spread over the chunks
    streamed = []
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=8,
                                                logprobs=True, top_logprobs=5, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(s.token, round(s.logprob, 4)) for s in streamed] == [(c.token, round(c.logprob, 4)) for c in content]


def test_seeded_sampling_repeats_and_equals_the_offline_engine(llm, client):
    def ask():
        return client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=1.0, top_p=0.9,
                                              max_tokens=24, seed=1234).choices[0].message.content

    first, second = ask(), ask()
    assert first == second
    assert first == offline(llm, temperature=1.0, top_p=0.9, max_tokens=24, seed=1234)["text"]


def test_n_choices_share_the_prompt_and_follow_their_seeds(llm, client, cluster):
    hits_before = sum(w["load"]["prefix_cache_hits"] for w in cluster.alive(cluster.prompt_role))
    messages = [{"role": "user", "content": "cloud " * 40}]
    got = client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, max_tokens=12, n=3,
                                         seed=99)
    assert [c.index for c in got.choices] == [0, 1, 2]
    from common import SamplingParams

    base = SamplingParams(temperature=1.0, max_tokens=12, seed=99)
    want = [llm.chat(messages, choice_params(base, i))[0]["text"] for i in range(3)]
    assert [c.message.content for c in got.choices] == want
    assert len(set(want)) > 1  # the choices are different samples
    assert got.usage.completion_tokens == sum(len(llm.chat(messages, choice_params(base, i))[0]["token_ids"])
                                              for i in range(3))
    # choices 1 and 2 found the prompt's full blocks in the prefill worker's cache (heartbeats lag a little)
    prompt_blocks = got.usage.prompt_tokens // 16
    cluster.wait_for(lambda: sum(w["load"]["prefix_cache_hits"] for w in cluster.alive(cluster.prompt_role))
                     >= hits_before + 2 * 16 * prompt_blocks - 32, "prefix hits of the forked choices", 5)
    # streamed: every index appears and finishes
    finished = set()
    for chunk in client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, max_tokens=12,
                                                n=3, seed=99, stream=True):
        for c in chunk.choices:
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2}


def test_logit_bias(llm, client):
    plain = offline(llm, temperature=0.0, max_tokens=6)
    forced = 7
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=6,
                                         logit_bias={str(forced): 100})
    assert got.choices[0].message.content == llm.tokenizer.decode([forced] * 6, skip_special_tokens=True)
    banned = plain["token_ids"][0]
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=6,
                                         logit_bias={str(banned): -100})
    assert got.choices[0].message.content == offline(llm, temperature=0.0, max_tokens=6,
                                                     logit_bias={banned: -100})["text"]
    assert got.choices[0].message.content != plain["text"]


def test_api_key_size_limit_and_request_id(cluster):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
    status, _, got = cluster.post("/v1/chat/completions", body)
    assert status == 401 and got["error"]["code"] == "invalid_api_key"
    status, _, got = cluster.post("/v1/chat/completions", body, {"Authorization": "Bearer wrong"})
    assert status == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    status, headers, got = cluster.post("/v1/chat/completions", body, {**auth, "X-Request-Id": "abc-123"})
    assert status == 200 and headers.get("x-request-id") == "abc-123"
    assert cluster.get("/health")[0] == 200  # not under /v1: no key needed for probes
    huge = {**body, "messages": [{"role": "user", "content": "x" * 30000}]}
    status, _, got = cluster.post("/v1/chat/completions", huge, auth)
    assert status == 413 and "limit" in got["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ({"n": 0}, "n"), ({"n": 100}, "n"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
])
def test_bad_sampling_surface(cluster, body, param):
    status, _, got = cluster.post("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, **body},
                                  {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and got["error"]["param"] == param, got


def _chat_text(client, stream: bool, **kw) -> tuple[str, str]:
    if not stream:
        got = client.chat.completions.create(model="tiny", messages=MESSAGES, **kw)
        return got.choices[0].message.content, got.choices[0].finish_reason
    parts, finish = [], None
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **kw):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish


def test_json_schema_outputs_validate(llm, client):
    import json

    from common.sampling_params import GrammarSpec, SamplingParams
    from tests.engine.test_grammar import SCHEMA, check

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    texts = []
    for seed in range(20):
        text, finish = _chat_text(client, stream=seed % 2 == 1, temperature=1.0, max_tokens=600, seed=seed,
                                  response_format=fmt)
        assert finish == "stop", text
        check(json.loads(text), SCHEMA)
        texts.append(text)
    assert len(set(texts)) > 10  # sampled, not one canned answer
    params = SamplingParams(temperature=1.0, max_tokens=600, seed=3, grammar=GrammarSpec("json_schema",
                                                                                          json.dumps(SCHEMA)))
    assert llm.chat(MESSAGES, params)[0]["text"] == texts[3]  # the cluster masks exactly as the engine does


def test_json_object_output(client):
    import json

    text, finish = _chat_text(client, stream=False, temperature=0, max_tokens=600,
                              response_format={"type": "json_object"})
    assert finish == "stop" and isinstance(json.loads(text), dict)


@pytest.mark.parametrize("fmt, needle", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "invalid"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
    ({"type": "yaml"}, "response_format.type"),
])
def test_bad_response_format(cluster, fmt, needle):
    status, _, got = cluster.post("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES,
                                                           "response_format": fmt}, {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and got["error"]["param"] == "response_format" and needle in got["error"]["message"], got
