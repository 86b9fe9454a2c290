#!/usr/bin/env bash
# The one command for a lent GPU machine (see benchmarks/gpu_check.py for the steps). That machine runs its image's
# own python3 and reaches no registry: run benchmarks/gpu_wheels.sh here first, and carry .gpu_wheels with the
# tree; they are installed into a folder of their own on PYTHONPATH, so the image's packages stay as they are.
# Arguments go to gpu_check.py (--dry-run, --budget S, --out DIR; $OUT when set). The whole run stays under
# 5 minutes: gpu_check.py spends --budget (285 s) on its steps, and this timeout backs it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if compgen -G ".gpu_wheels/*.whl" >/dev/null; then
    SITE=/tmp/nano_pd_gpu_site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .gpu_wheels/*.whl || echo "gpu_check: installing .gpu_wheels failed; the steps that need them will say so"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_check: no .gpu_wheels/ (benchmarks/gpu_wheels.sh makes it); using the packages installed"
fi
export PYTHONUNBUFFERED=1
timeout 295 "$PY" benchmarks/gpu_check.py "$@"
