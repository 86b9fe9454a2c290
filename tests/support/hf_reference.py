"""HF transformers greedy oracle + token-for-token comparison helpers.

``hf_greedy`` runs ``model.generate(do_sample=False)`` on ONE prompt at a time
(no padding, float32) with EOS disabled so that it always produces exactly
``max_new_tokens`` tokens, returning the ids and the raw per-step logits.
Results (and loaded models) are cached for the whole pytest session.

``assert_greedy_match`` compares our engine's output with the HF reference.
"""

from __future__ import annotations

import math
import os
import threading

import torch

_MODEL_CACHE: dict[str, torch.nn.Module] = {}
_REF_CACHE: dict[tuple, tuple[list[int], torch.Tensor]] = {}
_LOCK = threading.RLock()


def load_hf_model(model_dir) -> torch.nn.Module:
    """float32, eval, cached per directory."""
    from transformers import AutoModelForCausalLM

    key = os.path.realpath(str(model_dir))
    with _LOCK:
        m = _MODEL_CACHE.get(key)
        if m is None:
            m = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32)
            m.eval()
            _MODEL_CACHE[key] = m
        return m


def _greedy_generation_config(model, max_new_tokens: int):
    """A fresh GenerationConfig: pure greedy, no processors, EOS disabled.

    A real model's generation_config may carry repetition_penalty / temperature /
    top_p etc., and transformers 5.x fills this config's None fields from it, so
    hf_greedy also swaps in a bare model.generation_config during the call.
    eos_token_id=None means generation never stops early, and nothing touches the
    logits (unlike min_new_tokens, which masks EOS)."""
    from transformers import GenerationConfig

    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = 0
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=None,
        eos_token_id=None,
        pad_token_id=pad,
        bos_token_id=None,
        temperature=None,
        top_p=None,
        top_k=None,
        repetition_penalty=None,
        output_logits=True,
        return_dict_in_generate=True,
        use_cache=True,
    )


def hf_greedy(model_dir_or_hfmodel, prompt_ids, max_new_tokens: int):
    """Greedy HF reference for one prompt.

    Returns ``(token_ids: list[int], logits: FloatTensor[max_new_tokens, vocab])``
    where ``logits[i]`` are the raw (unprocessed) logits that produced token i.
    Cached per (model, prompt, max_new_tokens) for the session.
    """
    if isinstance(model_dir_or_hfmodel, (str, os.PathLike)):
        model = load_hf_model(model_dir_or_hfmodel)
        mkey = os.path.realpath(str(model_dir_or_hfmodel))
    else:
        model = model_dir_or_hfmodel
        mkey = id(model)
    prompt_ids = [int(t) for t in prompt_ids]
    assert len(prompt_ids) >= 1, "empty prompt"
    key = (mkey, tuple(prompt_ids), int(max_new_tokens))
    hit = _REF_CACHE.get(key)
    if hit is not None:
        return list(hit[0]), hit[1]

    from transformers import GenerationConfig

    gen_cfg = _greedy_generation_config(model, max_new_tokens)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    attn = torch.ones_like(input_ids)
    # transformers 5.x fills every None field of the passed GenerationConfig from
    # model.generation_config (which carries eos_token_id, and for real models maybe
    # repetition_penalty etc.), so swap in a bare one for the duration of the call.
    with _LOCK:
        saved = model.generation_config
        model.generation_config = GenerationConfig(pad_token_id=gen_cfg.pad_token_id)
        try:
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids, attention_mask=attn, generation_config=gen_cfg
                )
        finally:
            model.generation_config = saved
    seq = out.sequences[0, len(prompt_ids):].tolist()
    logits = torch.stack([l[0] for l in out.logits]).float()
    assert len(seq) == max_new_tokens, (
        f"HF produced {len(seq)} tokens, expected exactly {max_new_tokens} (EOS not disabled?)"
    )
    assert logits.shape[0] == max_new_tokens
    # sanity: greedy means token i is the argmax of logits i
    assert torch.equal(logits.argmax(-1), torch.tensor(seq)), "HF greedy != argmax of its own logits"
    _REF_CACHE[key] = (seq, logits)
    return list(seq), logits


def hf_greedy_batch(model_dir_or_hfmodel, prompts, max_new_tokens: int):
    """``[hf_greedy(...) for p in prompts]`` (each prompt separately, no padding)."""
    return [hf_greedy(model_dir_or_hfmodel, p, max_new_tokens) for p in prompts]


# ----------------------------------------------------------------------------
# comparison
# ----------------------------------------------------------------------------


def _top2(logits_row: torch.Tensor):
    v, i = torch.topk(logits_row.float(), 2)
    return [int(x) for x in i], [float(x) for x in v]


def _fmt_tok(t, tokenizer=None):
    if tokenizer is None:
        return str(t)
    try:
        return f"{t} ({tokenizer.decode([t])!r})"
    except Exception:  # pragma: no cover
        return str(t)


def assert_greedy_match(
    ours_token_ids,
    ours_logprobs,
    hf_ids,
    hf_logits,
    tie_margin: float = 1e-4,
    logprob_atol: float = 1e-3,
    check_logprobs_atol: float | None = 1e-2,
    label: str = "",
    tokenizer=None,
):
    """Token-for-token greedy comparison against an HF reference.

    * Sequences must be identical, except: at the FIRST differing step, if HF's own
      top-2 logit margin is < ``tie_margin`` (a numerical tie), we instead require
      that our token is one of HF's top-2 and that our top-2 logprobs agree with
      HF's top-2 log_softmax values within ``logprob_atol``; comparison stops there.
    * If ``check_logprobs_atol`` is set and ``ours_logprobs`` is given, at every
      matched step our logprob of the chosen token must be within that tolerance
      of HF's log_softmax (a sanity check that catches wrong logits with the
      right argmax, e.g. a missing final norm scale).

    Returns the number of steps compared exactly (== len(hf_ids) when no tie).
    """
    ours = [int(t) for t in ours_token_ids]
    ref = [int(t) for t in hf_ids]
    pre = f"[{label}] " if label else ""
    n = len(ref)
    assert len(ours) == n, (
        f"{pre}length mismatch: ours produced {len(ours)} tokens, HF {n}\n"
        f"  ours={ours}\n  hf  ={ref}"
    )
    if ours_logprobs is not None:
        assert len(ours_logprobs) == len(ours), (
            f"{pre}logprobs has {len(ours_logprobs)} entries for {len(ours)} tokens"
        )
    logsm = torch.log_softmax(hf_logits.float(), dim=-1)

    for i in range(n):
        if ours[i] == ref[i]:
            if check_logprobs_atol is not None and ours_logprobs is not None:
                lp = ours_logprobs[i] or {}
                lp = {int(k): float(v) for k, v in lp.items()}
                if ref[i] in lp:
                    hv = float(logsm[i, ref[i]])
                    assert abs(lp[ref[i]] - hv) <= check_logprobs_atol, (
                        f"{pre}step {i}: tokens agree ({_fmt_tok(ref[i], tokenizer)}) but our "
                        f"logprob {lp[ref[i]]:.6f} != HF log_softmax {hv:.6f} "
                        f"(atol {check_logprobs_atol})"
                    )
            continue

        # first divergence
        (h1, h2), (v1, v2) = _top2(hf_logits[i])
        margin = v1 - v2
        ctx = (
            f"{pre}first mismatch at step {i}/{n}: ours={_fmt_tok(ours[i], tokenizer)} "
            f"hf={_fmt_tok(ref[i], tokenizer)}; HF top-2 = {h1}:{v1:.6f}, {h2}:{v2:.6f} "
            f"(margin {margin:.3e}, tie_margin {tie_margin:.1e})\n"
            f"  ours[:{i + 1}]={ours[: i + 1]}\n  hf  [:{i + 1}]={ref[: i + 1]}\n"
            f"  ours tail={ours[i:i + 8]} hf tail={ref[i:i + 8]}"
        )
        if margin >= tie_margin:
            raise AssertionError(ctx)
        # numerical tie: accept either of HF's top-2, with matching logprobs
        assert ours[i] in (h1, h2), ctx + "\n  (tie, but our token is not in HF's top-2)"
        assert ours_logprobs is not None, ctx + "\n  (tie, but no logprobs from our engine to check)"
        lp = {int(k): float(v) for k, v in (ours_logprobs[i] or {}).items()}
        hf_lp = {h1: float(logsm[i, h1]), h2: float(logsm[i, h2])}
        for t, hv in hf_lp.items():
            assert t in lp, (
                ctx + f"\n  (tie: HF top-2 token {t} missing from our logprobs {lp})"
            )
            assert abs(lp[t] - hv) <= logprob_atol, (
                ctx + f"\n  (tie: our logprob for {t} = {lp[t]:.6f}, HF {hv:.6f}, atol {logprob_atol})"
            )
        return i
    return n


def top2_margins(logits: torch.Tensor) -> torch.Tensor:
    v = torch.topk(logits.float(), 2, dim=-1).values
    return v[..., 0] - v[..., 1]


def check_outputs_against_hf(
    outs,
    prompts,
    hf_refs,
    label: str = "",
    tokenizer=None,
    **kw,
):
    """Compare a list of engine outputs against HF refs; collects all failures
    (one line each, first mismatch per prompt) and raises one AssertionError."""
    assert len(outs) == len(prompts) == len(hf_refs), (len(outs), len(prompts), len(hf_refs))
    failures = []
    ties = []
    for j, (o, p, (ids, logits)) in enumerate(zip(outs, prompts, hf_refs)):
        if "prompt_token_ids" in o and o["prompt_token_ids"] is not None:
            if list(o["prompt_token_ids"]) != list(p):
                failures.append(
                    f"prompt #{j} (len {len(p)}): prompt_token_ids echoed back differ from input"
                )
                continue
        try:
            k = assert_greedy_match(
                o["token_ids"], o.get("logprobs"), ids, logits,
                label=f"{label} prompt #{j} len={len(p)}", tokenizer=tokenizer, **kw,
            )
            if k < len(ids):
                ties.append((j, k))
        except AssertionError as e:
            failures.append(str(e))
    if failures:
        raise AssertionError(
            f"{len(failures)}/{len(prompts)} prompts mismatched HF:\n\n" + "\n\n".join(failures)
        )
    return ties


# ----------------------------------------------------------------------------
# engine-side helpers shared by the parity test modules
# ----------------------------------------------------------------------------

MODES = ["block16", "block256", "chunked", "preempt", "prefix"]


def mode_llm_kwargs(mode: str, longest_seq: int) -> dict:
    """LLM(...) kwargs that force each scheduling mode.

    ``longest_seq`` = longest prompt + max_new_tokens (one sequence's peak length)."""
    if mode == "block16":
        return dict(block_size=16)
    if mode == "block256":
        return dict(block_size=256)
    if mode == "chunked":
        # a 600-token prompt needs ~10 prefill chunks; max_model_len must be explicit
        return dict(block_size=16, max_num_batched_tokens=64, max_model_len=1024)
    if mode == "preempt":
        # just enough KV blocks for the longest single sequence + a few, so the
        # scheduler has to preempt while decoding a batch of 16
        bs = 16
        blocks = math.ceil(longest_seq / bs) + 4
        return dict(block_size=bs, num_kv_blocks=blocks, max_model_len=blocks * bs)
    if mode == "prefix":
        return dict(block_size=16)
    raise ValueError(mode)


def make_llm(model_dir, **kw):
    from common.engine import LLM

    args = dict(
        dtype="float32", block_size=16, max_num_seqs=64, max_num_batched_tokens=2048,
        num_kv_blocks=None, enable_prefix_caching=True, max_model_len=None,
    )
    args.update(kw)
    return LLM(str(model_dir), **args)


def greedy_params(max_tokens: int, logprobs: int = 2, ignore_eos: bool = True):
    from common import SamplingParams

    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos, logprobs=logprobs
    )


def check_lengths(outs, max_tokens: int, label: str = ""):
    for j, o in enumerate(outs):
        assert len(o["token_ids"]) == max_tokens, (
            f"[{label}] prompt #{j}: {len(o['token_ids'])} tokens, expected {max_tokens} "
            f"(ignore_eos=True)"
        )
        assert o["finish_reason"] == "length", (
            f"[{label}] prompt #{j}: finish_reason {o['finish_reason']!r}, expected 'length'"
        )


def run_mode_and_compare(
    model_dir,
    mode: str,
    prompts,
    prefix_prompts,
    max_new_tokens: int,
    tokenizer=None,
    check_logprobs_atol: float | None = 1e-2,
    **llm_kwargs,
):
    """Run one parity mode end to end and compare every output with HF (llm_kwargs: more engine arguments).

    ``prompts`` are used for every mode but "prefix"; "prefix" uses
    ``prefix_prompts`` (sharing a long system prompt) in two generate calls on one
    LLM: first the first 3 prompts, then all of them (the 3 again are exact repeats).
    Returns (stats, ties) where ties = [(prompt index, step)] of accepted numerical ties.
    """
    use = prefix_prompts if mode == "prefix" else prompts
    longest = max(len(p) for p in use) + max_new_tokens
    kw = mode_llm_kwargs(mode, longest)
    kw.update(llm_kwargs)
    llm = make_llm(model_dir, **kw)
    params = greedy_params(max_new_tokens)
    label = f"{mode} {kw}"
    ties = []
    try:
        if mode == "prefix":
            first = use[:3]
            outs1 = llm.generate(first, params, use_tqdm=False)
            check_lengths(outs1, max_new_tokens, label + " call1")
            ties += check_outputs_against_hf(
                outs1, first, hf_greedy_batch(model_dir, first, max_new_tokens),
                label=label + " call1", tokenizer=tokenizer,
                check_logprobs_atol=check_logprobs_atol,
            )
        outs = llm.generate(use, params, use_tqdm=False)
        check_lengths(outs, max_new_tokens, label)
        refs = hf_greedy_batch(model_dir, use, max_new_tokens)
        ties += check_outputs_against_hf(
            outs, use, refs, label=label, tokenizer=tokenizer,
            check_logprobs_atol=check_logprobs_atol,
        )
        stats = llm.stats()
    finally:
        llm.close()
    if mode == "preempt":
        assert stats["num_preemptions"] > 0, f"preemption was not forced: {stats}"
    if mode == "prefix":
        assert stats["prefix_cache_hit_tokens"] > 0, f"no prefix-cache hits: {stats}"
    return stats, ties
