#!/usr/bin/env bash
# Run here, before benchmarks/gpu_check.sh goes to a GPU machine: downloads the wheels that machine's image lacks
# (it runs its own python3, CPython 3.12 with PyTorch, Triton and transformers, and reaches no registry) into
# .gpu_wheels/ (git-ignored), at the versions this checkout's .venv runs, so the check runs what the tests ran.
# The device tool carries at most 64 MiB of working tree, so optional wheels (NIXL) come only if they fit.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu_wheels
LIMIT_BYTES=$((56 * 1024 * 1024))  # leaves ~8 MiB of the 64 for the tracked tree itself
NEEDED="pyzmq msgspec fastapi starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection
        uvicorn gguf xgrammar"
OPTIONAL="nixl nixl-cu12"  # the zmq transport serves without them
PY=${PY:-.venv/bin/python}

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

download() {  # name==version into $2, CPython 3.12 manylinux x86_64 (pure-Python wheels match any platform)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$2" "$1" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

rm -rf "$DEST" && mkdir -p "$DEST"
start=$(date +%s)
for name in $NEEDED; do
    download "$name==$(version "$name")" "$DEST"
done
tmp=$(mktemp -d)  # the optional wheels come all together or not at all (nixl is nothing without nixl-cu12)
for name in $OPTIONAL; do
    download "$name==$(version "$name")" "$tmp"
done
size=$(du -cb "$DEST" "$tmp" | tail -1 | cut -f1)
if [ "$size" -le "$LIMIT_BYTES" ]; then
    mv "$tmp"/*.whl "$DEST"/
else
    echo "left out $OPTIONAL: $(du -sh "$tmp" | cut -f1) would take the wheels past $((LIMIT_BYTES >> 20)) MiB"
fi
rm -rf "$tmp"
echo "$(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST ($(($(date +%s) - start)) s)"
