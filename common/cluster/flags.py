"""The worker command line: the flags both worker roles take (the engine's generated from EngineArgs), the decode
role's own, and the engine arguments they give."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import typing
from collections.abc import Mapping

from common.engine_args import EngineArgs
from common.env_flags import apply_environment

KV_TRANSPORTS = ("auto", "nixl", "zmq")
# a follow-up turn's few new tokens cost a decode step less than a hand-off's round trips (four messages and a KV
# write); fresh prompts (the serving benchmark's ~190 tokens) still go to a prefill worker. Chosen, not tuned.
LOCAL_PREFILL_MAX_TOKENS = 64


def worker_module(role: str) -> str:
    """The module a role's worker runs as (`python -m ...`); a mixed worker is a decode worker's --role."""
    return "prefill_worker" if role == "prefill" else "decode_worker"


def add_worker_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--router", required=True, help="HOST:PORT of the router's control endpoint")
    ap.add_argument("--served-model-name", default=None, help="the model name clients use (default: from --model)")
    ap.add_argument("--name", default=None, help="worker name prefix (the pid is appended)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind the worker's sockets on")
    ap.add_argument("--advertise-host", default=None, help="address peers use to reach this worker (default --host)")
    ap.add_argument("--kv-transport", default="auto", choices=KV_TRANSPORTS)
    ap.add_argument("--drain-timeout", type=float, default=120.0,
                    help="seconds a draining worker (SIGTERM, or the router's POST /admin/workers/ID/drain) has to "
                         "finish what it holds; then it exits and the router moves the rest to other workers")
    ap.add_argument("--health-port", type=int, default=0,
                    help="serve GET /health and /ready on --host:PORT (probes for Kubernetes); 0: no HTTP server")
    add_engine_args(ap.add_argument_group("engine options"))
    ap.add_argument("--log-level", default="info")
    return ap


def worker_parser(role: str, ap: argparse.ArgumentParser | None = None,
                  environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The whole command line of a `role` ("prefill", "decode" or "mixed") worker, on `ap` or a parser of its own;
    a mixed worker is `python -m decode_worker --role mixed`. environ (the worker's own os.environ): its NANO_PD_*
    variables become the flags' defaults (see apply_environment); None: the flags' own defaults only."""
    ap = add_worker_args(ap or argparse.ArgumentParser(prog=f"python -m {worker_module(role)}"))
    if role in ("decode", "mixed"):
        ap.add_argument("--role", choices=("decode", "mixed"), default=role,
                        help="decode: prefill workers fill the KV; mixed: this worker prefills its requests too "
                             "(one engine, prompt chunks batched with the decodes), no prefill worker needed")
        ap.add_argument("--local-prefill-max-tokens", type=int, default=LOCAL_PREFILL_MAX_TOKENS,
                        help="a decode worker prefills a request itself when at most this many of its prompt "
                             "tokens are not in its own prefix cache (a multi-turn follow-up), instead of asking a "
                             "prefill worker; 0: never")
        ap.add_argument("--kv-lease", type=float, default=60.0,
                        help="seconds reserved blocks wait for their KV before they are freed and the request retried")
        ap.add_argument("--max-pending", type=int, default=None,
                        help="admissions queued for blocks before new ones are refused (default 4 x max-num-seqs)")
    return ap if environ is None else apply_environment(ap, environ)


def add_engine_args(ap, passthrough: bool = False, skip: tuple[str, ...] = ()) -> None:
    """A flag for every field of EngineArgs (but `skip`), its dest the field's name: --block-size N sets block_size;
    a bool option is a switch that turns its default around (--enable-expert-parallel, --no-prefix-caching).
    passthrough: each value is kept as given (a string; True for a switch), None when absent, for a launcher that
    hands the flags on to workers (engine_argv) whose own parsers check them."""
    hints = typing.get_type_hints(EngineArgs)
    for f in dataclasses.fields(EngineArgs):
        if f.name in skip:
            continue
        spelling = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if hints[f.name] is bool:
            action = "store_true" if passthrough or not f.default else "store_false"
            ap.add_argument(spelling, dest=f.name, action=action, default=None if passthrough else f.default,
                            help=f.metadata["help"])
            continue
        if passthrough:
            ap.add_argument(spelling, dest=f.name, metavar=f.name.upper(), help=f.metadata["help"])
            continue
        # `int | None` is read as an int; a flag never gives None, only its absence does
        plain = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        ap.add_argument(spelling, dest=f.name, type=f.metadata.get("type", plain), default=f.default,
                        choices=f.metadata.get("choices"), help=f.metadata["help"])


def engine_argv(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The engine flags a passthrough parser (add_engine_args(passthrough=True, skip)) was given, as worker argv."""
    argv = []
    for f in dataclasses.fields(EngineArgs):
        value = None if f.name in skip else getattr(args, f.name, None)
        if value is None:
            continue
        spelling = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        argv += [spelling] if value is True else [spelling, value]
    return argv


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig's arguments from the parsed worker flags."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs)}


def setup_logging(role: str, args: argparse.Namespace):
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s {role} %(levelname)s %(message)s")
