"""Decode speed: tokens/s of the engine's decode loop at several batch sizes for an eager step, a compiled step
(torch.compile on CPU, CUDA graphs on GPU) and a compiled step with n-gram speculation (and with a draft model when
--draft-model is given), on a copy-heavy workload (the model is asked to repeat code, so n-gram drafts are often
right) and on random prompts.

One table; every row checks that its output equals the eager output token for token (greedy). Compilation happens
in a warm-up before anything is timed.

    .venv/bin/python benchmarks/decode.py [--model M] [--dtype float32] [--batch-sizes 1 8 64] [--max-tokens 128]
"""
import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import SamplingParams  # noqa: E402
from common.engine import LLM

CODE = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return b


def factorial(n):
    result = 1
    for i in range(2, n + 1):
        result *= i
    return result
'''


def workloads(batch: int, seed: int) -> dict[str, list[list[dict]]]:
    rng = random.Random(seed)
    words = "time people way year day thing man world life hand part child eye place work week case".split()
    copy = [[{"role": "user", "content": f"Rewrite this code, renaming fibonacci to fib{i} and changing nothing "
                                          f"else:\n\n{CODE}"}] for i in range(batch)]
    rand = [[{"role": "user", "content": " ".join(rng.choice(words) for _ in range(40))}] for _ in range(batch)]
    return {"copy-heavy": copy, "random": rand}


def run(llm: LLM, conversations, max_tokens: int) -> tuple[float, list[list[int]]]:
    """Decode tok/s: output tokens after the first, over the time after every prompt has its first token."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tok = llm.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False) for c in conversations]
    eng = llm.engine
    seqs = [eng.add_request(p, params) for p in prompts]
    while any(s.num_output_tokens == 0 for s in seqs):
        eng.step()
    start, base = time.perf_counter(), sum(s.num_output_tokens for s in seqs)
    while eng.has_unfinished():
        eng.step()
    elapsed = time.perf_counter() - start
    return (sum(s.num_output_tokens for s in seqs) - base) / elapsed, [s.output_token_ids for s in seqs]


def warm_up(llm: LLM):
    """Compile (or capture) the decode step for batch 1 and for larger batches before anything is timed."""
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    llm.generate([[1, 2, 3, 4]], params, use_tqdm=False)
    llm.generate([[1, 2, 3, 4], [5, 6, 7]], params, use_tqdm=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-speculative-tokens", type=int, default=5)
    ap.add_argument("--disable-by-batch-size", type=int, default=None,
                    help="no drafts while more sequences than this are running")
    ap.add_argument("--draft-model", default=None, help="also time draft-model speculation with this model")
    ap.add_argument("--compiled-mode", default="compile", choices=["compile", "cuda_graph"])
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    ngram = {"method": "ngram", "num_speculative_tokens": a.num_speculative_tokens,
             "disable_by_batch_size": a.disable_by_batch_size}
    shared = dict(dtype=a.dtype, device=a.device, max_num_seqs=max(a.batch_sizes))
    engines = {"eager": LLM(a.model, decode_mode="eager", **shared),
               "compiled": LLM(a.model, decode_mode=a.compiled_mode, **shared),
               "compiled + ngram": LLM(a.model, decode_mode=a.compiled_mode, speculative_config=ngram, **shared)}
    if a.draft_model:
        draft = {"method": "draft_model", "model": a.draft_model, "num_speculative_tokens": a.num_speculative_tokens,
                 "disable_by_batch_size": a.disable_by_batch_size}
        engines["compiled + draft"] = LLM(a.model, decode_mode=a.compiled_mode, speculative_config=draft, **shared)
    for llm in engines.values():
        warm_up(llm)
    print("| workload | batch | engine | decode tok/s | x eager | accepted / proposed | same output |")
    print("|---|---:|---|---:|---:|---|---|")
    for batch in a.batch_sizes:
        for name, convs in workloads(batch, seed=batch).items():
            base_rate, base_out = None, None
            for label, llm in engines.items():
                before = llm.stats()
                rate, out = run(llm, convs, a.max_tokens)
                after = llm.stats()
                drafts = after["spec_draft_tokens"] - before["spec_draft_tokens"]
                accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
                if base_rate is None:
                    base_rate, base_out = rate, out
                ratio = f"{accepted}/{drafts}" if drafts else "-"
                print(f"| {name} | {batch} | {label} | {rate:.1f} | {rate / base_rate:.2f} | {ratio} | "
                      f"{'yes' if out == base_out else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
