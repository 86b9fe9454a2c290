"""The offline engine's behaviour beyond parity: stop conditions, seeds, counters, and clear errors."""
import json
import os
import shutil

import pytest

from common import InvalidRequestError, ModelLoadError, SamplingParams
from common.engine import LLM
from tests.support.tiny_models import TinyConfig


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_factory):
    return tiny_model_factory(TinyConfig(arch="qwen3", num_heads=4, num_kv_heads=2, head_dim=32))


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), dtype="float32", max_model_len=256, num_kv_blocks=64, block_size=16)


PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 60)), [3]]


def test_max_tokens_and_finish_reasons(llm):
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), use_tqdm=False)
    assert [len(o["token_ids"]) for o in out] == [7, 7, 7]
    assert all(o["finish_reason"] == "length" for o in out)
    assert out[1]["prompt_token_ids"] == PROMPTS[1]


def test_stop_token_ids_end_the_sequence(llm):
    free = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    stop_at = free["token_ids"][4]
    first = free["token_ids"].index(stop_at)
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                   stop_token_ids=[stop_at]), use_tqdm=False)[0]
    assert out["token_ids"] == free["token_ids"][:first + 1] and out["finish_reason"] == "stop"


def test_context_length_ends_generation(llm):
    out = llm.generate([list(range(1, 251))], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out["token_ids"]) == 6 and out["finish_reason"] == "length"


def test_same_seed_same_output_across_batches(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPTS[:1], p, use_tqdm=False)[0]["token_ids"]
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = llm.generate(PROMPTS, [p, others, others], use_tqdm=False)[0]["token_ids"]
    assert alone == mixed
    different = llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=99,
                                                         ignore_eos=True), use_tqdm=False)[0]["token_ids"]
    assert different != alone


def test_string_prompts_and_chat(llm):
    out = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out) == 1 and out[0]["prompt_token_ids"] == llm.tokenizer.encode("hello world")
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(chat[0]["token_ids"]) == 3


def test_blocks_all_return_after_work(llm):
    llm.generate(PROMPTS * 4, SamplingParams(temperature=0.8, max_tokens=9, ignore_eos=True), use_tqdm=False)
    stats = llm.stats()
    assert stats["free_blocks"] == stats["total_blocks"]
    assert stats["num_running"] == stats["num_waiting"] == 0


@pytest.mark.parametrize("prompt, match", [([], "empty"), (list(range(1, 300)), "context length"),
                                           ([10**9], "token ids"), (["a"], "token ids")])
def test_bad_prompts_raise_clear_errors(llm, prompt, match):
    with pytest.raises(InvalidRequestError, match=match):
        llm.generate([PROMPTS[0], prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    # the engine is untouched and still serves
    assert llm.stats()["num_waiting"] == 0
    assert len(llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)) == 1


def test_request_bigger_than_the_pool_is_refused(tiny_dir):
    small = LLM(str(tiny_dir), dtype="float32", max_model_len=512, num_kv_blocks=4, block_size=16)
    with pytest.raises(InvalidRequestError, match="does not fit"):
        small.generate([list(range(1, 60))], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)


def test_mismatched_params_list(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate(PROMPTS, [SamplingParams()], use_tqdm=False)


def test_unknown_model_path():
    with pytest.raises(ModelLoadError, match="not found"):
        LLM("/nonexistent/model/folder")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path))


def test_unsupported_architecture(tiny_dir, tmp_path):
    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        LLM(str(folder))


@pytest.mark.parametrize("bad", [dict(block_size=0), dict(max_num_seqs=0), dict(dtype="int3"),
                                 dict(max_model_len=10**7), dict(num_kv_blocks=-1)])
def test_bad_engine_arguments(tiny_dir, bad):
    with pytest.raises(InvalidRequestError):
        LLM(str(tiny_dir), **bad)


@pytest.mark.parametrize("native,pinned,want", [(True, None, "bfloat16"), (False, None, "float32"),
                                                (True, "float32", "float32"), (False, "float16", "float16"),
                                                (True, "auto", "bfloat16")])
def test_auto_dtype(tiny_dir, monkeypatch, native, pinned, want):
    """dtype=auto: $NANO_PD_DTYPE where set, else bfloat16 on a CPU with native bf16 and float32 on one without
    (the tiny checkpoint is float32 either way)."""
    from common.engine import config

    monkeypatch.setattr(config, "native_bf16", lambda: native)
    monkeypatch.delenv(config.AUTO_DTYPE_ENV, raising=False)
    if pinned is not None:
        monkeypatch.setenv(config.AUTO_DTYPE_ENV, pinned)
    assert config.EngineConfig(model=str(tiny_dir)).dtype == want
    assert config.EngineConfig(model=str(tiny_dir), dtype="float32").dtype == "float32"
    monkeypatch.setenv(config.AUTO_DTYPE_ENV, "int3")
    with pytest.raises(InvalidRequestError, match="NANO_PD_DTYPE"):
        config.EngineConfig(model=str(tiny_dir))


def test_gguf_path_that_does_not_exist():
    with pytest.raises(ModelLoadError):
        LLM(os.path.join("/nonexistent", "model.gguf"))


def test_paged_attention_kernels_and_the_torch_path_agree(tiny_dir, monkeypatch):
    """The C++ kernels (where built) and the gather + SDPA path give the same greedy tokens and logprobs through
    decode, chunked prefill and prefix hits (the second pass reuses the first one's cached prompts)."""
    from common.layers import attention, paged_attention_cpu

    if not paged_attention_cpu.available():
        pytest.skip("the paged-attention kernels are not built here (see the log line)")
    prompts = [list(range(3, 70)), list(range(3, 40)) + [5, 9], [7] * 33]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)

    def run():
        llm = LLM(str(tiny_dir), dtype="float32", max_model_len=256, num_kv_blocks=64, block_size=16,
                  max_num_batched_tokens=24)  # forces chunked prefill beside running decodes
        return [llm.generate(prompts, params, use_tqdm=False) for _ in range(2)]

    with_kernels = run()
    monkeypatch.setattr(attention, "use_kernel", lambda *a: False)
    torch_path = run()
    for got_pass, want_pass in zip(with_kernels, torch_path):
        for got, want in zip(got_pass, want_pass):
            assert got["token_ids"] == want["token_ids"]
            for g, w in zip(got["logprobs"], want["logprobs"]):
                assert g.keys() == w.keys()
                assert all(abs(g[t] - w[t]) < 1e-4 for t in g)
