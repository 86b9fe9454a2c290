"""The GPU check: what a lent GPU machine should run, in one command (benchmarks/gpu_check.sh runs this after it
installs the wheels benchmarks/gpu_wheels.sh fetched; the machine runs its image's own python3).

Every step runs the project's own tests and benchmarks in a process of its own, in order, under its own timeout
and within the whole run's budget (--budget); a step that fails or times out is reported and the next one runs.
The result is one table (table.md: step, status, seconds, the output's last line, then the benchmarks' tables) and
one log of every step's output (steps.log), in --out ($OUT when set, else gpu_check_out/); the cluster's processes
log under cluster/ there. Without CUDA the GPU steps report "skip: no CUDA", so the plumbing runs on a CPU too;
--dry-run lists the commands without running them.

    bash benchmarks/gpu_wheels.sh                 # here, once: the image's missing wheels into .gpu_wheels/
    bash benchmarks/gpu_check.sh [--dry-run]      # there (the device tool carries .gpu_wheels)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
PYTEST = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
DECODE = [PY, "benchmarks/decode.py", "--device", "cuda", "--dtype", "bfloat16", "--batch-sizes", "1", "8", "64",
          "--max-tokens", "64"]
# the parity tests' scheduling modes that reach both kernels hardest: prefill chunks over cached context, prefix hits
MODES = ("chunked", "prefix")


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout: int  # seconds, at most: the budget left may cut it
    needs_cuda: bool = True
    skip_reason: str | None = None  # known before running: this step cannot run here


def steps(tiny: str) -> list[Step]:
    """The check, most telling first: a run cut short by the budget still has the kernels and parity."""
    offline_has_device = "--device" in (REPO / "benchmarks" / "offline_throughput.py").read_text()
    return [
        Step("tiny-model", [PY, __file__, "--run", "tiny-model", tiny], 60, needs_cuda=False),
        Step("cuda", [PY, "-c", "import torch, triton; print(torch.__version__, 'triton', triton.__version__, "
                                "torch.cuda.get_device_name(), 'sm', torch.cuda.get_device_capability())"], 30),
        Step("triton-kernels", PYTEST + ["tests/layers/triton_kernel_cases.py"], 90),
        Step("cuda-graph-test", PYTEST + ["tests/engine/test_compiled_step.py", "-k", "cuda_graph"], 60),
        Step("parity-fp32", [PY, __file__, "--run", "parity", "float32"], 100),
        Step("parity-bf16", [PY, __file__, "--run", "parity", "bfloat16"], 45),
        Step("decode-cuda-graph", DECODE + ["--model", tiny, "--compiled-mode", "cuda_graph"], 60),
        Step("cluster-1p1d", [PY, __file__, "--run", "cluster", tiny], 75),
        Step("offline-throughput", [PY, "benchmarks/offline_throughput.py", "--models", tiny, "--no-hf", "--device",
                                    "cuda", "--decode-modes", "eager", "--repeat", "1"], 60,
             skip_reason=None if offline_has_device else "offline_throughput.py takes no --device yet"),
        Step("decode-compile", DECODE + ["--model", tiny, "--compiled-mode", "compile"], 90),
    ]


def run_step(step: Step, timeout: int, log) -> tuple[str, str, str]:
    """(status, last output line, the output's markdown table lines)."""
    log.write(f"\n===== {step.name}: {' '.join(step.argv)} (timeout {timeout} s)\n")
    log.flush()
    # a session of its own, so a timeout ends the step's children too (the cluster's router and workers)
    proc = subprocess.Popen(step.argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"FAIL (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        status = f"TIMEOUT ({timeout} s)"
    log.write(stdout + stderr)
    # the last line a step prints is its verdict (pytest's count, a benchmark's summary); stderr only where stdout
    # has nothing (progress bars and log lines go there)
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()] or [
        ln.strip() for ln in stderr.splitlines() if ln.strip()]
    tables = "\n".join(ln for ln in stdout.splitlines() if ln.startswith("|")) if status == "ok" else ""
    return status, (lines[-1] if lines else "")[:160].replace("|", "/"), tables


def check(out: Path, budget: float, dry_run: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.gettempdir()) / "nano_pd_gpu_check"  # the tiny model: not under out, whose files travel
    os.environ["NANO_PD_GPU_CHECK_OUT"] = str(out)  # the cluster step's logs
    if not dry_run:
        import torch

    cuda = not dry_run and torch.cuda.is_available()
    deadline = time.monotonic() + budget
    rows, tables, failed = [], [], 0
    with open(out / "steps.log", "w") as log:
        for step in steps(str(work / "tiny")):
            left = int(deadline - time.monotonic()) - 5
            start = time.monotonic()
            if dry_run:
                status, note, table = "dry-run", step.skip_reason or " ".join(step.argv), ""
            elif step.needs_cuda and not cuda:
                status, note, table = "skip", "no CUDA", ""
            elif step.skip_reason:
                status, note, table = "skip", step.skip_reason, ""
            elif left < 10:
                status, note, table = "skip", "out of time (--budget)", ""
            else:
                status, note, table = run_step(step, min(step.timeout, left), log)
            failed += status.startswith(("FAIL", "TIMEOUT"))
            rows.append(f"| {step.name} | {status} | {time.monotonic() - start:.1f} | {note} |")
            if table:
                tables.append(f"\n{step.name}:\n\n{table}")
            print(rows[-1], flush=True)
    header = ["| step | status | s | last line |", "|---|---|---:|---|"]
    (out / "table.md").write_text("\n".join(header + rows) + "\n" + "\n".join(tables) + "\n")
    print("\n".join(header + rows) + "\n" + "\n".join(tables))
    print(f"table: {out / 'table.md'}, logs: {out / 'steps.log'}")
    return 1 if failed else 0


# --- steps that are not already a test or a benchmark of their own ----------------------------------------------

def make_tiny_model(folder: str):
    from tests.support.tiny_models import SERVING_TINY, make_tiny_model_from_config

    print(make_tiny_model_from_config(Path(folder), SERVING_TINY))


def parity(dtype: str) -> int:
    """Greedy tokens on CUDA against transformers (float32, on the CPU) for a tiny Llama, Qwen3 and Qwen3-MoE, decoded
    eagerly, so every step attends through the Triton kernels (the CUDA-graph test covers graphs). fp32: the parity
    tests' own comparison (ties accepted as there) with chunked prefill and with prefix hits; bf16 cannot be exact
    against fp32, so it reports how many leading tokens agree."""
    from tests.models import test_models_moe as moe
    from tests.models import test_parity_tiny as tiny
    from tests.support.hf_reference import greedy_params, hf_greedy_batch, make_llm, run_mode_and_compare
    from tests.support.tiny_models import make_tiny_model_from_config

    cases = [(tiny.CONFIGS[1], tiny.make_prompts(tiny.VOCAB, 2), tiny.make_prefix_prompts(tiny.VOCAB, 2),
              tiny.MAX_NEW),
             (tiny.CONFIGS[6], tiny.make_prompts(tiny.VOCAB, 7), tiny.make_prefix_prompts(tiny.VOCAB, 7),
              tiny.MAX_NEW),
             (moe.QWEN3_MOE, moe._prompts(moe.QWEN3_MOE.seed), moe._prefix_prompts(moe.QWEN3_MOE.seed), moe.MAX_NEW)]
    failures, agreed, total = 0, 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for cfg, prompts, prefix_prompts, max_new in cases:
            folder = make_tiny_model_from_config(Path(tmp) / cfg.id, cfg)
            if dtype == "float32":
                for mode in MODES:
                    try:
                        _, ties = run_mode_and_compare(folder, mode, prompts, prefix_prompts, max_new,
                                                       check_logprobs_atol=2e-3, device="cuda", decode_mode="eager")
                        print(f"{cfg.id} {mode}: equal to transformers ({len(ties)} accepted ties)")
                    except AssertionError as e:
                        failures += 1
                        print(f"{cfg.id} {mode}: FAILED\n{e}")
                continue
            llm = make_llm(folder, dtype=dtype, device="cuda", decode_mode="eager")
            outs = llm.generate(prompts, greedy_params(max_new), use_tqdm=False)
            llm.close()
            for out, (ref_ids, _) in zip(outs, hf_greedy_batch(folder, prompts, max_new)):
                same = next((i for i, (a, b) in enumerate(zip(out["token_ids"], ref_ids)) if a != b), len(ref_ids))
                agreed, total = agreed + same, total + len(ref_ids)
            print(f"{cfg.id}: leading greedy tokens equal to float32 transformers so far {agreed}/{total}")
    if dtype != "float32":
        print(f"bf16 on CUDA vs float32 transformers: {agreed}/{total} leading tokens agree")
    else:
        runs = len(MODES) * len(cases)
        print(f"fp32 on CUDA: {runs - failures}/{runs} runs equal to transformers")
    return 1 if failures else 0


def cluster(model: str) -> int:
    """A 1P1D cluster on the GPU (zmq transport) started by the launcher, driven by benchmarks/serving.py."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = Path(os.environ.get("NANO_PD_GPU_CHECK_OUT", tempfile.mkdtemp())) / "cluster"
    launcher = subprocess.Popen(
        [PY, "-m", "deploy.launch", "--model", model, "--prefill-workers", "1", "--decode-workers", "1",
         "--kv-transport", "zmq", "--device", "cuda", "--dtype", "bfloat16", "--port", str(port), "--log-dir",
         str(logs), "--wait-ready", "50"], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in launcher.stdout:
            print(line, end="")
            if line.startswith("nano-pd ready"):
                break
        else:
            print("the cluster never became ready (see cluster/*.log)")
            return 1
        record = Path(tempfile.mkdtemp()) / "serving.json"
        bench = subprocess.run([PY, "benchmarks/serving.py", "--base-url", f"http://127.0.0.1:{port}/v1",
                                "--num-prompts", "32", "--concurrency", "8", "--input-len", "64", "--output-len",
                                "32", "--json", str(record)], cwd=REPO, timeout=60)
        summary = json.loads(record.read_text())[-1]["summary"]
        print(f"1P1D on CUDA (zmq): {summary['completed']} completed, {summary['failed']} failed")
        return 0 if bench.returncode == 0 and summary["failed"] == 0 else 1
    finally:
        os.killpg(launcher.pid, signal.SIGTERM)  # the launcher stops its router and workers on SIGTERM
        try:
            launcher.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu_check_out"))
    ap.add_argument("--budget", type=float, default=285, help="seconds for the whole check")
    ap.add_argument("--dry-run", action="store_true", help="list the steps' commands, run none")
    ap.add_argument("--run", nargs=2, metavar=("STEP", "ARG"), help=argparse.SUPPRESS)  # one step, in its process
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    if a.run:
        name, arg = a.run
        return {"tiny-model": make_tiny_model, "parity": parity, "cluster": cluster}[name](arg) or 0
    return check(Path(a.out), a.budget, a.dry_run)


if __name__ == "__main__":
    sys.exit(main())
