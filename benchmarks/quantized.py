#!/usr/bin/env python3
"""Quantized weights: decode tok/s at several batch sizes, prefill tok/s and resident memory of the engine on the
default GGUF with its Q4_1 blocks kept (quantization int4, with and without the bf16 copy that its steps of many
rows multiply) against the same file dequantized (none), and llama.cpp on the same file at batch 1 in the same run
(--llama-cpp-python, a python with llama_cpp: benchmarks/install_llama_cpp.sh). One table.

Every configuration runs in its own process (so its resident memory is its own): chat prompts of the decode
benchmark's random workload (benchmarks/decode.py), greedy, ignore_eos, --max-tokens new tokens; decode tok/s
counts the tokens after each sequence's first, over the time after every prompt has its first token. llama.cpp
gets the same token ids, 2 threads, and its time after the first token. Each engine row runs in every decode mode
of --decode-modes (eager, compiled). The start column is the engine's construction (where a compiled engine
compiles its decode steps, or loads them from the compile cache on disk) plus a warm-up pass that decodes a few
tokens at every batch size before anything is timed.

    .venv/bin/python benchmarks/quantized.py --llama-cpp-python /tmp/llama-cpp-peer/venv/bin/python
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

LLAMA_CPP = r'''
import json, sys, time
from llama_cpp import Llama
a = json.loads(sys.argv[1])
llm = Llama(model_path=a["model"], n_threads=2, n_ctx=2048, n_batch=512, verbose=False)
rates = []
for prompt in a["prompts"]:
    llm.reset()
    start, first, n = time.perf_counter(), None, 0
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        n += 1
        if first is None:
            first = time.perf_counter()
        if n == a["max_tokens"]:
            break
    rates.append((n - 1) / (time.perf_counter() - first))
print("RESULT " + json.dumps({"decode": sorted(rates)[len(rates) // 2]}))
'''


# the rows' weights: the engine options each one sets
WEIGHTS = {"int4": {"quantization": "int4"},
           "int4, no float copy": {"quantization": "int4", "int4_float_copy": False},
           "none (dequantized)": {"quantization": "none"}}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def one(a):
    """Child process: one engine configuration, printed as JSON."""
    from common import SamplingParams
    from common.engine import LLM
    from common.models.gguf import default_gguf_path
    from decode import run, workloads

    weights, decode_mode = a.one.rsplit(",", 1)
    start = time.perf_counter()
    llm = LLM(default_gguf_path(), dtype=a.dtype, decode_mode=decode_mode, max_num_seqs=max(a.batch_sizes),
              **WEIGHTS[weights])
    for batch in a.batch_sizes:  # every batch size's decode step once, so compiling stays out of the timings
        run(llm, workloads(batch, seed=batch)["random"], 4)
    result = {"rss_mb": rss_mb(), "decode": {}, "start_s": time.perf_counter() - start}
    for batch in a.batch_sizes:
        result["decode"][batch] = run(llm, workloads(batch, seed=batch)["random"], a.max_tokens)[0]
    prompts = [[(7 * i + 13 * j) % 49000 + 3 for j in range(128)] for i in range(64)]
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    result["prefill"] = 64 * 128 / (time.perf_counter() - start)
    print("RESULT " + json.dumps(result), flush=True)


def child(args: list[str], python=sys.executable) -> dict | None:
    proc = subprocess.run([python, *args], capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        print(f"  {args[:3]} failed:", *proc.stderr.strip().splitlines()[-3:], sep="\n    ")
        return None
    return json.loads(lines[-1].split(" ", 1)[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--decode-modes", nargs="+", default=["eager", "compile"])
    ap.add_argument("--llama-cpp-python", default="")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one(a)
    base = [os.path.abspath(__file__), "--dtype", a.dtype, "--max-tokens", str(a.max_tokens), "--batch-sizes",
            *map(str, a.batch_sizes)]
    rows = {f"nano-pd {a.dtype}, {weights}, {mode}": child(base + ["--one", f"{weights},{mode}"])
            for mode in a.decode_modes for weights in WEIGHTS}
    if a.llama_cpp_python:
        from transformers import AutoTokenizer

        from common.models.gguf import default_gguf_path, gguf_to_hf_folder
        from decode import workloads

        tok = AutoTokenizer.from_pretrained(gguf_to_hf_folder(default_gguf_path()))
        prompts = [tok.encode(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                              add_special_tokens=False) for c in workloads(5, seed=1)["random"]]
        job = json.dumps({"model": default_gguf_path(), "prompts": prompts, "max_tokens": a.max_tokens})
        got = child(["-c", LLAMA_CPP, job], python=a.llama_cpp_python)
        rows["llama.cpp (llama-cpp-python 0.3.36), Q4_1"] = got and {"decode": {"1": got["decode"]}}
    heads = [f"decode b={b}" for b in a.batch_sizes]
    print(f"\n| engine | {' | '.join(heads)} | prefill 64x128 tok/s | RSS MB | start s |")
    print("|---|" + "---:|" * (len(heads) + 3))
    for name, r in rows.items():
        if r is None:
            print(f"| {name} | failed |")
            continue
        cells = [f"{r['decode'][str(b)]:.1f}" if str(b) in r["decode"] else "-" for b in a.batch_sizes]
        prefill = f"{r['prefill']:.0f}" if "prefill" in r else "-"
        rss = f"{r['rss_mb']:.0f}" if "rss_mb" in r else "-"
        start = f"{r['start_s']:.1f}" if "start_s" in r else "-"
        print(f"| {name} | {' | '.join(cells)} | {prefill} | {rss} | {start} |")


if __name__ == "__main__":
    main()
