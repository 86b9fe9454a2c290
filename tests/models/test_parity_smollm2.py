"""Token-for-token greedy parity of our engine vs HF transformers on the real
SmolLM2-135M-Instruct (the bundled Q4_1 GGUF, converted to an HF float32 folder by
common.models.gguf; the HF oracle loads that same folder), across the same
scheduling modes as the tiny tests, plus one end-to-end chat answer."""

from __future__ import annotations

import pytest
import torch

from tests.support.hf_reference import (
    MODES,
    assert_greedy_match,
    hf_greedy,
    make_llm,
    run_mode_and_compare,
)

pytestmark = pytest.mark.slow

MAX_NEW = 32  # 64 doubled the oracle's time (HF generates each prompt alone) for drift the tiny models cover

TEXT = """\
The history of computing is a story of layers. At the bottom there are transistors, \
tiny switches etched into silicon, and above them logic gates, adders and registers. \
Engineers combine these into processors that fetch instructions from memory, decode \
them and execute them billions of times per second. Every layer hides the details of \
the one below it, so that a programmer writing a web page never has to think about the \
voltage on a wire.

Large language models are trained to predict the next word in a sequence of text. During \
training they read a huge collection of books, articles and code, and slowly adjust \
millions or billions of parameters so that their predictions improve. When the model \
is used to generate text, it produces one token at a time: it looks at everything written \
so far, computes a probability for every token in its vocabulary, picks one, appends it \
and repeats. Serving such a model efficiently means keeping the keys and values of earlier \
tokens in a cache, so that each new token only needs a small amount of extra work.

Paris is the capital and largest city of France. Built along the river Seine, it has been \
a major centre of finance, diplomacy, commerce, fashion and science for centuries. The city \
is known for its museums and monuments, including the Louvre, the Eiffel Tower and the \
cathedral of Notre-Dame. Millions of visitors arrive every year to walk along its boulevards, \
sit in its cafes and admire its gardens.

A good recipe for bread needs only flour, water, salt and yeast. Mix the flour and the water, \
let the dough rest for half an hour, then add the salt and the yeast and knead until it is \
smooth and elastic. Leave it to rise in a warm place until it has doubled in size, shape it \
into a loaf, let it rise again and bake it in a very hot oven until the crust is deep brown \
and the bottom sounds hollow when you tap it.

The ocean covers more than seventy percent of the surface of the Earth. It regulates the \
climate, absorbs heat and carbon dioxide, and is home to an enormous variety of life, from \
microscopic plankton to the blue whale, the largest animal that has ever lived. Much of the \
deep sea remains unexplored, and scientists discover new species on almost every expedition.

Mathematics is the study of quantity, structure, space and change. Mathematicians look for \
patterns, formulate conjectures and prove them by rigorous deduction from axioms and \
definitions. Although much of it began with practical problems such as counting, measuring \
and navigating, today it is also pursued for its own beauty, and its results often find \
unexpected applications decades after they were first discovered.

Gardening teaches patience. Seeds planted in early spring need warm soil, regular water and \
plenty of light before they sprout, and even then the young plants must be protected from \
frost, slugs and hungry birds. A gardener learns to read the weather, to improve the soil \
with compost, and to rotate crops from year to year so that pests and diseases do not build \
up. The reward is a summer of fresh vegetables, bright flowers and the quiet satisfaction of \
having grown something with your own hands.

Trains changed the way people thought about distance. Before the railways, a journey between \
two cities could take several days by coach; afterwards it took a few hours. Towns began to \
keep the same time so that timetables made sense, goods could be shipped cheaply across whole \
countries, and ordinary families could travel to the seaside for a day. Today high speed \
lines carry passengers at more than three hundred kilometres per hour.
"""

QUESTIONS = [
    "Hi!",
    "What is a transistor?",
    "Summarize the paragraph about bread in one sentence.",
    "Why do language models keep a cache of keys and values when they generate text?",
    "List three famous monuments in Paris and say one thing about each of them.",
    "Explain, step by step, how the dough should be handled before it is baked, and what "
    "could go wrong at each step if the baker is in a hurry.",
]

# lengths of the 16 prompts: 13 slices of real text + 3 of random ids
TEXT_LENS = [1, 2, 9, 16, 31, 47, 64, 100, 128, 256, 300, 411, 600]
RANDOM_LENS = [5, 150, 257]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    text_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(text_ids) >= max(TEXT_LENS), len(text_ids)
    out = []
    for k, n in enumerate(TEXT_LENS):
        start = (k * 97) % (len(text_ids) - n + 1)  # different offsets into the text
        out.append(text_ids[start:start + n])
    g = torch.Generator().manual_seed(0)
    for n in RANDOM_LENS:
        out.append(torch.randint(0, len(tokenizer), (n,), generator=g).tolist())
    # interleave so lengths are mixed
    perm = torch.randperm(len(out), generator=g).tolist()
    return [out[i] for i in perm]


@pytest.fixture(scope="module")
def prefix_prompts(tokenizer):
    """16 chats sharing one long system prompt (~230 tokens) with different user turns."""
    paragraphs = TEXT.split("\n\n")
    system = "You are a helpful assistant. Use the following notes when answering.\n" + "\n".join(
        paragraphs[:2])
    out = []
    for k in range(16):
        q = QUESTIONS[k % len(QUESTIONS)]
        if k >= len(QUESTIONS):  # longer user turns: question + some of the notes
            q = paragraphs[2 + k % 4][: 60 * (k - len(QUESTIONS) + 1)] + "\n" + q
        out.append(_chat_ids(tokenizer, [{"role": "system", "content": system},
                                         {"role": "user", "content": q}]))
    assert max(len(p) for p in out) <= 700
    return out


@pytest.mark.parametrize("mode", MODES)
def test_parity(mode, smollm2_dir, prompts, prefix_prompts, tokenizer):
    stats, ties = run_mode_and_compare(
        smollm2_dir, mode, prompts=prompts, prefix_prompts=prefix_prompts,
        max_new_tokens=MAX_NEW, tokenizer=tokenizer, check_logprobs_atol=1e-2,
    )
    if ties:
        print(f"accepted numerical ties (prompt, step): {ties}")


def test_chat_capital_of_france(smollm2_dir, tokenizer):
    ids = _chat_ids(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    from common import SamplingParams

    llm = make_llm(smollm2_dir)
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=False,
                                             logprobs=2), use_tqdm=False)[0]
    text = out["text"].replace("<|im_end|>", "").strip()
    assert text == "The capital of France is Paris.", out
    assert out["finish_reason"] == "stop", out
    assert out["token_ids"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>"), out["token_ids"]
    # and token-for-token what HF produces (HF run with EOS disabled, same length)
    hf_ids, hf_logits = hf_greedy(smollm2_dir, ids, len(out["token_ids"]))
    assert_greedy_match(out["token_ids"], out["logprobs"], hf_ids, hf_logits,
                        check_logprobs_atol=1e-2, label="chat", tokenizer=tokenizer)
