"""Several "hosts" on one machine, for tests that run the cluster across a real network: each host is a Linux
network namespace with one veth (its own IP on a private subnet), and every veth ends on a bridge that lives in a
"switch" namespace of its own, so nothing is added to the machine's own network. Needs root and `ip` (iproute2).

    with Hosts(["router", "p0", "d0"]) as hosts:       # NetnsUnavailable where namespaces cannot be made
        hosts.ip("p0")                                  # "10.213.0.2"
        ["ip", "netns", "exec", hosts.namespace("p0"), "python", ...]
        hosts.connect("router", ("10.213.0.1", 8000))   # a socket made inside the router's namespace
    with NetnsCluster(model, hosts, ...) as c:          # LocalCluster with each process on a host of its own
        c.add("prefill", host="p0")

The test process itself stays in the machine's namespace: NetnsCluster relays 127.0.0.1:PORT (loopback of this
namespace) to the router's HTTP port inside its namespace, so every LocalCluster helper (get, workers, openai)
works unchanged and no client traffic needs an address outside loopback and the namespaces.
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import uuid

from tests.support.cluster_harness import LocalCluster

SUBNET = "10.213.0"  # private, and reachable only inside the namespaces: the host's routes never see it
CLONE_NEWNET = 0x40000000
IP_TIMEOUT_S = 10.0  # one `ip` command; they take milliseconds
CONNECT_TIMEOUT_S = 5.0
RELAY_IDLE_S = 300.0  # a relayed connection silent this long is closed (the router closes idle ones much sooner)
HOST_DEVICE = "eth0"  # every host's one interface: the name UCX_NET_DEVICES gives NIXL's UCX


class NetnsUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no iproute2, no permission in a container)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if done.returncode:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip() or done.returncode}")


class Hosts:
    def __init__(self, names: list[str]):
        if len(names) > 250:
            raise ValueError("one /24 subnet: at most 250 hosts")
        tag = uuid.uuid4().hex[:8]  # unique per run: parallel runs and a crashed run's leftovers never collide
        self.switch = f"npd-{tag}-switch"
        self._namespaces = {name: f"npd-{tag}-{name}" for name in names}
        self._ips = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(names)}
        self._threads: dict[str, cf.ThreadPoolExecutor] = {}
        self._created: list[str] = []

    def __enter__(self):
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("`ip` (iproute2) is not installed")
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _create(self):
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "bridge", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "bridge", "up")
        for i, (name, ns) in enumerate(self._namespaces.items()):
            self._add_namespace(ns)
            port = f"port{i}"  # the switch end: device names are at most 15 characters
            _ip("link", "add", HOST_DEVICE, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", "dev", port, "master", "bridge")
            _ip("-n", self.switch, "link", "set", "dev", port, "up")
            _ip("-n", ns, "addr", "add", f"{self._ips[name]}/24", "dev", HOST_DEVICE)
            _ip("-n", ns, "link", "set", "dev", HOST_DEVICE, "up")
            _ip("-n", ns, "link", "set", "dev", "lo", "up")

    def _add_namespace(self, ns: str):
        _ip("netns", "add", ns)
        self._created.append(ns)

    def ip(self, name: str) -> str:
        return self._ips[name]

    def name_of(self, ip: str) -> str:
        return next(name for name, address in self._ips.items() if address == ip)

    def namespace(self, name: str) -> str:
        return self._namespaces[name]

    def _in_namespace(self, name: str, fn, *args):
        """fn(*args) on a thread that lives in host name's namespace (a socket is made in the namespace of the
        thread that makes it, and keeps it wherever it is used afterwards)."""
        if name not in self._threads:
            self._threads[name] = cf.ThreadPoolExecutor(1, f"netns-{name}", initializer=_enter_namespace,
                                                        initargs=(self._namespaces[name],))
        return self._threads[name].submit(fn, *args).result(CONNECT_TIMEOUT_S * 2)

    def connect(self, name: str, address: tuple[str, int]) -> socket.socket:
        """A TCP connection to address, made from inside host name."""
        return self._in_namespace(name, socket.create_connection, address, CONNECT_TIMEOUT_S)

    def listen(self, name: str, address: tuple[str, int]) -> socket.socket:
        """A listening TCP socket on address inside host name."""
        return self._in_namespace(name, socket.create_server, address)

    def kill_leftovers(self):
        """SIGKILL whatever still runs in our namespaces (only processes this test started can be in them)."""
        for ns in self._created:
            done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
            for pid in done.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass

    def close(self):
        for pool in self._threads.values():
            pool.shutdown(wait=False)
        self._threads.clear()
        self.kill_leftovers()
        # deleting a namespace destroys its veth end, and with it the peer end on the bridge
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=IP_TIMEOUT_S)
        self._created.clear()


def _enter_namespace(ns: str):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Relay:
    """Forwards TCP connections to 127.0.0.1:port (this process's namespace) to target inside host's namespace."""

    def __init__(self, hosts: Hosts, host: str, port: int, target: tuple[str, int]):
        self.hosts, self.host, self.target = hosts, host, target
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)  # so the accept loop sees close() within that
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="netns-relay", daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket):
        try:
            upstream = self.hosts.connect(self.host, self.target)
        except (OSError, cf.TimeoutError, RuntimeError):  # the router is not up (yet): the client sees a close
            client.close()
            return
        for s in (client, upstream):
            s.settimeout(RELAY_IDLE_S)
        pair = [client, upstream]
        threading.Thread(target=_copy, args=(upstream, client, pair), daemon=True).start()
        _copy(client, upstream, pair)

    def close(self):
        self._closed.set()
        self._listener.close()
        self._thread.join(5)


def _copy(src: socket.socket, dst: socket.socket, pair: list[socket.socket]):
    """Bytes from src to dst until src ends (or fails); then dst's sending side is shut, and the second of the two
    directions to finish closes both sockets."""
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    pair.pop()  # one entry per direction: the one that ends last finds none left (both may: close is idempotent)
    if not pair:
        for s in (src, dst):
            s.close()


class NetnsCluster(LocalCluster):
    """A LocalCluster whose router and workers each run on a host of `hosts` (`ip netns exec`), binding and
    advertising that host's IP; the router's HTTP port is relayed to 127.0.0.1 in the test's own namespace.

    placement: the hosts each role's workers go to, in order (add takes the first with no live process, or the
    host it is given); role_args: flags for one role's workers only. KV over nixl uses UCX's TCP transport on the
    host's veth."""

    def __init__(self, model: str, hosts: Hosts, placement: dict[str, list[str]], router: str = "router",
                 prefill: int = 1, decode: int = 1, role_args: dict[str, tuple[str, ...]] | None = None, **kw):
        super().__init__(model, prefill=prefill, decode=decode, **kw)
        self.hosts, self.placement, self.router_name = hosts, placement, router
        self.role_args = role_args or {}
        self.router_host = hosts.ip(router)
        self.host_by_pid: dict[int, str] = {}
        self._placing = router  # the host of the process being spawned
        self._relay: Relay | None = None

    def _start(self):
        self._relay = Relay(self.hosts, self.router_name, self.port, (self.router_host, self.port))
        super()._start()

    def _router_argv(self) -> list[str]:
        self._placing = self.router_name
        return [*super()._router_argv(), "--host", self.router_host]

    def add(self, role: str, wait: bool = True, extra: tuple[str, ...] = (), host: str | None = None):
        self._placing = host or self._free_host(role)
        ip = self.hosts.ip(self._placing)
        host = self._placing
        own = ("--host", ip, "--advertise-host", ip, *self.role_args.get(role, ()))
        proc = super().add(role, wait, (*own, *extra))
        self.host_by_pid[proc.pid] = host
        return proc

    def _free_host(self, role: str) -> str:
        busy = {self.host_by_pid.get(p.pid) for r in ("prefill", "decode", "mixed") for p in self.procs[r]
                if p.poll() is None}
        return next(h for h in self.placement[role] if h not in busy)

    def _command(self, name: str, args: list[str]) -> list[str]:
        ucx = ["UCX_TLS=tcp", f"UCX_NET_DEVICES={HOST_DEVICE}"] if self.transport == "nixl" else []
        # ip netns exec and env both exec: the child's pid is the python process's, as the router sees it
        return ["ip", "netns", "exec", self.hosts.namespace(self._placing), "env", *ucx, *super()._command(name, args)]

    def close(self):
        super().close()
        if self._relay is not None:
            self._relay.close()
            self._relay = None
