"""common/cluster/flags.py: the engine flags generated from EngineArgs, the engine arguments they give, and the
worker command line's independence from torch."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from common.cluster.flags import engine_kwargs, worker_parser
from common.env_flags import apply_environment, env_name
from common.engine_args import EngineArgs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = {f.name: f for f in dataclasses.fields(EngineArgs)}

# a value other than the default for every field: (the flag's words, what engine_kwargs gives for them)
CHANGED = {
    "model": (["--model", "/models/tiny"], "/models/tiny"),
    "dtype": (["--dtype", "bfloat16"], "bfloat16"),
    "quantization": (["--quantization", "int4"], "int4"),
    "int4_float_copy": (["--no-int4-float-copy"], False),
    "quantization_group_size": (["--quantization-group-size", "128"], 128),
    "block_size": (["--block-size", "32"], 32),
    "max_num_seqs": (["--max-num-seqs", "8"], 8),
    "max_num_batched_tokens": (["--max-num-batched-tokens", "512"], 512),
    "max_model_len": (["--max-model-len", "1024"], 1024),
    "num_kv_blocks": (["--num-kv-blocks", "64"], 64),
    "kv_cache_memory_gb": (["--kv-cache-memory-gb", "0.25"], 0.25),
    "enable_prefix_caching": (["--no-prefix-caching"], False),
    "seed": (["--seed", "7"], 7),
    "speculative_config": (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'],
                           {"method": "ngram", "num_speculative_tokens": 3}),
    "device": (["--device", "cuda:1"], "cuda:1"),
    "decode_mode": (["--decode-mode", "compile"], "compile"),
    "tensor_parallel_size": (["--tensor-parallel-size", "2"], 2),
    "enable_expert_parallel": (["--enable-expert-parallel"], True),
    "threads": (["--threads", "3"], 3),
}


def parse(*argv: str, role: str = "prefill"):
    return worker_parser(role).parse_args(["--router", "127.0.0.1:8100", *argv])


def test_every_engine_option_has_a_flag_with_its_help():
    assert set(CHANGED) == set(FIELDS)
    flags = {a.dest: a for a in worker_parser("prefill")._actions}
    for name, f in FIELDS.items():
        assert name in flags, name
        assert flags[name].help == f.metadata["help"] and f.metadata["help"]
        assert flags[name].option_strings == [f.metadata.get("flag", "--" + name.replace("_", "-"))]


def test_no_flags_give_the_defaults_of_engine_args():
    assert engine_kwargs(parse()) == dataclasses.asdict(EngineArgs())
    assert EngineArgs(**engine_kwargs(parse())) == EngineArgs()
    # the worker flags kept their defaults
    assert (EngineArgs().block_size, EngineArgs().max_num_seqs, EngineArgs().max_num_batched_tokens) == (16, 256, 2048)
    assert (EngineArgs().dtype, EngineArgs().decode_mode, EngineArgs().kv_cache_memory_gb) == ("auto", "auto", 1.0)
    assert EngineArgs().enable_prefix_caching and not EngineArgs().enable_expert_parallel
    assert (EngineArgs().tensor_parallel_size, EngineArgs().threads, EngineArgs().model) == (1, 0, None)


@pytest.mark.parametrize("name", list(CHANGED))
def test_each_flag_reaches_engine_kwargs(name):
    words, value = CHANGED[name]
    kwargs = engine_kwargs(parse(*words))
    assert kwargs[name] == value and type(kwargs[name]) is type(value)
    assert kwargs[name] != getattr(EngineArgs(), name)
    # and only that one
    assert {k: v for k, v in kwargs.items() if k != name} == \
           {k: v for k, v in dataclasses.asdict(EngineArgs()).items() if k != name}


def test_all_flags_at_once_and_the_rest_of_the_worker_line():
    args = parse(*(w for words, _ in CHANGED.values() for w in words), "--kv-transport", "zmq", "--name", "p",
                 "--kv-lease", "5", role="decode")
    assert engine_kwargs(args) == {name: value for name, (_, value) in CHANGED.items()}
    assert (args.router, args.kv_transport, args.name, args.kv_lease, args.max_pending) == \
           ("127.0.0.1:8100", "zmq", "p", 5.0, None)
    assert (args.host, args.advertise_host, args.served_model_name, args.log_level) == \
           ("127.0.0.1", None, None, "info")


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--decode-mode", "cuda_graph"], "argument --decode-mode: invalid choice: 'cuda_graph'"),
    (["--kv-transport", "rdma"], "argument --kv-transport: invalid choice: 'rdma'"),
    (["--speculative-config", "{method: ngram}"], "argument --speculative-config: invalid loads value"),
    (["--block-size", "1.5"], "argument --block-size: invalid int value: '1.5'"),
    (["--enable-prefix-caching"], "unrecognized arguments: --enable-prefix-caching"),
    (["--kv-lease", "5"], "unrecognized arguments: --kv-lease 5"),  # a decode worker's flag
])
def test_bad_values_are_refused_by_argparse(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_worker_flags_import_without_torch():
    code = ("import sys\n"
            "sys.modules['torch'] = None  # import torch now raises ImportError\n"
            "import common.cluster.flags, common.engine_args\n"
            "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
            "try:\n"
            "    import torch\n"
            "except ImportError:\n"
            "    print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


# the environment: NANO_PD_<DEST> for every flag (containers configure by variables), the flags still winning
def env_of(name: str) -> str:
    """CHANGED's value for `name` as its variable says it: a switch's dest value as true/false, else the word."""
    words, value = CHANGED[name]
    return str(value).lower() if len(words) == 1 else words[1]


def test_every_engine_flag_comes_from_its_variable():
    environ = {"NANO_PD_" + name.upper(): env_of(name) for name in CHANGED}
    args = worker_parser("decode", environ=environ).parse_args(["--router", "r:8100"])
    assert engine_kwargs(args) == {name: value for name, (_, value) in CHANGED.items()}


def test_the_worker_line_from_variables_and_the_flags_win():
    environ = {"NANO_PD_ROUTER": "nano-pd-router-control:8100", "NANO_PD_HOST": "0.0.0.0",
               "NANO_PD_ADVERTISE_HOST": "10.1.2.3", "NANO_PD_KV_TRANSPORT": "zmq", "NANO_PD_HEALTH_PORT": "8080",
               "NANO_PD_DRAIN_TIMEOUT": "30", "NANO_PD_KV_LEASE": "5", "NANO_PD_ROLE": "mixed",
               "NANO_PD_MAX_NUM_SEQS": "8", "NANO_PD_ENABLE_PREFIX_CACHING": "0", "NANO_PD_SERVED_MODEL_NAME": ""}
    args = worker_parser("decode", environ=environ).parse_args([])  # --router is no longer required
    assert (args.router, args.host, args.advertise_host, args.kv_transport, args.health_port, args.drain_timeout,
            args.kv_lease, args.role, args.max_num_seqs, args.enable_prefix_caching) == \
           ("nano-pd-router-control:8100", "0.0.0.0", "10.1.2.3", "zmq", 8080, 30.0, 5.0, "mixed", 8, False)
    assert args.served_model_name is None  # an empty variable is unset
    given = worker_parser("decode", environ=environ).parse_args(
        ["--router", "h:1", "--health-port", "9", "--max-num-seqs", "4", "--role", "decode"])
    assert (given.router, given.health_port, given.max_num_seqs, given.role, given.host) == \
           ("h:1", 9, 4, "decode", "0.0.0.0")


def test_without_environ_the_parser_reads_no_variable(monkeypatch):
    # the launcher's spec check (deploy/spec.py) parses the flags it hands on, not its own environment
    monkeypatch.setenv("NANO_PD_BLOCK_SIZE", "32")
    assert parse().block_size == EngineArgs().block_size
    with pytest.raises(SystemExit):
        worker_parser("prefill").parse_args([])  # and --router stays required


@pytest.mark.parametrize("variable, value, message", [
    ("NANO_PD_KV_TRANSPORT", "rdma", "$NANO_PD_KV_TRANSPORT: invalid choice 'rdma' (choose from auto, nixl, zmq)"),
    ("NANO_PD_BLOCK_SIZE", "1.5", "$NANO_PD_BLOCK_SIZE: invalid value '1.5' for --block-size"),
    ("NANO_PD_SPECULATIVE_CONFIG", "{method: ngram}", "$NANO_PD_SPECULATIVE_CONFIG: invalid value"),
    ("NANO_PD_ENABLE_PREFIX_CACHING", "maybe", "$NANO_PD_ENABLE_PREFIX_CACHING: expected true or false"),
])
def test_a_bad_variable_is_a_usage_error_naming_it(variable, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        worker_parser("prefill", environ={variable: value})
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_router_line_from_variables():
    from router.__main__ import parser

    environ = {"NANO_PD_MODEL": "/models/m", "NANO_PD_HOST": "0.0.0.0", "NANO_PD_PORT": "9000",
               "NANO_PD_CONTROL_HOST": "0.0.0.0", "NANO_PD_CONTROL_PORT": "9100", "NANO_PD_API_KEY": "secret",
               "NANO_PD_DRAIN_TIMEOUT": "30", "NANO_PD_HEARTBEAT_TIMEOUT": "3", "NANO_PD_REASONING_PARSER": "qwen3"}
    args = apply_environment(parser(), environ).parse_args([])
    assert (args.model, args.host, args.port, args.control_host, args.control_port, args.api_key,
            args.drain_timeout, args.heartbeat_timeout, args.reasoning_parser) == \
           ("/models/m", "0.0.0.0", 9000, "0.0.0.0", 9100, "secret", 30.0, 3.0, "qwen3")
    assert apply_environment(parser(), environ).parse_args(["--port", "9001"]).port == 9001
    assert parser().parse_args([]).api_key is None  # the variable is read only through apply_environment


def test_every_variable_is_named_after_its_dest_and_listed_in_help():
    from router.__main__ import parser

    for ap in (worker_parser("prefill", environ={}), worker_parser("decode", environ={}),
               apply_environment(parser(), {})):
        names = [env_name(a) for a in ap._actions if a.option_strings and a.dest != "help"]
        assert len(names) == len(set(names)) and all(n.replace("_", "").isalnum() and n.isupper() for n in names)
        assert "environment variable NANO_PD_<its dest in capitals>" in " ".join(ap.format_help().split())


@pytest.mark.parametrize("module, variable, value", [
    ("prefill_worker", "NANO_PD_DRAIN_TIMEOUT", "soon"),
    ("decode_worker", "NANO_PD_KV_LEASE", "soon"),
    ("router", "NANO_PD_PORT", "http"),
])
def test_the_commands_read_their_variables(module, variable, value):
    # a bad value refused by the real command (before any model loads) shows the command reads its environment
    env = {**os.environ, variable: value, "NANO_PD_ROUTER": "127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-m", module], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and f"${variable}: invalid value {value!r}" in done.stderr, done.stderr
