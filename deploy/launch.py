"""Start a nano-pd cluster on this host: one router plus N prefill, K decode and M mixed workers, supervised.

    python -m deploy.launch                                   # 1 prefill + 1 decode, http://127.0.0.1:8000/v1
    python -m deploy.launch --prefill-workers 2 --decode-workers 2 --threads-per-worker 4
    python -m deploy.launch --mixed-workers 1 --dtype bfloat16  # one worker that prefills and decodes
    python -m deploy.launch --config deploy/local-1p1d.toml --port 9000
    python -m deploy.launch --no-router --router 10.0.0.1:8100 --host 10.0.0.2   # join a router on another host
    python -m deploy.launch --dry-run                         # print the command lines only

Every child runs in its own process group, so Ctrl-C reaches only this script, which then stops the children in
order (SIGTERM, 10 s grace, SIGKILL). A child that exits while we are not shutting down is restarted with
exponential backoff; one that keeps crashing is given up on while the others keep serving.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from typing import Callable

from common.cluster.flags import KV_TRANSPORTS, add_engine_args, engine_argv, worker_module
from common.names import DEFAULT_MODEL, is_default_model, served_model_name
from deploy.spec import ClusterSpecFile, Spec, load_spec_file, parse_role_args, resolve
from deploy.supervisor import Supervisor, install_signal_handlers


# ---------------------------------------------------------------------------------------------------------------
# Cluster spec and command lines
# ---------------------------------------------------------------------------------------------------------------

def served_model(model: str, worker_dtypes: set[str] = frozenset({"auto"}),
                 convert: bool = True) -> tuple[str, str, str]:
    """(--model for the router, --model for the workers, the name clients use).

    The default model and .gguf files are converted here, once, into cached HF folders: the float32 one the router
    reads its tokenizer and template from, and one per dtype the workers load (worker_dtypes), so no two processes
    race to convert the same file at start-up. The workers are still given the .gguf file: an engine that knows
    its weights came from one keeps the file's quantized blocks (`--quantization auto`), reading the float
    weights of the cached folder for the rest. With convert=False (a dry run) the name is passed through; every
    process would resolve it the same way itself.
    """
    name = served_model_name(model)
    if not convert or not (is_default_model(model) or model.endswith(".gguf")):
        return model, model, name
    from common import names  # the module, so tests can stand in for the conversion

    for dtype in worker_dtypes - {"auto", "float32"}:
        names.resolve_model(model, dtype)
    return names.resolve_model(model), model, name


def _local_address(host: str) -> str:
    """Where a process on this host reaches a server bound to `host` (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def build_commands(spec: Spec, router_model: str, worker_model: str, served_name: str, router: str | None,
                   start_router: bool = True) -> list[tuple[str, list[str]]]:
    """(name, argv) of every process to start, router first.

    Workers get the served name too: they would otherwise name the model after the path they were given."""
    commands = []
    if start_router:
        commands.append(("router", [sys.executable, "-m", "router", "--model", router_model,
                                    "--served-model-name", served_name, "--host", spec.host, "--port", str(spec.port),
                                    "--control-port", str(spec.control_port)]))
    for role, part in spec.roles():
        for i in range(part.workers):
            commands.append(worker_command(spec, role, i, worker_model, served_name, router))
    return commands


def worker_command(spec: Spec, role: str, index: int, worker_model: str, served_name: str,
                   router: str) -> tuple[str, list[str]]:
    """(name, argv) of the role's index-th worker."""
    part, name = getattr(spec, role), f"{role}-{index}"
    module = [worker_module(role), *(["--role", role] if role == "mixed" else [])]
    return name, [sys.executable, "-m", *module, "--router", router, "--model", worker_model,
                  "--served-model-name", served_name, "--host", spec.host, "--kv-transport", spec.kv_transport,
                  "--threads", str(part.threads), "--name", name, *part.args]


class Autoscaler:
    """--autoscale: polls the router's /debug/desired-replicas (router.planner) every `interval` seconds and
    brings each scaled role's local workers to the desired count: new ones started under the next free names,
    surplus ones (the newest first) retired by SIGTERM, which drains them (no restart: Supervisor.retire). The
    router counts only registered workers that take work, so a worker still loading is not started twice."""

    SCALED_ROLES = ("prefill", "decode")

    def __init__(self, url: str, new_worker: Callable[[str, int], tuple[str, list[str]]], interval: float):
        self.url, self.new_worker, self.interval = url, new_worker, interval
        self.next_poll = 0.0

    @staticmethod
    def local_workers(supervisor: Supervisor, role: str) -> list[str]:
        """The role's workers not being retired, oldest (lowest index) first."""
        pattern = re.compile(rf"{role}-(\d+)")
        names = [n for n in supervisor.names() if pattern.fullmatch(n) and not supervisor.retiring(n)]
        return sorted(names, key=lambda n: int(n.rsplit("-", 1)[1]))

    def step(self, supervisor: Supervisor) -> bool:
        """Poll when due and act on the answer; always False (it is run()'s until-hook, never the end)."""
        if time.monotonic() < self.next_poll:
            return False
        self.next_poll = time.monotonic() + self.interval
        # our own counts, loading workers included: the planner's current replicas (router.planner)
        current = urllib.parse.urlencode({f"current_{role}": len(self.local_workers(supervisor, role))
                                          for role in self.SCALED_ROLES})
        try:
            with urllib.request.urlopen(f"{self.url}&{current}", timeout=5) as response:
                roles = json.load(response)["roles"]
        except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
            print(f"launch: autoscaler: {self.url} did not answer ({e}); trying again in {self.interval:g} s",
                  file=sys.stderr, flush=True)
            return False
        for role in self.SCALED_ROLES:
            if role in roles:
                self.scale(supervisor, role, int(roles[role]["desired"]))
        return False

    def scale(self, supervisor: Supervisor, role: str, desired: int) -> None:
        workers = self.local_workers(supervisor, role)
        if desired > len(workers):
            taken = {int(n.rsplit("-", 1)[1]) for n in supervisor.names() if n.startswith(f"{role}-")}
            free = (i for i in range(len(taken) + desired) if i not in taken)
            for _ in range(desired - len(workers)):
                supervisor.add(*self.new_worker(role, next(free)))
        for name in reversed(workers[desired:]):
            supervisor.retire(name)


def planner_query(args: argparse.Namespace) -> str:
    """The /debug/desired-replicas query string of the launcher's autoscale flags."""
    return urllib.parse.urlencode({
        "min_prefill": args.min_prefill_workers, "max_prefill": args.max_prefill_workers,
        "min_decode": args.min_decode_workers, "max_decode": args.max_decode_workers,
        "target_prefill_backlog_s": args.target_prefill_backlog, "target_kv_usage": args.target_kv_usage,
        "target_requests_per_worker": args.target_requests_per_worker,
        "scale_down_window_s": args.scale_down_window})


def _health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False  # not up yet, or up but without a live prefill and decode worker (503)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

LAUNCHER_OWN = ("model", "threads")  # engine options the launcher sets itself (--model, --threads-per-worker)


def _parser() -> argparse.ArgumentParser:
    # every default is None so that an explicit flag can be told apart from "not given" and win over the file
    p = argparse.ArgumentParser(prog="python -m deploy.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="SPEC.toml",
                   help="cluster spec (same keys as these flags; flags given here override it)")
    p.add_argument("--model", help=f"HF folder, .gguf file or {DEFAULT_MODEL!r} (default)")
    p.add_argument("--prefill-workers", type=int, metavar="N", help="default 1 (0 with mixed workers)")
    p.add_argument("--decode-workers", type=int, metavar="K", help="default 1 (0 with mixed workers)")
    p.add_argument("--mixed-workers", type=int, metavar="M",
                   help="workers that prefill and decode their own requests, no hand-off (default 0)")
    p.add_argument("--host", help="address the router binds and workers advertise (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="router HTTP port (default 8000)")
    p.add_argument("--control-port", type=int, help="router ZeroMQ control port (default port + 100)")
    p.add_argument("--kv-transport", choices=KV_TRANSPORTS, help="default auto")
    p.add_argument("--threads-per-worker", type=int, metavar="T",
                   help="torch threads per worker process (default: decode and mixed workers split the cores, "
                        "prefill workers split them again among all worker processes; a worker counts its "
                        "--tensor-parallel-size ranks; see deploy/spec.py default_threads)")
    # argparse reads a lone "--flag" as an option of ours, so such a value needs the = form: --decode-args=--flag
    p.add_argument("--prefill-args", metavar='"..."',
                   help='extra flags for every prefill worker (one flag alone: --prefill-args="--flag")')
    p.add_argument("--decode-args", metavar='"..."', help="extra flags for every decode worker")
    p.add_argument("--mixed-args", metavar='"..."', help="extra flags for every mixed worker")
    add_engine_args(p.add_argument_group(
        "engine options for every worker (a role's --*-args come after them, and win)"),
        passthrough=True, skip=LAUNCHER_OWN)
    p.add_argument("--no-router", action="store_true",
                   help="start only workers, joining the router given by --router (how a second host joins)")
    p.add_argument("--router", metavar="HOST:PORT", help="control endpoint of a router on another host")
    p.add_argument("--log-dir", help="write each process's output to LOG_DIR/NAME.log instead of stdout")
    p.add_argument("--wait-ready", type=float, default=600, metavar="S",
                   help="wait up to S seconds for the router's /health (default 600; 0: do not wait); "
                        "exit 1 if not ready")
    scale = p.add_argument_group(
        "autoscaling (router.planner: HPA's rule on the router's pool signals; README \"Autoscaling\")")
    scale.add_argument("--autoscale", action="store_true",
                       help="add and drain local prefill and decode workers as the router's "
                            "/debug/desired-replicas asks, between the bounds below")
    for role in Autoscaler.SCALED_ROLES:
        scale.add_argument(f"--min-{role}-workers", type=int, default=1, metavar="N", help="default 1")
        scale.add_argument(f"--max-{role}-workers", type=int, default=4, metavar="N", help="default 4")
    scale.add_argument("--autoscale-interval", type=float, default=5.0, metavar="S",
                       help="seconds between polls of the planner (default 5)")
    scale.add_argument("--scale-down-window", type=float, default=300.0, metavar="S",
                       help="a pool shrinks only to the largest count the planner wanted over the last S seconds "
                            "(HPA's scale-down stabilization window; default 300)")
    scale.add_argument("--target-prefill-backlog", type=float, default=2.0, metavar="S",
                       help="seconds of queued prompt tokens per prefill pool (default 2)")
    scale.add_argument("--target-kv-usage", type=float, default=0.7, metavar="R",
                       help="KV-block use ratio of the decode pool (default 0.7)")
    scale.add_argument("--target-requests-per-worker", type=float, default=16.0, metavar="N",
                       help="running + waiting requests per decode worker (default 16)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command lines and exit (the default model and .gguf files appear by name, "
                        "not yet converted)")
    return p


def resolve_spec(args: argparse.Namespace) -> Spec:
    """Built-in defaults, then the --config file, then the flags given explicitly."""
    values = load_spec_file(args.config) if args.config else ClusterSpecFile()
    return resolve(values.overridden({**vars(args), "args": engine_argv(args, skip=LAUNCHER_OWN) or None}))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        spec = resolve_spec(args)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    router = _router_endpoint(parser, args, spec)
    if args.autoscale:
        _autoscale_bounds(parser, args, spec)
    try:
        dtypes = {parse_role_args(role, part.args).dtype for role, part in spec.roles() if part.workers}
        router_model, worker_model, name = served_model(spec.model, dtypes, convert=not args.dry_run)
    except Exception as e:  # the model cannot be resolved: say so before starting anything
        print(f"launch: cannot resolve model {spec.model!r}: {e}", file=sys.stderr)
        return 2
    commands = build_commands(spec, router_model, worker_model, name, router, start_router=not args.no_router)
    if args.dry_run:
        for proc_name, cmd in commands:
            print(f"{shlex.join(cmd)}  # {proc_name}")
        return 0
    autoscaler = None
    if args.autoscale:
        url = f"http://{_local_address(spec.host)}:{spec.port}/debug/desired-replicas?{planner_query(args)}"
        autoscaler = Autoscaler(url, lambda role, i: worker_command(spec, role, i, worker_model, name, router),
                                args.autoscale_interval)
    return _supervise(commands, spec, args, router, autoscaler)


def _autoscale_bounds(parser: argparse.ArgumentParser, args: argparse.Namespace, spec: Spec) -> None:
    """Checks the autoscale flags and starts each scaled role inside its bounds."""
    if args.no_router:
        parser.error("--autoscale polls the router started here; it cannot be used with --no-router")
    if args.autoscale_interval <= 0:
        parser.error("--autoscale-interval must be positive")
    for role in Autoscaler.SCALED_ROLES:
        low, high = getattr(args, f"min_{role}_workers"), getattr(args, f"max_{role}_workers")
        if not 0 <= low <= high:
            parser.error(f"--min-{role}-workers ({low}) and --max-{role}-workers ({high}) need 0 <= min <= max")
        part = getattr(spec, role)
        part.workers = min(max(part.workers, low), high)


def _router_endpoint(parser: argparse.ArgumentParser, args: argparse.Namespace, spec: Spec) -> str:
    """The control endpoint the workers join: the router started here, or with --no-router the one --router names."""
    if args.no_router:
        if not args.router:
            parser.error("--no-router needs --router HOST:PORT (the control endpoint of the running router)")
        if not any(part.workers for _, part in spec.roles()):
            parser.error("--no-router with no workers would start nothing")
        return args.router
    if args.router:
        parser.error("--router names a router on another host; use it together with --no-router")
    return f"{_local_address(spec.host)}:{spec.control_port}"


def _supervise(commands: list[tuple[str, list[str]]], spec: Spec, args: argparse.Namespace, router: str,
               autoscaler: Autoscaler | None = None) -> int:
    """Start the processes and keep them running until a signal or until every one was given up on; the exit code."""
    supervisor = Supervisor(log_dir=args.log_dir)
    install_signal_handlers(supervisor)
    for proc_name, cmd in commands:
        supervisor.add(proc_name, cmd)
    with supervisor:  # children are stopped however this block is left, an exception included
        if not args.no_router and args.wait_ready > 0:
            failed = _wait_ready(supervisor, spec, args.wait_ready)
            if failed is not None:
                return failed
        elif args.no_router:
            print(f"nano-pd workers started ({spec.shape()}), joining the router at {router}", flush=True)
        supervisor.run(until=(lambda: autoscaler.step(supervisor)) if autoscaler is not None else None)
        if supervisor.all_given_up and not supervisor.stop_requested:
            print("launch: every process was given up on; exiting", file=sys.stderr, flush=True)
            return 1
    return 0


def _wait_ready(supervisor: Supervisor, spec: Spec, timeout: float) -> int | None:
    """Supervise until the router's /health answers 200 (None), or the exit code when it will not."""
    base = f"http://{_local_address(spec.host)}:{spec.port}"
    next_check = 0.0

    def ready() -> bool:
        nonlocal next_check
        if supervisor.given_up("router"):
            return True  # nothing left to wait for; reported below
        if time.monotonic() < next_check:
            return False
        next_check = time.monotonic() + 1.0
        return _health_ok(f"{base}/health")

    answered = supervisor.run(until=ready, timeout=timeout)
    if supervisor.stop_requested:
        return 0
    if supervisor.given_up("router"):
        # no router, no service: waiting out the timeout would only hide it
        print("launch: the router keeps crashing; shutting down", file=sys.stderr, flush=True)
        return 1
    if not answered:
        print(f"launch: {base}/health did not answer 200 within {timeout:g} s; shutting down",
              file=sys.stderr, flush=True)
        return 1
    print(f"nano-pd ready: {base}/v1 ({spec.shape()})", flush=True)
    return None


if __name__ == "__main__":
    sys.exit(main())
