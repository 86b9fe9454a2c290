#!/usr/bin/env python3
"""The serving shapes side by side, in one run: nano-pd's 1P1D cluster and a mixed worker (both started with
deploy/launch.py) and `vllm serve` (from its own venv, when --vllm-venv is given), on the same model and the same
client workload (benchmarks/serving.py), one server at a time.

Per server, after one warm-up pass: a load of --num-prompts streamed requests with --concurrency in flight and
--output-len tokens each, then a single stream (--single-prompts requests one after another, --single-output-len
tokens). Prints one Markdown table (a row per server, out tok/s also as a ratio to vLLM's), writes the CDFs of
the load's TTFT and TPOT for every server into one PNG (--plot), and appends every run to --json.

Router CPU: the router process's user + system CPU time over the load, per 100 streamed tokens/s, as a share of
one core (nano-pd rows only; vLLM's front end is not one process of its own to measure).

    .venv/bin/python benchmarks/serving_shapes.py --vllm-venv /tmp/vllm-peer/venv --plot serving-cdf.png
    .venv/bin/python benchmarks/serving_shapes.py --shapes 1p1d,mixed --launch-args "--threads-per-worker 2"
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import serving  # noqa: E402  (benchmarks/serving.py: the client)

SHAPES = {"1p1d": [], "mixed": ["--mixed-workers", "1"]}  # launcher flags of each nano-pd shape


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy within {timeout:g} s")


def start(shape: str, a: argparse.Namespace, log_dir: str) -> subprocess.Popen:
    os.makedirs(log_dir, exist_ok=True)
    log = open(os.path.join(log_dir, f"{shape}.log"), "wb")
    if shape == "vllm":
        from common.names import resolve_model

        folder = resolve_model(a.model, "float32")
        cmd = [os.path.join(a.vllm_venv, "bin", "vllm"), "serve", folder, "--host", "127.0.0.1", "--port",
               str(a.port), "--dtype", a.dtype, "--max-model-len", "2048", "--served-model-name", "served",
               "--enable-prompt-tokens-details"]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
    else:
        cmd = [sys.executable, "-m", "deploy.launch", "--model", a.model, "--port", str(a.port),
               "--dtype", a.dtype, "--log-dir", log_dir, *SHAPES[shape],
               *shlex.split(a.launch_args)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"[{shape}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def router_pid(launcher_pid: int) -> int | None:
    """The `python -m router` child of the launcher."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher_pid and b"router" in argv[:3]:
            return int(pid)
    return None


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def bench(shape: str, a: argparse.Namespace, url: str, launcher_pid: int | None) -> dict:
    common = dict(base_url=url, model=None, input_len=a.input_len, seed=0, timeout=600.0)
    asyncio.run(serving.run_benchmark(dict(common, num_prompts=4, output_len=16, concurrency=4, seed=99,
                                           label=f"{shape} warm-up")))
    pid = router_pid(launcher_pid) if launcher_pid else None
    cpu0 = cpu_seconds(pid)
    load = asyncio.run(serving.run_benchmark(dict(common, num_prompts=a.num_prompts, output_len=a.output_len,
                                                  concurrency=a.concurrency, label=shape, json=a.json)))
    cpu1 = cpu_seconds(pid)
    single = asyncio.run(serving.run_benchmark(dict(common, num_prompts=a.single_prompts, seed=1,
                                                    output_len=a.single_output_len, concurrency=1,
                                                    label=f"{shape} single", json=a.json)))
    s = load["summary"]
    router_cpu = None
    if cpu0 is not None and cpu1 is not None and s["output_throughput"] > 0:
        share = (cpu1 - cpu0) / s["duration_s"]  # cores
        router_cpu = 100 * share / (s["output_throughput"] / 100)  # % of a core per 100 tok/s
    return {"shape": shape, "load": load, "single": single, "router_cpu_pct_per_100": router_cpu}


def table(rows: list[dict], a: argparse.Namespace) -> str:
    vllm = next((r["load"]["summary"]["output_throughput"] for r in rows if r["shape"] == "vllm"), None)

    def f(v, nd=0):
        return "-" if v is None else f"{v:.{nd}f}"

    head = (f"| server | {a.concurrency} in flight: out tok/s | × vLLM | TTFT p50 / p99 ms | TPOT p50 ms | "
            f"1 in flight: TTFT p50 ms | TPOT p50 ms | router CPU % of a core per 100 tok/s |")
    lines = [head, "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        s, one = r["load"]["summary"], r["single"]["summary"]
        ratio = f"{s['output_throughput'] / vllm:.2f}" if vllm else "-"
        lines.append(f"| {r['shape']} | {f(s['output_throughput'], 1)} | {ratio} | {f(s['ttft_ms']['p50'])} / "
                     f"{f(s['ttft_ms']['p99'])} | {f(s['tpot_ms']['p50'], 1)} | {f(one['ttft_ms']['p50'])} | "
                     f"{f(one['tpot_ms']['p50'], 1)} | {f(r['router_cpu_pct_per_100'], 2)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, name in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        for r in rows:
            ms = sorted(q[key] * 1000 for q in r["load"]["requests"] if q.get(key) is not None and q["ok"])
            if ms:
                ax.step(ms, [(i + 1) / len(ms) for i in range(len(ms))], where="post", label=r["shape"])
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="vllm,1p1d,mixed", help="comma-separated: vllm, 1p1d, mixed")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--vllm-venv", default=None, help="the peer's venv (benchmarks skip vllm without it)")
    ap.add_argument("--launch-args", default="", help="more deploy/launch.py flags for the nano-pd shapes")
    ap.add_argument("--port", type=int, default=8300)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--single-prompts", type=int, default=8)
    ap.add_argument("--single-output-len", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, metavar="PNG")
    ap.add_argument("--log-dir", default="/tmp/nano-pd-serving-shapes")
    a = ap.parse_args(argv)
    shapes = [s for s in a.shapes.split(",") if s]
    if "vllm" in shapes and not a.vllm_venv:
        print("no --vllm-venv: skipping vllm", file=sys.stderr)
        shapes.remove("vllm")
    rows = []
    for shape in shapes:
        proc = start(shape, a, a.log_dir)
        try:
            wait_healthy(f"http://127.0.0.1:{a.port}/health", proc, 400 if shape == "vllm" else 300)
            rows.append(bench(shape, a, f"http://127.0.0.1:{a.port}/v1", None if shape == "vllm" else proc.pid))
        except (RuntimeError, TimeoutError) as e:
            print(f"[{shape}] {e}; logs in {a.log_dir}", file=sys.stderr)
        finally:
            stop(proc)
        print(table(rows, a), file=sys.stderr, flush=True)
    print(table(rows, a))
    if a.plot and rows:
        plot(rows, a.plot, f"{a.num_prompts} requests, {a.concurrency} in flight, ~{a.input_len} words in / "
                           f"{a.output_len} out, {a.dtype}")
    return 0 if len(rows) == len(shapes) else 1


if __name__ == "__main__":
    sys.exit(main())
