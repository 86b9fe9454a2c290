"""Where nano-pd keeps what it builds once and reuses across processes and restarts: GGUF files converted to HF
folders, the C++ kernels and the compiled decode steps. $NANO_PD_CACHE moves it (default ~/.cache/nano-pd)."""
import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("NANO_PD_CACHE") or os.path.join("~", ".cache", "nano-pd")))
