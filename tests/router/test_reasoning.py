"""ThinkReasoningParser: streamed deltas, however the text is chunked, reassemble to exactly parse()."""
from __future__ import annotations

import itertools
import random

import pytest

from router.text.reasoning import (REASONING_PARSERS, ThinkReasoningParser, get_reasoning_parser,
                              prompt_opens_reasoning)

# (starts_in_reasoning, output, expected reasoning, expected content)
CASES = [
    (False, "<think>\nLet me think.\n</think>\n\nThe answer is 4.", "Let me think.", "The answer is 4."),
    (True, "Let me think.\n</think>\n\nThe answer is 4.", "Let me think.", "The answer is 4."),
    (True, "<think>\nre-opened anyway\n</think>\nok", "re-opened anyway", "ok"),
    (False, "  \n <think>after whitespace</think>  answer  ", "after whitespace", "answer  "),
    (False, "Just an answer, no tags.", None, "Just an answer, no tags."),
    (True, "Still thinking when the stream stopped\n", "Still thinking when the stream stopped", ""),
    (False, "<think>cut off mid-thought", "cut off mid-thought", ""),
    (False, "<think>\n\n</think>\n\nempty block", None, "empty block"),
    (False, "<think>a </thin b < c\n\npara</think>x", "a </thin b < c\n\npara", "x"),
    (False, "Answer mentions <think> and </think> late.", None, "Answer mentions  and  late."),
    (False, "<think>r</think>a</think>b<think>c", "r", "abc"),
    (True, "r</think>\n\n\tcontent\n\nwith paragraphs\n", "r", "content\n\nwith paragraphs\n"),
    (False, "<thi", None, "<thi"),
    (False, "<<think>x", None, "<x"),
    (True, "<", "<", ""),
    (False, "", None, ""),
    (True, "", None, ""),
    (True, "思考：héllo 🎉 𝔘𝔫𝔦</think>答案 ✓", "思考：héllo 🎉 𝔘𝔫𝔦", "答案 ✓"),
]


def chunkings(text: str, seed: int = 0, n_random: int = 40):
    """Every 1-, 2- and 3-character chunking (at every phase), then seeded random ones."""
    for size in (1, 2, 3):
        for phase in range(size):
            yield [text[:phase]] + [text[i:i + size] for i in range(phase, len(text), size)]
    rng = random.Random(seed)
    for _ in range(n_random):
        chunks, i = [], 0
        while i < len(text):
            n = rng.randint(1, 9)
            chunks.append(text[i:i + n])
            i += n
        yield chunks


def stream(parser: ThinkReasoningParser, chunks: list[str], tags=("<think>", "</think>")) -> tuple[str | None, str]:
    reasoning = content = ""
    for chunk in chunks:
        r, c = parser.feed(chunk)
        assert tags[0] not in c and tags[1] not in c
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    return (reasoning + r) or None, content + c


@pytest.mark.parametrize("starts,text,reasoning,content", CASES)
def test_parse(starts, text, reasoning, content):
    assert ThinkReasoningParser(starts).parse(text) == (reasoning, content)


@pytest.mark.parametrize("starts,text,reasoning,content", CASES)
def test_stream_matches_parse_for_every_chunking(starts, text, reasoning, content):
    for i, chunks in enumerate(chunkings(text, seed=len(text))):
        assert "".join(chunks) == text
        assert stream(ThinkReasoningParser(starts), chunks) == (reasoning, content), (i, chunks)


@pytest.mark.parametrize("starts,text", [(False, "<t>ab</t>c</t>d"), (True, " a</t>\n<t>b"), (False, "<<t>></t>"),
                                         (True, "x</t</t>y")])
def test_every_split_of_short_texts(starts, text):
    """All 2^(n-1) ways to cut a short text, with short tags so that every split point crosses a tag."""
    expected = ThinkReasoningParser(starts, "<t>", "</t>").parse(text)
    for cuts in itertools.product((False, True), repeat=len(text) - 1):
        chunks, start = [], 0
        for i, cut in enumerate(cuts, 1):
            if cut:
                chunks.append(text[start:i])
                start = i
        chunks.append(text[start:])
        assert stream(ThinkReasoningParser(starts, "<t>", "</t>"), chunks, ("<t>", "</t>")) == expected, chunks


def test_text_is_released_as_soon_as_it_cannot_be_a_tag():
    parser = ThinkReasoningParser(True)
    assert parser.feed("I think") == ("I think", "")
    assert parser.feed(" so </thi") == (" so", "")  # the space waits: it could end the reasoning
    assert parser.feed("nk>\nHi") == ("", "Hi")
    assert parser.feed(" there <") == ("", " there ")
    assert parser.feed("b>") == ("", "<b>")
    assert parser.finish() == ("", "")


def test_output_opening_tag_only_counts_at_the_start():
    parser = ThinkReasoningParser(False)
    assert parser.feed("\n<th") == ("", "")
    assert parser.feed("ink>") == ("", "")
    assert parser.feed("hmm") == ("hmm", "")


@pytest.mark.parametrize("prompt,opens", [
    ("<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜><think>\n", True),
    ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n", True),
    # Qwen3 with enable_thinking=False closes an empty block in the prompt.
    ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
    ("<|im_start|>assistant\n<think>\nold</think>\n\nold answer<|im_end|>\n<|im_start|>assistant\n", False),
    ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
    ("", False),
])
def test_prompt_opens_reasoning(prompt, opens):
    assert prompt_opens_reasoning(prompt) is opens
    assert ThinkReasoningParser.for_prompt(prompt).starts_in_reasoning is opens


def test_qwen3_thinking_disabled_gives_content():
    prompt = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert get_reasoning_parser("qwen3").for_prompt(prompt).parse("Hello!") == (None, "Hello!")


def test_registry():
    assert set(REASONING_PARSERS) == {"deepseek_r1", "qwen3"}
    assert get_reasoning_parser("deepseek_r1")(True).parse("a</think>b") == ("a", "b")
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        get_reasoning_parser("nope")


def test_parse_does_not_disturb_a_stream_in_progress():
    parser = ThinkReasoningParser(True)
    assert parser.feed("abc") == ("abc", "")
    assert parser.parse("x</think>y") == ("x", "y")
    assert parser.feed("</think>d") == ("", "d")
