#!/usr/bin/env python3
"""Online serving benchmark: streamed chat completions against any OpenAI-compatible URL (nano-pd or `vllm serve`),
or the same workload in-process on nano-pd's colocated engine (--colocated MODEL).

Every request is a seeded random-word chat prompt of about --input-len tokens that asks for exactly --output-len
tokens (max_tokens + ignore_eos, temperature 0), so engines are compared on the same work whatever they generate.
Requests arrive as a Poisson process (--request-rate, `inf` = all at once), optionally capped at --concurrency in
flight; --concurrency alone means N requests always in flight.

Per request: TTFT = send -> first content delta; ITL = gaps between content chunks; TPOT = (latency - TTFT) /
(completion_tokens - 1) with completion_tokens from the usage chunk (else the number of content chunks).
Goodput = completed requests per second that meet both --slo-ttft-ms and --slo-tpot-ms.

--colocated MODEL (an HF folder, a .gguf file, or `default` / bare --colocated = the bundled SmolLM2-135M-Instruct)
skips HTTP: one LLMEngine (prefill and decode in this process) runs the same seeded prompts, rendered with the
model's chat template and tokenized exactly as the router does (before the clock starts), greedy, --output-len
tokens with ignore_eos, max_num_seqs = the concurrency cap. The main thread alternates engine.step() with admitting
arrived requests while fewer than the cap are in flight. A request's clock starts when a client would have sent it:
at its scheduled arrival, or when a slot frees if all were busy (a request arriving mid-step waits for that step to
end, as it would in a server's queue). Its first token lands at the end of the step that sampled it; ITL = gaps
between the ends of its token steps. One short warm-up request (a different prompt) runs before the clock starts.

    .venv/bin/python benchmarks/serving.py --base-url http://127.0.0.1:8000/v1 --concurrency 8 --label nano-pd
    .venv/bin/python benchmarks/serving.py --request-rate 4 --plot cdf.png --json runs.json --label vllm
    .venv/bin/python benchmarks/serving.py --colocated --dtype bfloat16 --concurrency 8 --json runs.json

Prints one Markdown table row (with header) to stdout; diagnostics go to stderr. --json appends this run (config,
summary and every request) to a JSON list in the file. Also a library: `await run_benchmark(BenchConfig(...))`
(`run_colocated(cfg)` is the synchronous colocated run; run_benchmark calls it, blocking, when cfg.colocated is set).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import sys
import heapq
import time
from collections import Counter
from typing import Any, Mapping

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # `common` for --colocated when run as a script

# Short, common English words: most are one token (with their leading space) in BPE vocabularies, so
# N words make a prompt of roughly N tokens on any model; the true count comes back in `usage`.
WORDS = """
the of and to in is was for on are as with his they at be this from have or by one had not but what all were
when we there can an your which their said if do will each about how up out them then she many some so these
would other into has more her two like him see time could no make than first been its who now people my made
over did down only way find use may water long little very after words called just where most know get through
back much go good new write our me man too any day same right look think also around another came come work
three word must because does part even place well such here take why things help put years different away again
off went old number great tell men say small every found still between name should home big give air line set
own under read last never us left end along while might next sound below saw something thought both few those
always looked show large often together asked house world going want school important until form food keep
children feet land side without boy once animals life enough took sometimes four head above kind began almost
live page got earth need far hand high year mother light parts country father let night following picture being
study second eyes soon times story boys since white days ever paper hard near sentence better best across during
today others however sure means knew try told young miles sun ways thing whole hear example heard several change
answer room sea against top turned learn point city play toward five using himself usually money seen car
""".split()


@dataclasses.dataclass
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None  # None: the first id of GET /models
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 128
    concurrency: int | None = None  # cap on requests in flight; None = no cap
    request_rate: float = math.inf  # Poisson arrivals per second; inf = all at t=0
    seed: int = 0
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 100.0
    plot: str | None = None
    label: str | None = None
    json: str | None = None
    api_key: str | None = None
    timeout: float = 600.0  # seconds, per request, whole stream included
    colocated: str | None = None  # model for the in-process colocated engine instead of base_url
    dtype: str = "auto"  # colocated engine only: auto | float32 | bfloat16


@dataclasses.dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    start: float = 0.0  # perf_counter seconds relative to the benchmark start
    ttft: float | None = None  # seconds
    latency: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    chunks: int = 0

    @property
    def tpot(self) -> float | None:
        if not self.ok or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.completion_tokens - 1)


def make_prompts(n: int, input_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(n)]


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    # A separate stream from the prompts' so that changing the rate never changes the prompts.
    rng = random.Random(seed + 1_000_003)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _stats_ms(values_s: list[float]) -> dict[str, float | None]:
    ms = [v * 1000.0 for v in values_s]
    return {"mean": sum(ms) / len(ms) if ms else None, "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99)}


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def fetch_default_model(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    r = await client.get(f"{base_url}/models", headers=_headers(api_key))
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def _one_request(client: httpx.AsyncClient, cfg: BenchConfig, model: str, prompt: str, t0: float
                       ) -> RequestResult:
    res = RequestResult()
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": cfg.output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    res.start = start - t0
    last = None
    try:
        async with asyncio.timeout(cfg.timeout):
            async with client.stream("POST", f"{cfg.base_url}/chat/completions", json=payload,
                                     headers=_headers(cfg.api_key)) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")
                    res.error = f"HTTP {resp.status_code}: {body[:200]}"
                    return res
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, SSE comments / keep-alives
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if obj.get("error"):
                        res.error = f"stream error: {json.dumps(obj['error'])[:200]}"
                        return res
                    text = "".join((c.get("delta") or {}).get("content") or "" for c in obj.get("choices") or [])
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        res.chunks += 1
                    usage = obj.get("usage")
                    if usage:
                        res.prompt_tokens = usage.get("prompt_tokens")
                        res.completion_tokens = usage.get("completion_tokens")
        res.latency = time.perf_counter() - start
    except Exception as e:  # a benchmark reports failures, it does not stop at the first one
        res.error = f"{type(e).__name__}: {e}"[:200] if str(e) else type(e).__name__
        return res
    if res.ttft is None:
        res.error = "no content in stream"
        return res
    if not res.completion_tokens:
        res.completion_tokens = res.chunks
    res.ok = True
    return res


def summarize(cfg: BenchConfig, results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    prompt_known = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    in_tokens = sum(prompt_known)
    good = sum(1 for r in ok if r.ttft * 1000 <= cfg.slo_ttft_ms
               and (r.tpot is None or r.tpot * 1000 <= cfg.slo_tpot_ms))
    dur = duration if duration > 0 else float("nan")
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / dur,
        "output_throughput": out_tokens / dur,
        "total_throughput": (in_tokens + out_tokens) / dur,
        "mean_prompt_tokens": sum(prompt_known) / len(prompt_known) if prompt_known else None,
        "mean_completion_tokens": out_tokens / len(ok) if ok else None,
        "short_outputs": sum(1 for r in ok if r.completion_tokens < cfg.output_len),
        "ttft_ms": _stats_ms([r.ttft for r in ok]),
        "tpot_ms": _stats_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats_ms([g for r in ok for g in r.itl]),
        "goodput": good / dur,
        "errors": dict(Counter(r.error for r in results if not r.ok).most_common()),
    }


def plot_cdfs(results: list[RequestResult], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # headless machines, and never steal focus from a desktop session
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    series = [("TTFT", [r.ttft for r in ok]), ("TPOT", [r.tpot for r in ok if r.tpot is not None]),
              ("ITL", [g for r in ok for g in r.itl])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (name, vals) in zip(axes, series):
        ms = sorted(v * 1000 for v in vals)
        if ms:
            ax.step(ms, [(i + 1) / len(ms) for i in range(len(ms))], where="post")
            for p in (50, 90, 99):
                ax.axvline(percentile(ms, p), ls=":", lw=0.8, color="gray")
        ax.set_title(f"{name} (n={len(ms)})")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _append_json(path: str, record: dict) -> None:
    runs = []
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path) as f:
            runs = json.load(f)
        if not isinstance(runs, list):
            runs = [runs]
    runs.append(record)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(runs, f, indent=1)
    os.replace(tmp, path)  # a run killed mid-write must not destroy the earlier runs


async def run_benchmark(config: BenchConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Run one benchmark; returns {"label", "model", "config", "summary", "requests"}. Writes --plot / --json."""
    cfg = config if isinstance(config, BenchConfig) else BenchConfig(**dict(config))
    if cfg.colocated is not None:
        return run_colocated(cfg)
    cfg = dataclasses.replace(cfg, base_url=cfg.base_url.rstrip("/"))
    prompts = make_prompts(cfg.num_prompts, cfg.input_len, cfg.seed)
    arrivals = arrival_times(cfg.num_prompts, cfg.request_rate, cfg.seed)
    inflight = cfg.concurrency or cfg.num_prompts
    # Enough pooled connections for every request in flight: otherwise requests would wait for a socket
    # inside httpx after their clock started, and that wait would show up as server TTFT.
    limits = httpx.Limits(max_connections=inflight, max_keepalive_connections=inflight)
    # trust_env=False: a proxy from the environment must not sit between the benchmark and a local server.
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(cfg.timeout), trust_env=False) as client:
        model = cfg.model or await fetch_default_model(client, cfg.base_url, cfg.api_key)
        sem = asyncio.Semaphore(inflight)

        async def gated(prompt: str, t0: float) -> RequestResult:
            async with sem:
                return await _one_request(client, cfg, model, prompt, t0)

        t0 = time.perf_counter()
        tasks = []
        for prompt, at in zip(prompts, arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(gated(prompt, t0)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0

    return _finish(cfg, cfg.label or model, model, results, duration)


def _finish(cfg: BenchConfig, label: str, model: str, results: list[RequestResult], duration: float,
            **extra: Any) -> dict[str, Any]:
    """Both modes end here: summary, record, --plot and --json."""
    summary = summarize(cfg, results, duration)
    record = {"label": label, "model": model, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "config": dataclasses.asdict(cfg), "summary": summary,
              "requests": [dataclasses.asdict(r) | {"tpot": r.tpot} for r in results]} | extra
    if cfg.plot:
        plot_cdfs(results, cfg.plot, f"{label}: {cfg.num_prompts} x {cfg.input_len} in / {cfg.output_len} out, "
                                     f"concurrency {cfg.concurrency or '-'}, rate {cfg.request_rate:g}/s")
    if cfg.json:
        _append_json(cfg.json, record)
    return record


def run_colocated(config: BenchConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The HTTP workload on an in-process colocated LLMEngine (see the module docstring); same record as
    run_benchmark."""
    from transformers import AutoTokenizer

    from common import SamplingParams
    from common.engine.config import EngineConfig
    from common.engine.llm_engine import LLMEngine

    cfg = config if isinstance(config, BenchConfig) else BenchConfig(**dict(config))
    model_arg = None if cfg.colocated in (None, "", "default") else cfg.colocated
    inflight = cfg.concurrency or cfg.num_prompts
    engine = LLMEngine(EngineConfig(model=model_arg, dtype=cfg.dtype, max_num_seqs=inflight, num_kv_blocks=None,
                                    kv_cache_memory_gb=1.0, seed=cfg.seed))
    tokenizer = AutoTokenizer.from_pretrained(engine.config.model)

    def encode(prompt: str) -> list[int]:  # what router/serving_chat.py does with a one-message chat request
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)

    params = SamplingParams(temperature=0.0, max_tokens=cfg.output_len, ignore_eos=True)
    prompt_ids = [encode(p) for p in make_prompts(cfg.num_prompts, cfg.input_len, cfg.seed)]
    arrivals = arrival_times(cfg.num_prompts, cfg.request_rate, cfg.seed)

    # warm-up (lazy torch / kernel init) on a prompt the benchmark does not use
    engine.add_request(encode(make_prompts(1, cfg.input_len, cfg.seed + 7_919)[0]),
                       SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), "warmup")
    while engine.has_unfinished():
        engine.step()

    results = [RequestResult() for _ in prompt_ids]
    last_token: dict[int, float] = {}  # request index -> time of its latest token (relative to t0)
    active: dict[str, tuple[int, Any]] = {}  # request_id -> (index, Sequence)
    free_at = [0.0] * inflight  # when each slot became free (a min-heap), relative to t0
    nxt = 0
    t0 = time.perf_counter()

    def end(i: int, now: float, error: str | None = None) -> None:
        res = results[i]
        if error is None:
            res.ok, res.latency = True, now - res.start
        else:
            res.error = error
        heapq.heappush(free_at, now)

    while nxt < len(prompt_ids) or active:
        now = time.perf_counter() - t0
        while nxt < len(prompt_ids) and arrivals[nxt] <= now and len(active) < inflight:
            i, nxt = nxt, nxt + 1
            res = results[i]
            res.start = max(arrivals[i], heapq.heappop(free_at))
            res.prompt_tokens = len(prompt_ids[i])
            try:
                seq = engine.add_request(prompt_ids[i], params, f"bench-{i}")
            except Exception as e:  # e.g. a prompt longer than the context: recorded, like an HTTP 400
                end(i, res.start, f"{type(e).__name__}: {e}"[:200])
                continue
            active[seq.request_id] = (i, seq)
        if not active:  # idle until the next arrival
            time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - t0)))
            continue
        stepped = engine.step()
        now = time.perf_counter() - t0
        for seq in stepped:
            if seq.request_id not in active:
                continue
            i = active[seq.request_id][0]
            res = results[i]
            if i in last_token:
                res.itl.append(now - last_token[i])
            else:
                res.ttft = now - res.start
            last_token[i] = now
            res.chunks += 1
            res.completion_tokens = seq.num_output_tokens
            if seq.is_finished:
                del active[seq.request_id]
                end(i, now)
        for rid, (i, seq) in list(active.items()):
            if now - results[i].start > cfg.timeout:
                engine.abort(seq)
                del active[rid]
                end(i, now, "TimeoutError")
    duration = time.perf_counter() - t0

    ec = engine.config
    return _finish(cfg, cfg.label or "nano-pd colocated", cfg.colocated or "default", results, duration,
                   engine={"folder": ec.model, "dtype": ec.dtype, "max_num_seqs": ec.max_num_seqs,
                           "num_kv_blocks": engine.block_manager.num_blocks})


TABLE_HEADER = ["label", "ok/fail", "dur s", "req/s", "out tok/s", "total tok/s",
                "TTFT p50", "TTFT p90", "TTFT p99", "TPOT p50", "TPOT p90", "TPOT p99",
                "ITL p50", "ITL p90", "ITL p99", "goodput req/s"]


def table_row(record: Mapping[str, Any]) -> list[str]:
    s = record["summary"]

    def f(v, nd=1):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"

    row = [record["label"], f"{s['completed']}/{s['failed']}", f(s["duration_s"], 2), f(s["request_throughput"], 2),
           f(s["output_throughput"]), f(s["total_throughput"])]
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        row += [f(s[key][p]) for p in ("p50", "p90", "p99")]
    return row + [f(s["goodput"], 2)]


def format_table(records: list[Mapping[str, Any]]) -> str:
    align = "|".join(["---"] + ["---:"] * (len(TABLE_HEADER) - 1))
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", f"|{align}|"]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in records]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None, help="default: the first model of GET /models")
    ap.add_argument("--colocated", nargs="?", const="default", default=None, metavar="MODEL",
                    help="run in-process on nano-pd's colocated engine instead of --base-url: an HF folder, a "
                         ".gguf file or `default` (the bundled SmolLM2-135M-Instruct, also bare --colocated)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="--colocated engine dtype")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128, help="approximate prompt tokens (random words)")
    ap.add_argument("--output-len", type=int, default=128, help="max_tokens, with ignore_eos")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="max requests in flight (alone: fixed concurrency)")
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="Poisson arrivals, req/s; inf = all at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0)
    ap.add_argument("--plot", default=None, metavar="PNG", help="CDFs of TTFT, TPOT and ITL")
    ap.add_argument("--label", default=None,
                    help='row name in the table (default: the model; "nano-pd colocated" with --colocated)')
    ap.add_argument("--json", default=None, metavar="FILE", help="append this run (raw per-request results too)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    a = ap.parse_args(argv)
    if a.concurrency is not None and a.concurrency < 1:
        ap.error("--concurrency must be >= 1")
    if not a.request_rate > 0:
        ap.error("--request-rate must be > 0")
    if a.colocated is None and a.dtype != "auto":
        ap.error("--dtype is for --colocated")
    if a.colocated is not None and a.model is not None:
        ap.error("--model names the served model of --base-url; with --colocated, give the model to --colocated")
    a.base_url = a.base_url.rstrip("/")
    return BenchConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(BenchConfig)})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    mode = f"concurrency {cfg.concurrency or 'unlimited'}, request rate {cfg.request_rate:g}/s"
    target = cfg.base_url if cfg.colocated is None else f"colocated engine ({cfg.colocated}, dtype {cfg.dtype})"
    print(f"{target}: {cfg.num_prompts} prompts x ~{cfg.input_len} in / {cfg.output_len} out, {mode}",
          file=sys.stderr)
    if cfg.colocated is not None:
        from common.errors import NanoPDError

        try:
            record = run_colocated(cfg)
        except NanoPDError as e:  # model not found / unloadable, bad engine arguments
            print(f"cannot start the colocated engine: {e}", file=sys.stderr)
            return 2
        return _report(cfg, record)
    try:
        record = asyncio.run(run_benchmark(cfg))
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        # only the GET /models probe can get here: every request records its own errors
        print(f"cannot list models at {cfg.base_url}/models ({type(e).__name__}: {e}); pass --model",
              file=sys.stderr)
        return 2
    return _report(cfg, record)


def _report(cfg: BenchConfig, record: Mapping[str, Any]) -> int:
    s = record["summary"]

    def mean(v):
        return "-" if v is None else f"{v:.1f}"

    print(f"model {record['model']}: mean prompt_tokens {mean(s['mean_prompt_tokens'])} "
          f"({'from usage' if cfg.colocated is None else 'chat template'}), "
          f"mean completion_tokens {mean(s['mean_completion_tokens'])}", file=sys.stderr)
    if s["short_outputs"]:
        print(f"warning: {s['short_outputs']} requests returned fewer than {cfg.output_len} tokens "
              f"(server ignored ignore_eos?)", file=sys.stderr)
    for err, n in list(s["errors"].items())[:5]:
        print(f"error x{n}: {err}", file=sys.stderr)
    print(format_table([record]))
    return 0 if s["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
