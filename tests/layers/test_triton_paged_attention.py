"""The Triton paged-attention kernels' checks (triton_kernel_cases.py), run under Triton's interpreter in a
child process: TRITON_INTERPRET must be set before triton is imported, and this process may have imported it
already (inductor does), so the child starts with the variable set and no other test ever sees it."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("triton_kernel_cases.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (make setup does)")
def test_triton_kernels_under_the_interpreter():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=300)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    # every case ran and passed: none skipped (the module's guard) or deselected
    assert re.fullmatch(r"\d+ passed in [\d.]+s( \(.*\))?", summary), summary
