"""benchmarks/gpu_check.py's plumbing on a machine without CUDA (the real check needs a GPU machine): the steps
that need one are skipped with a reason, the one that does not (the tiny model) runs, the table is written, and
--dry-run names every step's command without running it."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = ["tiny-model", "cuda", "triton-kernels", "cuda-graph-test", "parity-fp32", "parity-bf16",
         "decode-cuda-graph", "cluster-1p1d", "offline-throughput", "decode-compile"]


def run_check(out: Path, *flags: str) -> dict[str, list[str]]:
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.strip("| ").split(" | ") for line in (out / "table.md").read_text().splitlines()[2:]
            if line.startswith("|")]
    return {row[0]: row[1:] for row in rows}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the steps run for real (make gpu-check)")
def test_without_cuda_every_gpu_step_skips(tmp_path):
    table = run_check(tmp_path)
    assert list(table) == STEPS
    assert table["tiny-model"][0] == "ok"
    for name in STEPS[1:]:
        assert table[name][0] == "skip" and table[name][2] == "no CUDA", (name, table[name])


def test_dry_run_lists_every_command(tmp_path):
    table = run_check(tmp_path, "--dry-run")
    assert list(table) == STEPS and all(status == "dry-run" for status, *_ in table.values())
    assert "tests/layers/triton_kernel_cases.py" in table["triton-kernels"][2]
    assert "--compiled-mode cuda_graph" in table["decode-cuda-graph"][2]
