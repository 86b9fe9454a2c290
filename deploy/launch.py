"""Start a nano-pd cluster on this host: one router plus N prefill and K decode workers, supervised.

    python -m deploy.launch                                   # 1 prefill + 1 decode, http://127.0.0.1:8000/v1
    python -m deploy.launch --prefill-workers 2 --decode-workers 2 --threads-per-worker 4
    python -m deploy.launch --config deploy/local-1p1d.toml --port 9000
    python -m deploy.launch --no-router --router 10.0.0.1:8100 --host 10.0.0.2   # join a router on another host
    python -m deploy.launch --dry-run                         # print the command lines only

Every child runs in its own process group, so Ctrl-C reaches only this script, which then stops the children in
order (SIGTERM, 10 s grace, SIGKILL). A child that exits while we are not shutting down is restarted with
exponential backoff; one that keeps crashing is given up on while the others keep serving.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import os
import selectors
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, TextIO

from common.names import DEFAULT_MODEL, is_default_model, served_model_name

KV_TRANSPORTS = ("auto", "nixl", "zmq")


# ---------------------------------------------------------------------------------------------------------------
# Supervision
# ---------------------------------------------------------------------------------------------------------------

def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel send the child SIGTERM when we die, even by SIGKILL (Linux only).

    try/finally and signal handlers cover every way this script can stop except SIGKILL or a crash of the
    interpreter; this covers those, so children are never left orphaned.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        # the parent may already have died between fork and prctl; then no signal would ever come
        if os.getppid() != parent:
            os._exit(1)

    return preexec


@dataclass
class _Child:
    name: str
    cmd: list[str]
    env: dict[str, str] | None
    proc: subprocess.Popen | None = None  # None while waiting for a restart or after being given up on
    started_at: float = 0.0
    restart_at: float | None = None  # when a crashed child is due to start again
    backoff: float = 0.0
    crashes: collections.deque = field(default_factory=collections.deque)  # monotonic times of recent crashes
    given_up: bool = False
    starts: int = 0
    log: TextIO | None = None


class _Reader:
    """Turns one child's output pipe into whole lines with the child's prefix."""

    def __init__(self, fd: int, child: _Child):
        self.fd, self.child, self.partial = fd, child, b""


class Supervisor:
    """Runs child processes, restarts the ones that crash, and stops them all on shutdown.

    Single-threaded on purpose: output of every child is read and every restart happens inside `step()`, called
    from one loop (`run()` or the caller's own). Children are spawned only from that thread, which also keeps the
    parent-death signal meaningful (Linux ties it to the thread that forked).

        sup = Supervisor()
        sup.add("worker-0", ["python", "-m", "prefill_worker", ...])
        with sup:                  # starts the children; shuts them down however the block is left
            sup.run()              # until request_stop() (a signal handler) or every child was given up on
    """

    def __init__(self, *, out: TextIO | None = None, log_dir: str | None = None,
                 backoff_initial: float = 0.5, backoff_max: float = 10.0, healthy_after: float = 30.0,
                 max_crashes: int = 5, crash_window: float = 60.0, stop_timeout: float = 10.0):
        self.out = out if out is not None else sys.stdout
        self.log_dir = log_dir
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.healthy_after = healthy_after
        self.max_crashes, self.crash_window = max_crashes, crash_window
        self.stop_timeout = stop_timeout
        self._children: dict[str, _Child] = {}
        self._selector = selectors.DefaultSelector()
        self._stop_requested = False
        self._hurry = False  # a second stop request while stopping: skip the grace period
        self._shut_down = False
        self._preexec = _parent_death_signal()

    # -- setup ------------------------------------------------------------------------------------------------

    def add(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        """Register a child; the next `start()` (or entering the `with` block) starts it."""
        if name in self._children:
            raise ValueError(f"duplicate child name {name!r}")
        self._children[name] = _Child(name, list(cmd), env, backoff=self.backoff_initial)

    def start(self) -> None:
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
        for child in self._children.values():
            if child.proc is None and not child.given_up and child.restart_at is None:
                self._spawn(child)

    def __enter__(self) -> "Supervisor":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- state ------------------------------------------------------------------------------------------------

    def pids(self) -> dict[str, int | None]:
        """Current pid of each child; None while it waits for a restart or after it was given up on."""
        return {c.name: (c.proc.pid if c.proc is not None else None) for c in self._children.values()}

    def starts(self, name: str) -> int:
        """How many times `name` has been started (1 + restarts)."""
        return self._children[name].starts

    def given_up(self, name: str) -> bool:
        return self._children[name].given_up

    @property
    def all_given_up(self) -> bool:
        return bool(self._children) and all(c.given_up for c in self._children.values())

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def request_stop(self) -> None:
        """Safe to call from a signal handler: it only sets flags that the loop reads."""
        if self._stop_requested:
            self._hurry = True
        self._stop_requested = True

    # -- the loop ---------------------------------------------------------------------------------------------

    def step(self, timeout: float = 0.1) -> None:
        """Forward child output for up to `timeout` seconds, then notice exits and start due restarts."""
        now = time.monotonic()
        due = [c.restart_at for c in self._children.values() if c.restart_at is not None]
        if due:
            timeout = max(0.0, min(timeout, min(due) - now))
        self._forward_output(timeout)
        now = time.monotonic()
        for child in self._children.values():
            if child.proc is not None and child.proc.poll() is not None:
                self._on_exit(child, now)
            if child.restart_at is not None and now >= child.restart_at and not self._stop_requested:
                child.restart_at = None
                self._spawn(child)

    def run(self, until: Callable[[], bool] | None = None, timeout: float | None = None) -> bool:
        """Step until `until()` is true (returns True), or a stop is requested, every child was given up on, or
        `timeout` seconds pass (returns False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop_requested and not self.all_given_up:
            if until is not None and until():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.step(0.1)
        return False

    def shutdown(self) -> None:
        """SIGTERM every child's process group, wait up to `stop_timeout`, SIGKILL what is left. Idempotent."""
        if self._shut_down:
            return
        self._shut_down = True
        self._stop_requested = True
        live = [c for c in self._children.values() if c.proc is not None and c.proc.poll() is None]
        for child in live:
            self._event(f"stopping {child.name} (pid {child.proc.pid})")
            self._signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while not self._hurry and time.monotonic() < deadline and any(c.proc.poll() is None for c in live):
            self._forward_output(0.05)
        for child in self._children.values():
            if child.proc is None:
                continue
            if child.proc.poll() is None:
                self._event(f"{child.name} (pid {child.proc.pid}) still running after SIGTERM; killing it")
            # also for children that did exit: helpers they started share the group and must not outlive them
            self._signal_group(child, signal.SIGKILL)
            child.proc.wait()
        self._forward_output(0.0)
        for key in list(self._selector.get_map().values()):
            self._close_reader(key.data)
        self._selector.close()
        for child in self._children.values():
            if child.log is not None:
                child.log.close()
                child.log = None

    # -- internals --------------------------------------------------------------------------------------------

    def _spawn(self, child: _Child) -> None:
        env = dict(os.environ if child.env is None else child.env)
        env.setdefault("PYTHONUNBUFFERED", "1")  # a Python child on a pipe would otherwise hold its logs back
        if self.log_dir and child.log is None:
            child.log = open(os.path.join(self.log_dir, f"{child.name}.log"), "a", encoding="utf-8")
        try:
            proc = subprocess.Popen(child.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=env, process_group=0,
                                    preexec_fn=self._preexec)
        except OSError as e:
            # a command that cannot even be executed will not start next time either
            self._event(f"cannot start {child.name}: {e}; giving up on it")
            child.given_up = True
            return
        child.proc, child.started_at = proc, time.monotonic()
        child.starts += 1
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        self._selector.register(fd, selectors.EVENT_READ, _Reader(fd, child))
        if child.starts == 1:
            self._event(f"started {child.name} (pid {proc.pid}): {shlex.join(child.cmd)}")
        else:
            self._event(f"restarted {child.name} (pid {proc.pid}, start {child.starts})")

    def _on_exit(self, child: _Child, now: float) -> None:
        proc, child.proc = child.proc, None
        self._drain_pipe_of(child)
        self._signal_group_of(proc.pid, signal.SIGKILL)  # leftovers of the dead child must not meet its successor
        code = proc.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        if self._stop_requested:
            self._event(f"{child.name} (pid {proc.pid}) {how}")
            return
        if now - child.started_at >= self.healthy_after:
            child.backoff = self.backoff_initial
        child.crashes.append(now)
        while child.crashes and now - child.crashes[0] > self.crash_window:
            child.crashes.popleft()
        if len(child.crashes) >= self.max_crashes:
            child.given_up = True
            self._event(f"GIVING UP on {child.name}: it crashed {len(child.crashes)} times within "
                        f"{self.crash_window:g} s (last: pid {proc.pid} {how}); the other processes keep running")
            return
        delay = child.backoff
        child.backoff = min(child.backoff * 2, self.backoff_max)
        child.restart_at = now + delay
        self._event(f"{child.name} (pid {proc.pid}) {how}; restarting in {delay:g} s")

    def _signal_group(self, child: _Child, sig: signal.Signals) -> None:
        self._signal_group_of(child.proc.pid, sig)

    @staticmethod
    def _signal_group_of(pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass  # the whole group is already gone
        except PermissionError:
            pass  # macOS refuses killpg on a group whose leader is a zombie; nothing is left to kill there

    def _forward_output(self, timeout: float) -> None:
        if not self._selector.get_map():
            if timeout > 0:
                time.sleep(timeout)
            return
        for key, _ in self._selector.select(timeout):
            self._read(key.data)

    def _drain_pipe_of(self, child: _Child) -> None:
        """Read what an exited child left in its pipe, so its last words come before the news of its exit."""
        for key in list(self._selector.get_map().values()):
            if key.data.child is child:
                while self._read(key.data):
                    pass

    def _read(self, reader: _Reader) -> bool:
        """Forward one chunk; False when nothing more is there right now (or ever)."""
        try:
            chunk = os.read(reader.fd, 65536)
        except BlockingIOError:
            return False
        if not chunk:
            self._close_reader(reader)
            return False
        *lines, reader.partial = (reader.partial + chunk).split(b"\n")
        for line in lines:
            self._write_line(reader.child, line)
        return True

    def _close_reader(self, reader: _Reader) -> None:
        if reader.partial:
            self._write_line(reader.child, reader.partial)
            reader.partial = b""
        self._selector.unregister(reader.fd)
        os.close(reader.fd)

    def _write_line(self, child: _Child, line: bytes) -> None:
        text = f"[{child.name}] {line.decode('utf-8', errors='replace').rstrip(chr(13))}\n"
        sink = child.log if child.log is not None else self.out
        sink.write(text)
        sink.flush()

    def _event(self, message: str) -> None:
        self.out.write(f"[supervisor] {message}\n")
        self.out.flush()


def install_signal_handlers(supervisor: Supervisor) -> None:
    """Ctrl-C, SIGTERM and a closed terminal all ask the loop to shut down; a second Ctrl-C skips the grace."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: supervisor.request_stop())


# ---------------------------------------------------------------------------------------------------------------
# Cluster spec and command lines
# ---------------------------------------------------------------------------------------------------------------

def served_model(model: str, convert: bool = True) -> tuple[str, str]:
    """(what to pass as --model to every process, the name clients use).

    The default model and .gguf files are converted here, once, into a cached HF folder: otherwise the router and
    every worker would race to convert the same file at start-up. With convert=False (a dry run) the name is
    passed through; every process would resolve it the same way itself.
    """
    name = served_model_name(model)
    if not convert or not (is_default_model(model) or model.endswith(".gguf")):
        return model, name
    from common import names  # the module, so tests can stand in for the conversion

    return names.resolve_model(model), name


@dataclass
class Spec:
    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = 8000
    control_port: int | None = None  # port + 100
    kv_transport: str = "auto"
    threads_per_worker: int | None = None  # cpu_count // (processes of the prefill + decode workers)
    prefill_workers: int = 1
    decode_workers: int = 1
    prefill_args: list[str] = field(default_factory=list)
    decode_args: list[str] = field(default_factory=list)


# TOML key -> expected type; the [prefill] and [decode] tables fill the prefill_* / decode_* fields of Spec
_TOP_KEYS = {"model": str, "host": str, "port": int, "control_port": int, "kv_transport": str,
             "threads_per_worker": int}
_ROLE_KEYS = {"workers": int, "args": (str, list)}


def load_spec_file(path: str) -> dict:
    """The settings a TOML spec gives, as Spec field names; unknown keys are errors so typos do not pass."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    values = {}

    def check(where: str, value, expected):
        # bool is an int in Python, but `port = true` is a mistake
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ValueError(f"{path}: {where} has the wrong type ({type(value).__name__})")

    for key, value in data.items():
        if key in ("prefill", "decode") and isinstance(value, dict):
            for sub, subvalue in value.items():
                if sub not in _ROLE_KEYS:
                    raise ValueError(f"{path}: unknown key [{key}] {sub} (known: {', '.join(_ROLE_KEYS)})")
                check(f"[{key}] {sub}", subvalue, _ROLE_KEYS[sub])
                if sub == "args":
                    subvalue = _split_args(subvalue, f"{path}: [{key}] args")
                values[f"{key}_{sub}"] = subvalue
        elif key in _TOP_KEYS:
            check(key, value, _TOP_KEYS[key])
            values[key] = value
        else:
            raise ValueError(f"{path}: unknown key {key!r} "
                             f"(known: {', '.join(_TOP_KEYS)}, [prefill] and [decode] with workers/args)")
    return values


def _split_args(args, where: str) -> list[str]:
    if isinstance(args, str):
        return shlex.split(args)
    if not all(isinstance(a, str) for a in args):
        raise ValueError(f"{where} must be a string or a list of strings")
    return list(args)


def _local_address(host: str) -> str:
    """Where a process on this host reaches a server bound to `host` (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def build_commands(spec: Spec, model_arg: str, served_name: str, router: str | None,
                   start_router: bool = True) -> list[tuple[str, list[str]]]:
    """(name, argv) of every process to start, router first.

    Workers get the served name too: given a converted folder, they would otherwise name the model after it."""
    py = sys.executable
    commands = []
    if start_router:
        commands.append(("router", [py, "-m", "router", "--model", model_arg, "--served-model-name", served_name,
                                    "--host", spec.host, "--port", str(spec.port),
                                    "--control-port", str(spec.control_port)]))
    for role, count, extra in (("prefill", spec.prefill_workers, spec.prefill_args),
                               ("decode", spec.decode_workers, spec.decode_args)):
        for i in range(count):
            commands.append((f"{role}-{i}", [py, "-m", f"{role}_worker", "--router", router, "--model", model_arg,
                                             "--served-model-name", served_name, "--host", spec.host, "--kv-transport", spec.kv_transport,
                                             "--threads", str(spec.threads_per_worker), "--name", f"{role}-{i}",
                                             *extra]))
    return commands


def _health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False  # not up yet, or up but without a live prefill and decode worker (503)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    # every default is None so that an explicit flag can be told apart from "not given" and win over the file
    p = argparse.ArgumentParser(prog="python -m deploy.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="SPEC.toml",
                   help="cluster spec (same keys as these flags; flags given here override it)")
    p.add_argument("--model", help=f"HF folder, .gguf file or {DEFAULT_MODEL!r} (default)")
    p.add_argument("--prefill-workers", type=int, metavar="N", help="default 1")
    p.add_argument("--decode-workers", type=int, metavar="K", help="default 1")
    p.add_argument("--host", help="address the router binds and workers advertise (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="router HTTP port (default 8000)")
    p.add_argument("--control-port", type=int, help="router ZeroMQ control port (default port + 100)")
    p.add_argument("--kv-transport", choices=KV_TRANSPORTS, help="default auto")
    p.add_argument("--threads-per-worker", type=int, metavar="T",
                   help="torch threads per worker process (default max(1, cpu_count // processes), where a "
                        "worker counts its --tensor-parallel-size ranks)")
    # argparse reads a lone "--flag" as an option of ours, so such a value needs the = form: --decode-args=--flag
    p.add_argument("--prefill-args", metavar='"..."',
                   help='extra flags for every prefill worker (one flag alone: --prefill-args="--flag")')
    p.add_argument("--decode-args", metavar='"..."', help="extra flags for every decode worker")
    p.add_argument("--no-router", action="store_true",
                   help="start only workers, joining the router given by --router (how a second host joins)")
    p.add_argument("--router", metavar="HOST:PORT", help="control endpoint of a router on another host")
    p.add_argument("--log-dir", help="write each process's output to LOG_DIR/NAME.log instead of stdout")
    p.add_argument("--wait-ready", type=float, default=600, metavar="S",
                   help="wait up to S seconds for the router's /health (default 600; 0: do not wait); "
                        "exit 1 if not ready")
    p.add_argument("--dry-run", action="store_true", help="print the command lines and exit (the default model and .gguf files appear by name, "
                        "not yet converted)")
    return p


def _tensor_parallel_size(worker_args: list[str]) -> int:
    """Processes a worker started with these flags runs (1 for a bad value: the worker itself refuses it)."""
    flag = "--tensor-parallel-size"
    for i, arg in enumerate(worker_args):
        if arg == flag and i + 1 < len(worker_args):
            value = worker_args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
        else:
            continue
        return int(value) if value.isdigit() and int(value) > 0 else 1
    return 1


def resolve_spec(args: argparse.Namespace) -> Spec:
    """Built-in defaults, then the --config file, then the flags given explicitly."""
    values = load_spec_file(args.config) if args.config else {}
    for key in ("model", "host", "port", "control_port", "kv_transport", "threads_per_worker",
                "prefill_workers", "decode_workers"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    for key in ("prefill_args", "decode_args"):
        if getattr(args, key) is not None:
            values[key] = shlex.split(getattr(args, key))
    spec = Spec(**values)
    if spec.kv_transport not in KV_TRANSPORTS:
        raise ValueError(f"kv_transport must be one of {', '.join(KV_TRANSPORTS)}, not {spec.kv_transport!r}")
    if spec.prefill_workers < 0 or spec.decode_workers < 0:
        raise ValueError("worker counts cannot be negative")
    if spec.control_port is None:
        spec.control_port = spec.port + 100
    if spec.threads_per_worker is None:
        # a worker with --tensor-parallel-size N runs N processes, each with the worker's thread count
        processes = (spec.prefill_workers * _tensor_parallel_size(spec.prefill_args)
                     + spec.decode_workers * _tensor_parallel_size(spec.decode_args))
        spec.threads_per_worker = max(1, (os.cpu_count() or 1) // max(1, processes))
    if spec.threads_per_worker < 1:
        raise ValueError("threads_per_worker must be >= 1")
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        spec = resolve_spec(args)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as e:
        parser.error(str(e))
    if args.no_router:
        if not args.router:
            parser.error("--no-router needs --router HOST:PORT (the control endpoint of the running router)")
        if spec.prefill_workers + spec.decode_workers == 0:
            parser.error("--no-router with no workers would start nothing")
        router = args.router
    else:
        if args.router:
            parser.error("--router names a router on another host; use it together with --no-router")
        router = f"{_local_address(spec.host)}:{spec.control_port}"

    try:
        model_arg, name = served_model(spec.model, convert=not args.dry_run)
    except Exception as e:  # the model cannot be resolved: say so before starting anything
        print(f"launch: cannot resolve model {spec.model!r}: {e}", file=sys.stderr)
        return 2
    commands = build_commands(spec, model_arg, name, router, start_router=not args.no_router)
    if args.dry_run:
        for proc_name, cmd in commands:
            print(f"{shlex.join(cmd)}  # {proc_name}")
        return 0

    supervisor = Supervisor(log_dir=args.log_dir)
    install_signal_handlers(supervisor)
    for proc_name, cmd in commands:
        supervisor.add(proc_name, cmd)
    with supervisor:  # children are stopped however this block is left, an exception included
        if not args.no_router and args.wait_ready > 0:
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

            answered = supervisor.run(until=ready, timeout=args.wait_ready)
            if supervisor.stop_requested:
                return 0
            if supervisor.given_up("router"):
                # no router, no service: waiting out the timeout would only hide it
                print("launch: the router keeps crashing; shutting down", file=sys.stderr, flush=True)
                return 1
            if not answered:
                print(f"launch: {base}/health did not answer 200 within {args.wait_ready:g} s; shutting down",
                      file=sys.stderr, flush=True)
                return 1
            print(f"nano-pd ready: {base}/v1 ({spec.prefill_workers} prefill, {spec.decode_workers} decode)",
                  flush=True)
        elif args.no_router:
            print(f"nano-pd workers started ({spec.prefill_workers} prefill, {spec.decode_workers} decode), "
                  f"joining the router at {router}", flush=True)
        supervisor.run()
        if supervisor.all_given_up and not supervisor.stop_requested:
            print("launch: every process was given up on; exiting", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
