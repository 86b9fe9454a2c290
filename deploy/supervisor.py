"""The supervisor: runs the cluster's processes, each in a process group of its own, restarts one that crashes
(exponential backoff, given up on after repeated crashes) and stops them all on shutdown (SIGTERM, a grace period,
SIGKILL). Children also die with it, even when it is SIGKILLed (the parent-death signal, Linux)."""
from __future__ import annotations

import collections
import ctypes
import os
import selectors
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO


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
    retiring: bool = False  # sent SIGTERM by retire(): its exit is the end it was asked for, not a crash
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
        self._started = False
        self._preexec = _parent_death_signal()

    # -- setup ------------------------------------------------------------------------------------------------

    def add(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        """Register a child; the next `start()` (or entering the `with` block) starts it, or this call once the
        supervisor runs (a worker added by the autoscaler)."""
        if name in self._children:
            raise ValueError(f"duplicate child name {name!r}")
        child = self._children[name] = _Child(name, list(cmd), env, backoff=self.backoff_initial)
        if self._started and not self._stop_requested:
            self._spawn(child)

    def retire(self, name: str) -> None:
        """Ask a child to leave for good: SIGTERM to it alone (a worker drains: it finishes what it holds, then
        exits), no restart, and its name is forgotten once it has exited. One not running is forgotten at once."""
        child = self._children[name]
        if child.proc is None:
            self._forget(child)
            return
        child.retiring = True
        self._event(f"retiring {name} (pid {child.proc.pid}): SIGTERM")
        child.proc.send_signal(signal.SIGTERM)

    def start(self) -> None:
        self._started = True
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

    def names(self) -> list[str]:
        """Every child's name, in the order added, the retiring ones included until they exit."""
        return list(self._children)

    def retiring(self, name: str) -> bool:
        return self._children[name].retiring

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
        for child in list(self._children.values()):
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
        if child.retiring:
            self._event(f"retired {child.name} (pid {proc.pid}) {how}")
            self._forget(child)
            return
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

    def _forget(self, child: _Child) -> None:
        del self._children[child.name]
        if child.log is not None:
            child.log.close()
            child.log = None  # a grandchild still holding its pipe writes to our output from now on

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
