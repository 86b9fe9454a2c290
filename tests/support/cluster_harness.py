"""Start a real router and real workers as separate processes for end-to-end tests.

    with LocalCluster(model_dir, prefill=1, decode=1, transport="zmq") as c:
        client = c.openai()
        c.kill("decode", 0)          # SIGKILL one worker
        c.add("decode")              # a worker that joins the live cluster
    with LocalCluster(model_dir, prefill=0, decode=0, mixed=2) as c:   # mixed workers: no hand-off
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROLES = ("router", "prefill", "decode", "mixed")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free now, chosen below the kernel's ephemeral range: a port the kernel hands out (bind to 0) can be
    taken again by any outgoing connection (a worker's ZMQ connect) before the router binds it."""
    low, high = _ephemeral_range()
    candidates = range(20000, low) if low > 21000 else range(high + 1, 65535)
    for _ in range(200):
        port = random.choice(candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


class LocalCluster:
    def __init__(self, model: str, prefill: int = 1, decode: int = 1, transport: str = "zmq", mixed: int = 0,
                 worker_args: tuple[str, ...] = ("--num-kv-blocks", "512"), router_args: tuple[str, ...] = (),
                 log_dir: str | None = None, served_model_name: str = "tiny"):
        self.model, self.transport = model, transport
        self.worker_args, self.router_args = list(worker_args), list(router_args)
        self.served_model_name = served_model_name
        self.port, self.control_port = free_port(), free_port()
        self.router_host = "127.0.0.1"  # the address workers reach the router's control port on
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir or os.path.join("/tmp", f"nano-pd-test-{self.port}")
        os.makedirs(self.log_dir, exist_ok=True)
        self.procs: dict[str, list[subprocess.Popen]] = {role: [] for role in ROLES}
        self._initial = (prefill, decode, mixed)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        log = open(os.path.join(self.log_dir, f"{name}.log"), "ab")
        return subprocess.Popen(self._command(name, args), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def _command(self, name: str, args: list[str]) -> list[str]:
        """The argv running `python -m args` as process `name`; a subclass may prefix it (tests.support.netns runs
        each process on a host of its own with `ip netns exec`)."""
        return [sys.executable, "-m", *args]

    def __enter__(self):
        for attempt in range(3):
            try:
                self._start()
                return self
            except RuntimeError:
                self.close()
                if attempt == 2 or not self._router_port_was_taken():
                    raise
            except BaseException:
                self.close()
                raise
            # another process took a port between free_port() and the router's bind: start over on new ports
            self.procs = {role: [] for role in ROLES}
            self.port, self.control_port = free_port(), free_port()
            self.base_url = f"http://127.0.0.1:{self.port}"

    def _router_port_was_taken(self) -> bool:
        log = os.path.join(self.log_dir, "router.log")
        try:
            with open(log, "rb") as f:
                taken = b"address already in use" in f.read().lower()
        except OSError:
            return False
        if taken:  # kept for the record, out of the way of the next attempt's log
            os.replace(log, log + f".port-taken-{self.port}")
        return taken

    def _start(self):
        self.procs["router"].append(self._spawn("router", self._router_argv()))
        for role, count in zip(("prefill", "decode", "mixed"), self._initial):
            for _ in range(count):
                self.add(role, wait=False)
        self.wait_for(self._router_up, "the router's HTTP port")
        self.wait_workers(*self._initial)

    def _router_argv(self) -> list[str]:
        return ["router", "--model", self.model, "--served-model-name", self.served_model_name,
                "--port", str(self.port), "--control-port", str(self.control_port), *self.router_args]

    def __exit__(self, *exc):
        self.close()

    def add(self, role: str, wait: bool = True, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        index = len(self.procs[role])
        module = ["decode_worker", "--role", "mixed"] if role == "mixed" else [f"{role}_worker"]
        if role == "decode":  # every prompt through a prefill worker: the hand-off is what these clusters test
            module += ["--local-prefill-max-tokens", "0"]
        proc = self._spawn(f"{role}-{index}", [
            *module, "--router", f"{self.router_host}:{self.control_port}", "--model", self.model,
            "--served-model-name", self.served_model_name, "--kv-transport", self.transport, "--threads", "1",
            "--name", f"{role}-{index}", *self.worker_args, *extra])
        self.procs[role].append(proc)
        if wait:
            self.wait_for(lambda: any(w["pid"] == proc.pid and w["alive"] for w in self.workers()),
                          f"{role} worker {proc.pid} to join")
        return proc

    def kill(self, role: str, index: int) -> int:
        proc = self.procs[role][index]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        return proc.pid

    def send_signal(self, role: str, index: int, sig: int) -> int:
        """Send sig (SIGSTOP: the process hangs, alive; SIGCONT: it resumes) to a process; its pid."""
        proc = self.procs[role][index]
        proc.send_signal(sig)
        return proc.pid

    def forget(self, role: str, index: int) -> int:
        """Stop watching a process that was meant to exit (a worker the router refused); its exit status."""
        proc = self.procs[role].pop(index)
        return proc.wait(30)

    def restart_router(self) -> None:
        """kill -9 the router and start a new one on the same ports; the workers re-register by themselves."""
        old = self.procs["router"].pop()
        old.send_signal(signal.SIGKILL)
        old.wait(10)
        self.procs["router"].append(self._spawn("router", self._router_argv()))
        self.wait_for(self._router_up, "the restarted router's HTTP port")

    # --- observation ------------------------------------------------------------------------------------------
    def get(self, path: str):
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, body, headers: dict | None = None, raw: bool = False):
        """(status, response headers, decoded JSON body) of a POST; HTTP errors are returned, not raised."""
        data = body if raw else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())

    def _router_up(self) -> bool:
        try:
            self.get("/health")
            return True
        except OSError:
            return False

    def workers(self) -> list[dict]:
        try:
            status, body = self.get("/cluster")
        except OSError:
            return []
        return json.loads(body)["workers"] if status == 200 else []

    def alive(self, role: str) -> list[dict]:
        return [w for w in self.workers() if w["role"] == role and w["alive"]]

    def wait_workers(self, prefill: int, decode: int, mixed: int = 0, timeout: float = 120):
        self.wait_for(lambda: len(self.alive("prefill")) >= prefill and len(self.alive("decode")) >= decode
                      and len(self.alive("mixed")) >= mixed, f"{prefill} prefill, {decode} decode and {mixed} mixed "
                      "workers", timeout)

    def wait_for(self, condition, what: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for role, procs in self.procs.items():
                for i, p in enumerate(procs):
                    if p.poll() is not None and (role == "router" or p.returncode not in (-9, 0)):
                        raise RuntimeError(f"{role} {i} exited ({p.returncode}); logs in {self.log_dir}")
            if condition():
                return
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}; logs in {self.log_dir}")

    def openai(self, api_key: str = "unused", **kw):
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def close(self):
        everyone = [p for procs in self.procs.values() for p in procs]
        for p in everyone:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in everyone:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --- the checks every end-to-end scenario ends with -------------------------------------------------------------
IDLE_WAIT_S = 30.0  # the slowest legitimate wind-down: a lease or heartbeat timeout after a fault, with margin


def idle_problems(c: LocalCluster) -> list[str]:
    """What keeps the cluster from being idle (empty when it is)."""
    status, body = c.get("/cluster")
    if status != 200:
        return [f"/cluster answered {status}"]
    page = json.loads(body)
    problems = [f"the router holds {page['requests']} requests"] if page["requests"] else []
    for w in page["workers"]:
        if not w["alive"]:
            continue
        load, name = w["load"], w["worker_id"]
        if w["inflight"]:
            problems.append(f"{name}: {w['inflight']} requests in flight in the router's books")
        if load["num_running"] or load["num_waiting"]:
            problems.append(f"{name}: {load['num_running']} running, {load['num_waiting']} waiting")
        if load["free_blocks"] != load["total_blocks"]:
            problems.append(f"{name}: {load['total_blocks'] - load['free_blocks']} KV blocks still held")
    return problems


def assert_idle(c: LocalCluster, timeout: float = IDLE_WAIT_S):
    """Wait (heartbeats carry the loads, so a few of them) until the cluster is idle; fail saying what is not."""
    deadline = time.monotonic() + timeout
    while (problems := idle_problems(c)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not problems, f"the cluster is not idle after {timeout:g} s: {problems}; logs in {c.log_dir}"


def assert_all_up(c: LocalCluster):
    """Every process the harness started is still running (a crash is a failure even if migration hid it)."""
    dead = [f"{role} {i} (exit {p.returncode})" for role, procs in c.procs.items() for i, p in enumerate(procs)
            if p.poll() is not None]
    assert not dead, f"processes died: {dead}; logs in {c.log_dir}"
