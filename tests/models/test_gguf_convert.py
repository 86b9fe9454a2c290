"""common.models.gguf against transformers' own GGUF loader, used as the oracle."""

import json
import os
import time

import gguf
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from common.models.gguf import DEFAULT_MODEL, default_gguf_path, gguf_to_hf_folder

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def gguf_path():
    return default_gguf_path()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("nano-pd-cache"))


@pytest.fixture(scope="module")
def folder(gguf_path, cache_dir):
    return gguf_to_hf_folder(gguf_path, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def oracle(gguf_path):
    d, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(d, gguf_file=name)


def test_default_path(gguf_path):
    assert os.path.basename(gguf_path).startswith(DEFAULT_MODEL)


def test_folder_layout(folder):
    files = set(os.listdir(folder))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert "quantization_config" not in cfg
    has_template = "chat_template.jinja" in files or "chat_template" in json.load(
        open(os.path.join(folder, "tokenizer_config.json"))
    )
    assert has_template
    assert not [f for f in os.listdir(os.path.dirname(folder)) if ".tmp-" in f]


def test_weights_match_oracle(folder, oracle):
    ours = load_file(os.path.join(folder, "model.safetensors"))
    ref = oracle[0].state_dict()
    expected = set(ref)
    if oracle[0].config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        assert torch.equal(ref["lm_head.weight"], ours["model.embed_tokens.weight"])
    assert set(ours) == expected
    for name, t in ours.items():
        assert t.dtype == torch.float32, name
        assert torch.equal(t, ref[name]), name


def test_config_matches_oracle(folder, oracle):
    ours, ref = AutoConfig.from_pretrained(folder), oracle[0].config
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "rms_norm_eps", "vocab_size", "tie_word_embeddings", "intermediate_size"):
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert ours.tie_word_embeddings is True
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)


def test_tokenizer(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.bos_token_id == 1
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_generation_matches_oracle(folder, oracle):
    ref_model, ref_tok = oracle
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": PROMPT}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    ref_ids = ref_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.equal(ids, ref_ids)
    kw = dict(max_new_tokens=8, do_sample=False)
    ours = model.generate(ids, **kw)[0, ids.shape[1]:]
    ref = ref_model.generate(ids, **kw)[0, ids.shape[1]:]
    assert torch.equal(ours, ref)
    assert tok.decode(ours, skip_special_tokens=True).startswith("The capital of France is Paris")


def test_second_call_hits_cache(folder, gguf_path, cache_dir, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("cache miss: GGUF was read again")

    monkeypatch.setattr(gguf, "GGUFReader", boom)
    t0 = time.perf_counter()
    assert gguf_to_hf_folder(gguf_path, cache_dir=cache_dir) == folder
    assert time.perf_counter() - t0 < 1.0


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        gguf_to_hf_folder(str(tmp_path / "nope.gguf"), cache_dir=str(tmp_path))


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_to_hf_folder(str(bad), cache_dir=str(tmp_path))
