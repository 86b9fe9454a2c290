"""The folder rules (README "Layout"): which planes may import which, that the torch-free planes really start without
torch, and that no module-level import circle exists anywhere in the project."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.cluster_harness import free_port
from tests.support.tiny_models import TinyConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "kv_transfer", "prefill_worker", "decode_worker", "router", "deploy")
# `import torch` fails in a child started with this prelude; transformers then sees no torch either
NO_TORCH = "import sys; sys.modules['torch'] = None; "


def root_module(name: str) -> bool:
    """common itself or a module file directly in it (not a subpackage such as common.engine)."""
    return name == "common" or (name.count(".") == 1 and name.startswith("common.")
                                and (ROOT / "common" / (name.split(".")[1] + ".py")).is_file())


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """Project modules that `module` imports (resolved to the deepest module that exists)."""
    known = project_modules()
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also imports inside a module-level try/if, which run at import time too
        nodes = [n for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    found = set()
    for node in nodes:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = module.split(".")[:len(module.split(".")) - node.level + (path.name == "__init__.py")]
            names = [".".join(base + ([node.module] if node.module else []))]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def all_imports(top_level_only: bool) -> dict[str, set[str]]:
    return {m: imports(p, m, top_level_only) for m, p in project_modules().items()}


def test_dependencies_point_one_way():
    graph = all_imports(top_level_only=False)  # lazy imports inside functions count too
    broken = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            plane, target_plane = module.split(".")[0], target.split(".")[0]
            if module.startswith("common") and target_plane in ("router", "prefill_worker", "decode_worker",
                                                                   "deploy", "kv_transfer"):
                broken.append(f"{module} -> {target}: common imports nothing above it")
            if module.startswith("common.cluster") and not (target.startswith("common.cluster")
                                                             or root_module(target)):
                broken.append(f"{module} -> {target}: common.cluster imports only common's root modules")
            if plane == "router" and target_plane == "common" and not (target == "common.cluster.protocol"
                                                                        or root_module(target)):
                broken.append(f"{module} -> {target}: the router imports only common's root and the protocol")
            if plane == "router" and target_plane in ("prefill_worker", "decode_worker", "deploy", "kv_transfer"):
                broken.append(f"{module} -> {target}: the router talks to workers over the wire only")
            if plane == "kv_transfer" and target_plane in ("prefill_worker", "decode_worker", "router", "deploy"):
                broken.append(f"{module} -> {target}: kv_transfer sits below the workers")
            if plane == "deploy" and target_plane != "deploy" and not (root_module(target)
                                                                         or target.startswith("common.cluster")):
                broken.append(f"{module} -> {target}: deploy only starts processes")
            if module.startswith(("common.models", "common.layers")) and target.startswith(("common.engine",
                                                                                             "common.cluster")):
                broken.append(f"{module} -> {target}: models and layers sit below the engine")
    assert not broken, "\n".join(broken)


def test_no_import_circle():
    graph = all_imports(top_level_only=True)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]):
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            # importing a submodule first imports its packages: a package's own submodules are not a circle
            if module.startswith(target + "."):
                continue
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_every_folder_says_what_it_owns():
    for init in [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")]:
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init.relative_to(ROOT)} has no docstring"


def test_control_plane_imports_without_torch():
    # not common.grammar: xgrammar itself imports torch, so the router loads it (lazily) for its first request
    # with an output constraint
    code = NO_TORCH + ("import common, common.names, common.block_hash, common.sampling_params, "
                       "common.cluster.protocol, common.cluster.runtime, common.cluster.flags, router, "
                       "router.__main__, deploy.launch; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.fixture(scope="module")
def tiny_folder(tiny_model_factory):
    return str(tiny_model_factory(TinyConfig()))


def test_router_serves_without_torch(tiny_folder, tmp_path):
    """The router process starts, answers /health (503: no workers yet) and /v1/models, all without torch."""
    port = free_port()
    code = NO_TORCH + "import runpy; runpy.run_module('router', run_name='__main__')"
    log = open(tmp_path / "router.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", code, "--model", tiny_folder, "--port", str(port),
                             "--control-port", str(free_port())], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline, health = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                health = 200
            except urllib.error.HTTPError as e:
                health = e.code
            except OSError:
                time.sleep(0.2)
                continue
            break
        assert health == 503, (tmp_path / "router.log").read_text()[-3000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            assert json.load(r)["object"] == "list"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
