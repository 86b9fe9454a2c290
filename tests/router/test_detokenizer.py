"""IncrementalDetokenizer: streamed text must equal a one-shot decode (truncated at stops)."""

from __future__ import annotations

import random

import pytest

from router.text.detokenizer import IncrementalDetokenizer

MIXED = "héllo 世界 🎉 the model caché, naïve Ω≈ç √ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 end"


@pytest.fixture(scope="module")
def tiny_tok():
    from tests.support.tiny_models import make_tokenizer

    return make_tokenizer(512)


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(params=["tiny", "smol"])
def tok(request):
    return request.getfixturevalue(f"{request.param}_tok")


def stream(tok, ids, stop=None, chunks=None, rng=None, **kw):
    """Feeds ``ids`` in chunks (1 token each, or random sizes); returns (detok, pieces)."""
    d = IncrementalDetokenizer(tok, stop=stop, **kw)
    pieces, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 5) if rng else (chunks or 1)
        pieces.append(d.add(ids[i : i + n]))
        i += n
    pieces.append(d.flush())
    return d, pieces


def expected(tok, ids, stops=()):
    """Full decode cut before the stop string that completes first."""
    text = tok.decode(ids, skip_special_tokens=True)
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    return (text[: min(hits)[1]], True) if hits else (text, False)


def test_multibyte_chars_are_never_split(tok):
    ids = tok.encode(MIXED, add_special_tokens=False)
    d, pieces = stream(tok, ids)
    assert "".join(pieces) == MIXED == d.text
    assert all("\ufffd" not in p for p in pieces)
    # byte-level BPE splits these chars over several tokens, so some adds must be held back
    assert "" in pieces[:-1]
    assert not d.stopped and d.stop_reason is None


def test_leading_spaces_kept_per_token(smol_tok):
    ids = smol_tok.encode(" the model the cache", add_special_tokens=False)
    _, pieces = stream(smol_tok, ids)
    assert pieces[:-1] == [smol_tok.decode([i]) for i in ids]
    assert pieces[0].startswith(" ")
    assert "".join(pieces) == " the model the cache"


def test_special_tokens(tiny_tok):
    eos = tiny_tok.convert_tokens_to_ids("<|im_end|>")
    ids = tiny_tok.encode("hello", add_special_tokens=False) + [eos]
    ids += tiny_tok.encode(" world", add_special_tokens=False) + [eos]
    _, pieces = stream(tiny_tok, ids)
    assert "".join(pieces) == "hello world"
    _, pieces = stream(tiny_tok, ids, skip_special_tokens=False)
    assert "".join(pieces) == "hello<|im_end|> world<|im_end|>"


@pytest.mark.parametrize("seed", range(3))
def test_random_ids_match_full_decode(tok, seed):
    """Random ids hit lone continuation bytes and truncated chars: same U+FFFD as decode."""
    rng = random.Random(seed)
    vocab = len(tok)
    for _ in range(60):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 50))]
        d, pieces = stream(tok, ids, rng=rng)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True), ids
        assert d.text == "".join(pieces)


def test_random_byte_tokens_with_multibyte_text(tiny_tok):
    """Shuffled byte pieces of real multi-byte text: mostly invalid UTF-8 in between."""
    rng = random.Random(7)
    pool = tiny_tok.encode(MIXED, add_special_tokens=False)
    for _ in range(100):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        _, pieces = stream(tiny_tok, ids, rng=rng)
        assert "".join(pieces) == tiny_tok.decode(ids, skip_special_tokens=True)


def test_decodes_small_window_only(tiny_tok):
    calls = []

    class Spy:
        def decode(self, ids, **kw):
            calls.append(len(ids))
            return tiny_tok.decode(ids, **kw)

    ids = tiny_tok.encode(" ".join([MIXED] * 40), add_special_tokens=False)
    assert len(ids) > 1000
    d, pieces = stream(Spy(), ids)
    assert "".join(pieces) == tiny_tok.decode(ids)
    assert max(calls) <= 16  # bounded by the longest multi-token char, not by len(ids)


def test_stop_spanning_tokens(tok):
    text = "hello world the model"
    ids = tok.encode(text, add_special_tokens=False)
    d, pieces = stream(tok, ids, stop=["lo wor"])
    assert d.text == "".join(pieces) == "hel"
    assert d.stopped and d.stop_reason == "lo wor"
    assert d.add(tok.encode(" more", add_special_tokens=False)) == ""
    assert d.flush() == "" and d.text == "hel"


def test_stop_at_beginning(tok):
    ids = tok.encode("hello world", add_special_tokens=False)
    d, pieces = stream(tok, ids, stop=["hello"])
    assert "".join(pieces) == "" and d.stopped and d.stop_reason == "hello"


def test_earliest_stop_wins(tok):
    ids = tok.encode("hello world the model", add_special_tokens=False)
    d, _ = stream(tok, ids, stop=["model", "the", "world"])
    assert d.text == "hello " and d.stop_reason == "world"


def test_partial_stop_held_back_then_released(tiny_tok):
    ids = tiny_tok.encode("the model the end", add_special_tokens=False)
    d = IncrementalDetokenizer(tiny_tok, stop=["the end"])
    out = ""
    for i in ids:
        out += d.add([i])
        # whatever could still grow into "the end" stays held back
        assert not out.endswith(("t", "th", "the", "the "))
    assert d.stopped and out == d.text == "the model "


def test_flush_releases_partial_stop(tok):
    ids = tok.encode("hello wo", add_special_tokens=False)
    d, pieces = stream(tok, ids, stop=["world"])
    assert pieces[-1].endswith("wo") and "".join(pieces) == "hello wo"
    assert not d.stopped and d.stop_reason is None


def test_overlapping_stops_first_completed_wins(tok):
    ids = tok.encode("hello world the model", add_special_tokens=False)
    # "lo world" starts first, but " w" is complete earlier: generation ends there
    for chunks in (1, len(ids)):
        d, _ = stream(tok, ids, stop=["lo world", " w"], chunks=chunks)
        assert d.text == "hello" and d.stop_reason == " w"


def test_multibyte_stop(tiny_tok):
    ids = tiny_tok.encode(MIXED, add_special_tokens=False)
    d, _ = stream(tiny_tok, ids, stop=["界 🎉"])
    assert d.text == "héllo 世" and d.stop_reason == "界 🎉"


@pytest.mark.parametrize("seed", range(3))
def test_random_stops_match_truncated_decode(tok, seed):
    rng = random.Random(100 + seed)
    words = ["the", "model", "héllo", "世界", "🎉", "cache", "a", "is", "prefix", "\n"]
    for _ in range(40):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))
        ids = tok.encode(text, add_special_tokens=False)
        full = tok.decode(ids)
        stops = []
        for _ in range(rng.randint(1, 3)):
            a = rng.randrange(len(full))
            stops.append(full[a : a + rng.randint(1, 6)])
        stops.append("never-present")
        d, pieces = stream(tok, ids, stop=stops, rng=rng)
        want, stopped = expected(tok, ids, stops)
        assert "".join(pieces) == d.text == want, (text, stops)
        assert d.stopped == stopped
        if stopped:
            assert d.stop_reason in stops and d.stop_reason in full
            assert full.startswith(want + d.stop_reason)
