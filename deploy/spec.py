"""The cluster spec: the TOML file's keys as typed structs (a wrong key or type is an error naming it and the
file), and the spec the launcher resolves from it and its flags, each role's worker flags parsed.

    model = "SmolLM2-135M-Instruct"    # host, port, control_port, kv_transport, threads_per_worker
    args = "--dtype bfloat16"          # extra flags for every worker (a role's own args come after, and win)
    [prefill]
    workers = 1
    args = "--tensor-parallel-size 2"  # or a list of strings: extra flags for every worker of the role
    [mixed]                            # workers that prefill and decode their own requests (none by default)
    workers = 2
"""
from __future__ import annotations

import argparse
import os
import shlex
from typing import Literal

import msgspec

from common.cluster.flags import KV_TRANSPORTS, engine_kwargs, worker_module, worker_parser
from common.engine_args import EngineArgs
from common.names import DEFAULT_MODEL

ROLES = ("prefill", "decode", "mixed")


def split_args(args: str | list[str]) -> list[str]:
    """Flags given as one string (split as a shell would) or one by one."""
    return shlex.split(args) if isinstance(args, str) else list(args)


class RoleFile(msgspec.Struct, forbid_unknown_fields=True):
    """[prefill] / [decode] / [mixed]: how many workers of the role, and extra flags for every one of them."""
    workers: int | None = None  # mixed: 0; prefill and decode: 1, or 0 when there are mixed workers
    args: str | list[str] = ""


class ClusterSpecFile(msgspec.Struct, forbid_unknown_fields=True):
    """A spec file's keys, each defaulting to the built-in value; the launcher's flags of the same names (and
    --prefill-workers / --prefill-args for [prefill] workers / args) override them; its engine flags (--dtype ...)
    come after the file's top-level args."""
    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = 8000
    control_port: int | None = None  # port + 100
    kv_transport: Literal[KV_TRANSPORTS] = "auto"
    threads_per_worker: int | None = None  # per role: see default_threads
    args: str | list[str] = ""  # extra flags for every worker, before its role's own
    prefill: RoleFile = msgspec.field(default_factory=RoleFile)
    decode: RoleFile = msgspec.field(default_factory=RoleFile)
    mixed: RoleFile = msgspec.field(default_factory=RoleFile)

    def overridden(self, flags: dict) -> ClusterSpecFile:
        """These values with every flag that was given (not None) in their place."""
        def given(struct, prefix: str = ""):
            return {key: flags[prefix + key] for key in struct.__struct_fields__
                    if flags.get(prefix + key) is not None}

        roles = {role: msgspec.structs.replace(getattr(self, role), **given(getattr(self, role), f"{role}_"))
                 for role in ROLES}
        top = given(self)
        if "args" in top:  # flags for every worker add to the file's, they do not replace them
            top["args"] = split_args(self.args) + split_args(top["args"])
        return msgspec.structs.replace(self, **top, **roles)


def load_spec_file(path: str) -> ClusterSpecFile:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return msgspec.toml.decode(data, type=ClusterSpecFile)
    except msgspec.DecodeError as e:  # a ValidationError names the key: "Expected `int`, got `str` - at `$.port`"
        raise ValueError(f"{path}: {e}") from None


class Role(msgspec.Struct):
    workers: int
    args: list[str]  # passed on to every worker of the role as they are (the spec's args for all, then its own)
    engine: EngineArgs  # what they set
    threads: int = 1  # torch threads of each of its processes


class Spec(msgspec.Struct):
    """What the launcher starts: every value resolved."""
    model: str
    host: str
    port: int
    control_port: int
    kv_transport: str
    prefill: Role
    decode: Role
    mixed: Role

    def roles(self) -> list[tuple[str, Role]]:
        return [(role, getattr(self, role)) for role in ROLES]

    def shape(self) -> str:
        """The workers in words, e.g. "1 prefill, 1 decode"."""
        return ", ".join(f"{part.workers} {role}" for role, part in self.roles() if part.workers or role != "mixed")


def default_threads(role: str, roles: dict[str, Role]) -> int:
    """Torch threads per process when the spec names none. The workers that decode (decode and mixed) split all
    cores between them; prefill workers split them again among every worker process, on top. A prefill worker
    computes in bursts and idles between prompts, so giving decode only what is left when all are busy starves
    it (on 2 cores, 1P1D at 32 in flight: 1+1 threads 37 out tok/s, decode 2 + prefill 1 55, 2+2 with passive
    OpenMP waiting 52; README "Serving shapes"). A worker with --tensor-parallel-size N is N processes."""
    def processes(*names: str) -> int:
        return sum(roles[r].workers * roles[r].engine.tensor_parallel_size for r in names)

    cores = os.cpu_count() or 1
    share = processes("decode", "mixed") if role != "prefill" else processes("prefill", "decode", "mixed")
    return max(1, cores // max(1, share))


def resolve(values: ClusterSpecFile) -> Spec:
    """The spec these values give: per-role flags parsed, the control port and the thread count filled in."""
    roles = {}
    default_workers = {"mixed": 0, "prefill": 0 if values.mixed.workers else 1}
    default_workers["decode"] = default_workers["prefill"]
    for role in ROLES:
        part = getattr(values, role)
        argv = split_args(values.args) + split_args(part.args)
        workers = default_workers[role] if part.workers is None else part.workers
        roles[role] = Role(workers, argv, parse_role_args(role, argv))
    if any(role.workers < 0 for role in roles.values()):
        raise ValueError("worker counts cannot be negative")
    if values.threads_per_worker is not None and values.threads_per_worker < 1:
        raise ValueError("threads_per_worker must be >= 1")
    for role, part in roles.items():
        part.threads = values.threads_per_worker or default_threads(role, roles)
    control_port = values.port + 100 if values.control_port is None else values.control_port
    return Spec(model=values.model, host=values.host, port=values.port, control_port=control_port,
                kv_transport=values.kv_transport, **roles)


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(message)


def parse_role_args(role: str, args: list[str]) -> EngineArgs:
    """The engine options a `role` worker started with these extra flags has; a flag it would refuse is a
    ValueError here, before anything starts."""
    parser = worker_parser(role, _RaisingParser(prog=f"python -m {worker_module(role)}", add_help=False))
    try:
        # the launcher gives every worker its --router itself (and --model, --host, ... before these flags)
        parsed = parser.parse_args(["--router", "", *args])
    except ValueError as e:
        raise ValueError(f"{role} worker flags {shlex.join(args)!r}: {e}") from None
    return EngineArgs(**engine_kwargs(parsed))
