"""Offline chat with a model: `python -m common.engine.cli [--model M] [PROMPT ...]`.

With prompts it answers each and exits; without, it reads questions from standard input.
"""
import argparse
import sys
import time

from common import SamplingParams
from common.engine import LLM
from common.errors import NanoPDError


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", nargs="*", help="questions to answer (default: read from stdin)")
    ap.add_argument("--model", default=None, help="HF folder, .gguf file or default model name")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)
    try:
        llm = LLM(args.model, dtype=args.dtype)
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    except NanoPDError as e:
        sys.exit(f"error: {e}")
    interactive = not args.prompts
    questions = args.prompts or (line.strip() for line in sys.stdin)
    if interactive and sys.stdin.isatty():
        print("Ask a question (Ctrl-D to quit).", file=sys.stderr)
    for question in questions:
        if not question:
            continue
        start = time.perf_counter()
        out = llm.chat([{"role": "user", "content": question}], params)[0]
        elapsed = time.perf_counter() - start
        print(out["text"])
        print(f"[{len(out['token_ids'])} tokens in {elapsed:.2f} s]", file=sys.stderr)


if __name__ == "__main__":
    main()
