"""Flags from the environment: every flag of a worker or the router can also come from $NANO_PD_<ITS DEST IN
CAPITALS>, as containers are configured; a flag on the command line still wins. Torch-free (the router uses it)."""
from __future__ import annotations

import argparse
from collections.abc import Mapping

# the prefix the cache ($NANO_PD_CACHE) and the engine ($NANO_PD_DTYPE, read by --dtype auto too) already use
ENV_PREFIX = "NANO_PD_"
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_name(action: argparse.Action) -> str:
    """The variable a flag also reads: --kv-transport is NANO_PD_KV_TRANSPORT, --no-prefix-caching (dest
    enable_prefix_caching) NANO_PD_ENABLE_PREFIX_CACHING."""
    return ENV_PREFIX + action.dest.upper()


def apply_environment(ap: argparse.ArgumentParser, environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """Every flag of `ap` (all added by now) also from the environment: a non-empty $NANO_PD_<DEST> becomes the
    flag's default (a required flag is then optional), so a flag on the command line still wins. A switch's
    variable gives its dest's value (true/false, 1/0, yes/no, on/off). The value is checked now, as argparse checks
    the flag's, and a bad one is a usage error naming the variable."""
    for action in ap._actions:
        if not action.option_strings or action.default == argparse.SUPPRESS:  # --help
            continue
        name = env_name(action)
        raw = environ.get(name, "")
        if raw:  # an empty variable is unset, as a container's `value: ""` means
            action.default = _env_value(ap, action, name, raw)
            action.required = False
    note = (f"Every option can also be set by the environment variable {ENV_PREFIX}<its dest in capitals>, e.g. "
            f"--kv-transport as {ENV_PREFIX}KV_TRANSPORT, a switch as true/false; an option given here wins.")
    ap.epilog = f"{ap.epilog}\n\n{note}" if ap.epilog else note
    return ap


def _env_value(ap: argparse.ArgumentParser, action: argparse.Action, name: str, raw: str):
    if action.nargs == 0 and isinstance(action.const, bool):  # store_true / store_false
        word = raw.strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            ap.error(f"${name}: expected true or false, got {raw!r}")
        return word in TRUE_WORDS
    try:
        value = action.type(raw) if action.type else raw
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        ap.error(f"${name}: invalid value {raw!r} for {'/'.join(action.option_strings)}")
    if action.choices is not None and value not in action.choices:
        ap.error(f"${name}: invalid choice {raw!r} (choose from {', '.join(map(str, action.choices))})")
    return value
