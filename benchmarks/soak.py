#!/usr/bin/env python3
"""The reliability suite's scenarios (tests/reliability/), run longer: the soak, not part of CI.

One cluster (2 prefill, 2 decode workers; router with --max-queued-requests 64) on a tiny model built locally, or
on --model. Each scenario drives greedy requests (half streamed) from --concurrency clients for its share of
--minutes and --requests, and injects its fault a third of the way in (of its requests or its time); a killed or hung worker is replaced as its
supervisor would. Then the cluster must drain to idle. One Markdown table:

    scenario | requests | ok | lost | errors by status | p99 latency | leaked

ok: the offline engine's exact greedy text. lost: a request that neither got that text nor a documented refusal
(a 429, or a connection cut by the dead router in restart-router): a wrong text, a 5xx or a dropped connection
where migration was possible. leaked: requests the router still holds and KV blocks workers still hold after the
drain.

    .venv/bin/python benchmarks/soak.py                      # 10 minutes, 2,000 requests
    .venv/bin/python benchmarks/soak.py --minutes 2 --requests 400 --scenarios steady,kill-decode
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import httpx  # noqa: E402

from tests.reliability.streams import body, chat, distinct_prompts  # noqa: E402
from tests.support.cluster_harness import LocalCluster, idle_problems  # noqa: E402

SCENARIOS = ("steady", "overload", "kill-decode", "kill-prefill", "stop-decode", "stop-prefill", "restart-router")
MAX_QUEUED = 64


def tiny_model(folder: str) -> str:
    from tests.support.tiny_models import SERVING_TINY, make_tiny_model_from_config

    return str(make_tiny_model_from_config(folder, SERVING_TINY))


def references(model: str, prompts: list[str], max_tokens: int) -> dict[str, str]:
    from common import SamplingParams
    from common.engine import LLM

    llm = LLM(model, num_kv_blocks=2048)
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                    SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    return {p: o["text"] for p, o in zip(prompts, outs)}


async def drive(base_url: str, prompts: list[str], max_tokens: int, concurrency: int, seconds: float,
                budget: int, fault: threading.Thread) -> list[tuple]:
    """(prompt, outcome, latency) of every request sent from concurrency clients for seconds or budget requests;
    the fault starts (in its thread) once a third of the budget is sent, or a third of the time has passed."""
    done: list[tuple] = []
    start, sent = time.monotonic(), 0
    deadline = start + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        async def client_loop():
            nonlocal sent
            while time.monotonic() < deadline and sent < budget:
                if not fault.is_alive() and fault.ident is None and (
                        sent >= budget // 3 or time.monotonic() - start >= seconds / 3):
                    fault.start()
                prompt = prompts[sent % len(prompts)]
                stream, sent = sent % 2 == 0, sent + 1
                t0 = time.monotonic()
                outcome = await chat(client, body(prompt, max_tokens, stream))
                done.append((prompt, outcome, time.monotonic() - t0))
                if outcome.status in (0, 429, 503):
                    await asyncio.sleep(0.2)  # what a polite client does before trying again

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return done


def inject(c: LocalCluster, scenario: str):
    """The scenario's fault, and the replacement a supervisor would start."""
    if scenario == "restart-router":
        c.restart_router()
        return
    action, _, role = scenario.partition("-")
    if not role:
        return
    worker = max(c.alive(role), key=lambda w: w["inflight"])
    index = [p.pid for p in c.procs[role]].index(worker["pid"])
    if action == "kill":
        c.kill(role, index)
        c.procs[role].pop(index)
    else:
        c.send_signal(role, index, signal.SIGSTOP)
        c.wait_for(lambda: not any(w["pid"] == worker["pid"] and w["alive"] for w in c.workers()), "its death", 30)
        c.send_signal(role, index, signal.SIGCONT)
        c.forget(role, index)  # the router refuses it on its next heartbeat: it exits
    c.add(role, wait=False)


def drain(c: LocalCluster, timeout: float = 60) -> tuple[int, int]:
    """(requests the router holds, KV blocks the workers hold) once idle, or at the timeout."""
    c.wait_workers(prefill=2, decode=2, timeout=120)
    deadline = time.monotonic() + timeout
    while idle_problems(c) and time.monotonic() < deadline:
        time.sleep(0.5)
    page = json.loads(c.get("/cluster")[1])
    held = sum(w["load"]["total_blocks"] - w["load"]["free_blocks"] for w in page["workers"] if w["alive"])
    return page["requests"], held


def row(scenario: str, results: list[tuple], expected: dict[str, str], leaked: tuple[int, int]) -> str:
    ok = lost = 0
    errors: dict[str, int] = {}
    for prompt, o, _ in results:
        if o.status == 200 and o.error is None and o.text == expected[prompt]:
            ok += 1
            continue
        cut = o.status == 200 and o.error is None and expected[prompt].startswith(o.text)  # a stream that stopped
        key = ("conn" if o.status == 0 else "200 cut" if cut else "200 wrong" if o.status == 200 and o.error is None
               else "200+error" if o.status == 200 else str(o.status))
        errors[key] = errors.get(key, 0) + 1
        documented = o.status == 429 or (scenario == "restart-router" and key in ("conn", "200 cut"))
        lost += not documented
    latencies = sorted(t for _, _, t in results)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    status = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "-"
    return (f"| {scenario} | {len(results)} | {ok} | {lost} | {status} | {p99:.2f} s | "
            f"{leaked[0]} requests, {leaked[1]} blocks |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: a tiny random-weight Llama built here)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32, help="clients (the overload scenario uses 8 times as many)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = ap.parse_args()
    scenarios = args.scenarios.split(",")
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    model = args.model or tiny_model(tempfile.mkdtemp(prefix="nano-pd-soak-"))
    prompts = distinct_prompts(16)
    expected = references(model, prompts, args.max_tokens)
    seconds, budget = args.minutes * 60 / len(scenarios), args.requests // len(scenarios)
    lines = ["| scenario | requests | ok | lost | errors by status | p99 latency | leaked after drain |",
             "|---|---:|---:|---:|---|---:|---|"]
    with LocalCluster(model, prefill=2, decode=2, router_args=("--max-queued-requests", str(MAX_QUEUED))) as c:
        for scenario in scenarios:
            concurrency = args.concurrency * (8 if scenario == "overload" else 1)
            fault = threading.Thread(target=inject, args=(c, scenario))
            results = asyncio.run(drive(c.base_url, prompts, args.max_tokens, concurrency, seconds, budget, fault))
            if fault.ident is not None:
                fault.join()
            lines.append(row(scenario, results, expected, drain(c)))
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
