#!/usr/bin/env python3
"""Offline throughput: nano-pd's LLM vs HF transformers `generate` vs vLLM-CPU, plus the decode "floor".

Every engine gets the same work: N seeded random token-id prompts of --input-len tokens, greedy, --output-len
new tokens each, ignore_eos (no tokenizer in the loop, so no tokenizer differences). Each repeat uses fresh
prompts (seed + rep), so a prefix cache never helps. After a warm-up (8 prompts x 8 tokens) the best of --repeat
runs is kept.

  nano-pd   common.LLM(folder, dtype, max_num_seqs=N, max_num_batched_tokens=2048, decode_mode=M).generate(...),
            once per mode M of --decode-modes (eager, compile: compile is auto's choice on CPU); "start s" is
            the engine's construction, where a compiled engine compiles its decode step or loads it from the cache
  HF        model.generate on the whole batch at once (like /work/shared/peer/bench_peer.py `hf`:
            min_new_tokens = max_new_tokens so nothing stops early), in float32 and in --dtype
  vLLM      only with --vllm-python PATH (a python that has vllm; never imported here). It runs the
            script VLLM_WORKER below in a subprocess: vllm.LLM(..., skip_tokenizer_init=True) with
            prompt_token_ids, so vLLM never reads the transformers-5 tokenizer files (tokenizer_class
            "TokenizersBackend"); gpu_memory_utilization (--vllm-mem) is the fraction of CPU RAM vLLM
            reserves, kept small because the machine is shared (vLLM's default 0.92 fails to start).
  floor     one decode step of our engine with N sequences decoding at context ~input_len + 64
            (llm.engine.step(), and inside it our model's forward + logits: from the embedding to the LM head),
            vs one bare forward of HF's model: model(input_ids=[N,1], past_key_values=<DynamicCache of the same
            length>, use_cache=True).
            The HF cache holds random K/V (same cost as a real one) and is cropped back after each call.

Models: "smollm2" (the default GGUF, converted to a float32 HF folder), "smollm2-gguf" (nano-pd gets the GGUF itself,
so its default `quantization auto` keeps the int4 blocks in bf16; vLLM and HF get the converted folder) and "qwen3-tiny" (random weights from
tests/support/tiny_models.py: hidden 256, 4 layers, 8 heads, 4 kv heads, head_dim 32, vocab 8192, cached on disk).

  .venv/bin/python benchmarks/offline_throughput.py --vllm-python /tmp/vllm-peer/venv/bin/python
"""
import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from common.cache import cache_root  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WARM_SEED = 12345


def make_prompts(n, length, vocab, seed, low=3):
    rng = random.Random(seed)  # same generator as bench_peer.py
    return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(n)]


def model_folder(name, cache_dir):
    if name in ("smollm2", "smollm2-gguf"):
        from common.models.gguf import default_gguf_path, gguf_to_hf_folder
        return gguf_to_hf_folder(default_gguf_path())
    if name == "qwen3-tiny":
        folder = os.path.join(cache_dir, "qwen3-tiny-h256-l4-q8kv4-d32-v8192")
        if not os.path.isfile(os.path.join(folder, "model.safetensors")):
            from tests.support.tiny_models import make_tiny_model
            make_tiny_model(folder, arch="qwen3", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                            head_dim=32, vocab_size=8192, intermediate_size=768, seed=0)
        return folder
    if os.path.isdir(name):
        return name
    raise SystemExit(f"unknown model {name!r}: smollm2, smollm2-gguf, qwen3-tiny or an HF folder")


def engine_source(name, folder):
    """What nano-pd loads: the GGUF file itself for smollm2-gguf, else the folder the peers load."""
    if name == "smollm2-gguf":
        from common.models.gguf import default_gguf_path
        return default_gguf_path()
    return folder


def hf_config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- nano-pd
def bench_ours(a, folder, vocab, decode_mode):
    from common import SamplingParams
    from common.engine import LLM

    start = time.perf_counter()
    llm = LLM(folder, dtype=a.dtype, max_num_seqs=a.n, max_num_batched_tokens=a.max_num_batched_tokens,
              decode_mode=decode_mode)
    start = time.perf_counter() - start
    llm.generate(make_prompts(min(a.n, 8), a.input_len, vocab, WARM_SEED),
                 SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    sp = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True)
    best = None
    for rep in range(a.repeat):
        prompts = make_prompts(a.n, a.input_len, vocab, a.seed + rep)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        n_out = sum(len(o["token_ids"]) for o in outs)
        best = min(best or (dt, n_out), (dt, n_out))
    floor = floor_ours(a, llm, vocab)
    del llm
    gc.collect()
    return {"wall": best[0], "out": best[1], "start": start}, floor


def floor_ours(a, llm, vocab):
    """Median engine.step() time, and our model's forward + logits inside it, with N sequences decoding."""
    from common import SamplingParams

    eng, model = llm.engine, llm.engine.runner.model
    # the first-admitted sequences run a few tokens ahead (chunked prefill): leave room, abort them after
    sp = SamplingParams(temperature=0.0, max_tokens=a.floor_ctx + a.floor_iters + 64, ignore_eos=True)
    for p in make_prompts(a.n, a.input_len, vocab, seed=777):
        eng.add_request(p, sp)
    while eng.scheduler.waiting or min(s.num_output_tokens for s in eng.scheduler.running) < a.floor_ctx:
        eng.step()
    marks = []
    # the embedding starts every forward, eager or compiled (a compiled step calls the layers, not model.forward)
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda *_: marks.append(time.perf_counter()))
    orig = model.compute_logits

    def timed_logits(h):
        out = orig(h)
        marks.append(time.perf_counter())
        return out

    model.compute_logits = timed_logits
    steps, fwds = [], []
    ctx = min(s.num_tokens for s in eng.scheduler.running)  # keys attended by the first timed step
    try:
        for _ in range(a.floor_iters):
            assert len(eng.scheduler.running) == a.n
            marks.clear()
            t0 = time.perf_counter()
            eng.step()
            steps.append(time.perf_counter() - t0)
            fwds.append(marks[1] - marks[0])
    finally:
        hook.remove()
        del model.compute_logits
    for seq in list(eng.scheduler.running):
        eng.abort(seq)
    return {"step": statistics.median(steps), "fwd": statistics.median(fwds), "ctx": ctx}


# ---------------------------------------------------------------- HF transformers
@torch.inference_mode()
def bench_hf(a, folder, vocab, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype]).eval()
    gen = dict(do_sample=False, max_new_tokens=a.output_len, min_new_tokens=a.output_len, pad_token_id=0,
               use_cache=True)
    warm = torch.tensor(make_prompts(min(a.n, 8), a.input_len, vocab, WARM_SEED))
    model.generate(warm, attention_mask=torch.ones_like(warm), **{**gen, "max_new_tokens": 8, "min_new_tokens": 8})
    best = None
    for rep in range(a.hf_repeat):
        ids = torch.tensor(make_prompts(a.n, a.input_len, vocab, a.seed + rep))
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
        dt = time.perf_counter() - t0
        best = min(best or (dt, out[:, ids.shape[1]:].numel()), (dt, out[:, ids.shape[1]:].numel()))
    fwd = floor_hf(a, model, vocab)
    del model
    gc.collect()
    return {"wall": best[0], "out": best[1]}, fwd


def floor_hf(a, model, vocab):
    """Median time of one bare decode forward at batch N over a KV cache of input_len + floor_ctx tokens."""
    from transformers import DynamicCache

    cfg = model.config
    length = a.input_len + a.floor_ctx
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    cache = DynamicCache(config=cfg)
    for layer in range(cfg.num_hidden_layers):
        k, v = (torch.randn(a.n, cfg.num_key_value_heads, length, head_dim, generator=g).to(dtype) for _ in "kv")
        cache.update(k, v, layer)
    ids = torch.tensor(make_prompts(a.n, 1, vocab, seed=778))
    times = []
    for i in range(a.floor_iters + 2):  # the first two are warm-up
        t0 = time.perf_counter()
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t0)
        cache.crop(-1)  # transformers 5: a negative value drops that many tokens
        assert cache.get_seq_length() == length
    return statistics.median(times[2:])


# ---------------------------------------------------------------- vLLM (subprocess)
VLLM_WORKER = r'''
import json, sys, time
def main():
    a = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(model=a["model"], dtype=a["dtype"], max_model_len=a["max_model_len"], max_num_seqs=a["n"],
              max_num_batched_tokens=a["max_num_batched_tokens"], gpu_memory_utilization=a["mem"], seed=0,
              skip_tokenizer_init=True)
    init = time.perf_counter() - t0
    def run(prompts, max_tokens):
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs), \
            sum(o.num_cached_tokens or 0 for o in outs)
    run(a["warm"], 8)
    reps = [run(p, a["output_len"]) for p in a["prompts"]]
    print("VLLM_RESULT " + json.dumps({"init_s": init, "reps": reps}), flush=True)
if __name__ == "__main__":
    main()
'''


def bench_vllm(a, folder, vocab, workdir):
    job = {"model": folder, "dtype": a.dtype, "n": a.n, "output_len": a.output_len, "mem": a.vllm_mem,
           "max_model_len": a.input_len + a.output_len + 16, "max_num_batched_tokens": a.max_num_batched_tokens,
           "warm": make_prompts(min(a.n, 8), a.input_len, vocab, WARM_SEED),
           "prompts": [make_prompts(a.n, a.input_len, vocab, a.seed + rep) for rep in range(a.repeat)]}
    script, job_file = os.path.join(workdir, "vllm_worker.py"), os.path.join(workdir, "vllm_job.json")
    log = os.path.join(workdir, f"vllm-{os.path.basename(folder)}.log")
    with open(script, "w") as f:
        f.write(VLLM_WORKER)
    with open(job_file, "w") as f:
        json.dump(job, f)
    with open(log, "w") as f:
        try:
            subprocess.run([a.vllm_python, script, job_file], stdout=f, stderr=subprocess.STDOUT,
                           timeout=a.vllm_timeout, cwd=workdir)
        except subprocess.TimeoutExpired:
            print(f"  vLLM timed out after {a.vllm_timeout}s; log: {log}")
            return None
    lines = [ln for ln in open(log, errors="replace") if ln.startswith("VLLM_RESULT ")]
    if not lines:
        tail = [ln.rstrip() for ln in open(log, errors="replace") if "Error" in ln or "error" in ln][-3:]
        print(f"  vLLM failed (log: {log}):", *tail, sep="\n    ")
        return None
    res = json.loads(lines[-1].split(" ", 1)[1])
    dt, n_out, cached = min(res["reps"])
    return {"wall": dt, "out": n_out, "init": res["init_s"], "cached": cached}


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=64, help="number of prompts (all in one batch)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--models", default="smollm2,qwen3-tiny", help="comma list: smollm2, smollm2-gguf, qwen3-tiny, HF folders")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of nano-pd and vLLM (best kept)")
    ap.add_argument("--hf-repeat", type=int, default=1, help="timed runs of HF generate (best kept)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--decode-modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--floor-ctx", type=int, default=64, help="output tokens already decoded when the floor is timed")
    ap.add_argument("--floor-iters", type=int, default=8)
    ap.add_argument("--no-hf", action="store_true", help="skip HF generate (and the HF floor)")
    ap.add_argument("--vllm-python", default="", help="python of a venv with vllm (e.g. /tmp/vllm-peer/venv/bin/python)")
    ap.add_argument("--vllm-mem", type=float, default=0.2, help="vLLM gpu_memory_utilization (= CPU RAM fraction)")
    ap.add_argument("--vllm-timeout", type=int, default=1200)
    ap.add_argument("--cache-dir", default=str(cache_root()))
    a = ap.parse_args()

    load0 = os.getloadavg()
    print(f"# n={a.n} input={a.input_len} output={a.output_len} dtype={a.dtype} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} cpus={os.cpu_count()} load(1/5/15m)={load0[0]:.2f}/{load0[1]:.2f}/"
          f"{load0[2]:.2f}", flush=True)
    workdir = tempfile.mkdtemp(prefix="offline_throughput-")
    tables, floors = [], []
    for name in a.models.split(","):
        name = name.strip()
        folder = model_folder(name, a.cache_dir)
        vocab = hf_config(folder)["vocab_size"]
        rows = {}
        if a.vllm_python:
            print(f"[{name}] vLLM ...", flush=True)
            rows[f"vLLM-CPU {a.dtype}"] = bench_vllm(a, folder, vocab, workdir)
        floor = {}
        for mode in a.decode_modes:
            print(f"[{name}] nano-pd {mode} ...", flush=True)
            rows[f"nano-pd {a.dtype} {mode}"], floor[mode] = bench_ours(a, engine_source(name, folder), vocab, mode)
        hf_fwd = {}
        if not a.no_hf:
            for dt in dict.fromkeys(["float32", a.dtype]):
                print(f"[{name}] HF generate {dt} ...", flush=True)
                rows[f"HF generate {dt}"], hf_fwd[dt] = bench_hf(a, folder, vocab, dt)
        tables.append((name, rows))
        floors.append((name, floor, hf_fwd))

    in_tok = a.n * a.input_len
    print(f"\n== offline throughput: {a.n} prompts x {a.input_len} in x {a.output_len} out, greedy, ignore_eos "
          f"(best of {a.repeat} nano-pd/vLLM, {a.hf_repeat} HF) ==")
    hdr = (f"{'model':<12} {'engine':<26} {'wall s':>8} {'out tok/s':>10} {'total tok/s':>12} {'x HF fp32':>10} "
           f"{'x vLLM':>7} {'start s':>8}")
    print(hdr + "\n" + "-" * len(hdr))
    for name, rows in tables:
        hf32 = rows.get("HF generate float32")
        vl = rows.get(f"vLLM-CPU {a.dtype}")
        for engine, r in rows.items():
            if r is None:
                print(f"{name:<12} {engine:<26} {'failed (see above)':>30}")
                continue
            x_hf = f"{hf32['wall'] / r['wall']:.2f}" if hf32 else "-"
            x_vl = f"{vl['wall'] / r['wall']:.2f}" if vl else "-"
            start = r.get("start", r.get("init"))
            print(f"{name:<12} {engine:<26} {r['wall']:8.2f} {r['out'] / r['wall']:10.1f} "
                  f"{(r['out'] + in_tok) / r['wall']:12.1f} {x_hf:>10} {x_vl:>7} "
                  f"{'-' if start is None else f'{start:.1f}':>8}")
    for name, rows in tables:
        vl = rows.get(f"vLLM-CPU {a.dtype}")
        if vl:
            print(f"  ({name}: vLLM's prompt tokens from its prefix cache: {vl['cached']})")

    print(f"\n== decode floor: one step with {a.n} sequences decoding (median of {a.floor_iters}) ==")
    hdr = (f"{'model':<12} {'mode':<8} {'ctx':>4} {'nano-pd step ms':>16} {'nano-pd fwd ms':>15} "
           f"{'HF fwd ' + a.dtype + ' ms':>18} {'HF fwd fp32 ms':>15} {'step/HF fwd':>12}")
    print(hdr + "\n" + "-" * len(hdr))
    for name, by_mode, hf in floors:
        same = hf.get(a.dtype)
        for mode, fl in by_mode.items():
            print(f"{name:<12} {mode:<8} {fl['ctx']:>4} {fl['step'] * 1e3:16.1f} {fl['fwd'] * 1e3:15.1f} "
                  f"{(same or 0) * 1e3:18.1f} {hf.get('float32', 0) * 1e3:15.1f} "
                  f"{(fl['step'] / same if same else float('nan')):12.2f}")
    print("  (nano-pd fwd = our model's forward + logits inside the step; HF fwd = model(input_ids=[N,1], "
          "past_key_values=DynamicCache, use_cache=True), KV length = ctx - 1)")
    load1 = os.getloadavg()
    print(f"# load(1/5/15m) at end={load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}")


if __name__ == "__main__":
    main()
