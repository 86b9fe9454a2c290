"""Sampler: greedy, filters, seeded draws, penalties and logprobs on hand-made logits."""
import math

import pytest
import torch

from common.engine.sampler import sample
from common.sampling_params import SamplingParams
from common.engine.sequence import Sequence


def seqs_for(*params, prompt=(1, 2, 3)):
    return [Sequence(list(prompt), p) for p in params]


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    tokens, _ = sample(logits, seqs_for(*[SamplingParams(temperature=0)] * 4))
    assert tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
                                    SamplingParams(temperature=1.0, min_p=1.0)])
def test_filters_that_keep_one_token_act_greedy(params):
    logits = torch.randn(8, 50)
    tokens, _ = sample(logits, seqs_for(*[params] * 8))
    assert tokens == logits.argmax(-1).tolist()


def test_top_k_keeps_only_the_k_best():
    torch.manual_seed(0)
    logits = torch.randn(1, 30).repeat(400, 1)
    tokens, _ = sample(logits, seqs_for(*[SamplingParams(temperature=5.0, top_k=3)] * 400))
    assert set(tokens) <= set(logits[0].topk(3).indices.tolist())
    assert len(set(tokens)) == 3


def test_top_p_keeps_the_smallest_covering_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(500, 1)
    tokens, _ = sample(logits, seqs_for(*[SamplingParams(temperature=1.0, top_p=0.7)] * 500))
    assert set(tokens) == {0, 1}


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    logits = torch.randn(1, 100)
    alone = [sample(logits, seqs_for(SamplingParams(temperature=1.0, seed=7)))[0][0] for _ in range(1)]
    batch_logits = torch.cat([torch.randn(3, 100), logits])
    mixed = sample(batch_logits, seqs_for(SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, seed=3),
                                          SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=7)))[0]
    assert mixed[3] == alone[0]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    n = 4000
    tokens, _ = sample(probs.log().repeat(n, 1), seqs_for(*[SamplingParams(temperature=1.0)] * n))
    counts = torch.bincount(torch.tensor(tokens), minlength=4).float()
    chi2 = ((counts - n * probs) ** 2 / (n * probs)).sum().item()
    assert chi2 < 16.27  # p = 0.001 for 3 degrees of freedom


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(2000, 1)
    cold, _ = sample(logits, seqs_for(*[SamplingParams(temperature=0.2)] * 2000))
    hot, _ = sample(logits, seqs_for(*[SamplingParams(temperature=2.0)] * 2000))
    assert cold.count(0) > hot.count(0)


def test_frequency_and_presence_penalties_push_repeats_down():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    s = seqs_for(SamplingParams(temperature=0, frequency_penalty=0.2), prompt=(2,))[0]
    s.token_ids += [0]
    assert sample(logits.clone(), [s])[0] == [1]
    p = seqs_for(SamplingParams(temperature=0, presence_penalty=0.2), prompt=(2,))[0]
    p.token_ids += [0, 0, 0]
    assert sample(logits.clone(), [p])[0] == [1]


def test_repetition_penalty_covers_the_prompt():
    logits = torch.tensor([[1.0, 0.8, -1.0]])
    s = seqs_for(SamplingParams(temperature=0, repetition_penalty=1.5), prompt=(0,))[0]
    assert sample(logits, [s])[0] == [1]  # 1.0 / 1.5 < 0.8


def test_logprobs_are_the_raw_top_n_plus_the_chosen_token():
    logits = torch.randn(2, 40)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)]
    tokens, entries = sample(logits, seqs_for(*params))
    expected = logits[0].log_softmax(-1)
    top = expected.topk(3)
    assert set(entries[0]) == set(top.indices.tolist())
    for tok, lp in entries[0].items():
        assert math.isclose(lp, expected[tok].item(), rel_tol=1e-5)
    assert entries[1] is None


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(min_p=2), dict(max_tokens=0), dict(max_tokens=-5), dict(logprobs=21),
                                 dict(presence_penalty=3), dict(repetition_penalty=0), dict(seed="x"),
                                 dict(stop_token_ids=[-1]), dict(temperature="hot")])
def test_invalid_sampling_values_are_refused(bad):
    from common.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad)
