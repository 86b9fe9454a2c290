"""deploy/launch.py: the Supervisor (with small `python -c` children standing in for router and workers), the
command lines `--dry-run` prints, and model resolution."""
from __future__ import annotations

import io
import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from deploy import launch
from deploy.supervisor import Supervisor

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie nobody reaped yet (containers often lack an init that reaps) is dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def child(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


# ---------------------------------------------------------------------------------------------------------------
# Supervisor
# ---------------------------------------------------------------------------------------------------------------

def test_restarts_a_child_killed_with_sigkill():
    out = io.StringIO()
    sup = Supervisor(out=out, backoff_initial=0.1)
    sup.add("w", child("import time; print('up', flush=True); time.sleep(30)"))
    sup.add("other", child("import time; time.sleep(30)"))
    with sup:
        assert sup.run(until=lambda: out.getvalue().count("[w] up") == 1, timeout=10)
        first, other = sup.pids()["w"], sup.pids()["other"]
        os.kill(first, signal.SIGKILL)
        assert sup.run(until=lambda: out.getvalue().count("[w] up") == 2, timeout=10), out.getvalue()
        second = sup.pids()["w"]
        assert second is not None and second != first
        assert alive(second) and not alive(first)
        assert sup.starts("w") == 2 and not sup.given_up("w")
        assert sup.pids()["other"] == other and sup.starts("other") == 1  # the others are left alone
        assert "w (pid %d) was killed by SIGKILL; restarting in 0.1 s" % first in out.getvalue()
    assert not alive(second) and not alive(other)


def test_backoff_doubles_up_to_the_cap_then_gives_up_keeping_the_others(tmp_path):
    starts_file = tmp_path / "starts"
    out = io.StringIO()
    sup = Supervisor(out=out, backoff_initial=0.1, backoff_max=0.4, max_crashes=5, crash_window=60)
    sup.add("crasher", child(f"""
        import sys, time
        with open({str(starts_file)!r}, "a") as f:
            f.write(f"{{time.monotonic()}}\\n")
        sys.exit(3)
    """))
    sup.add("steady", child("import time; time.sleep(30)"))
    with sup:
        assert sup.run(until=lambda: sup.given_up("crasher"), timeout=10), out.getvalue()
        steady = sup.pids()["steady"]
        log = out.getvalue()
        # the crasher gets no sixth start, while the healthy neighbour keeps running
        sup.run(timeout=0.6)
        assert sup.starts("crasher") == 5 and sup.pids()["crasher"] is None
        assert sup.pids()["steady"] == steady and alive(steady) and not sup.given_up("steady")
    delays = [float(line.rsplit("restarting in ", 1)[1].split()[0])
              for line in log.splitlines() if line.startswith("[supervisor] crasher") and "restarting in" in line]
    assert delays == [0.1, 0.2, 0.4, 0.4]
    assert "GIVING UP on crasher: it crashed 5 times within 60 s" in log
    assert "exited with code 3" in log
    # CLOCK_MONOTONIC is one clock for the whole machine, so the children's stamps measure the real gaps
    starts = [float(x) for x in starts_file.read_text().split()]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(gaps) == 4
    for gap, delay in zip(gaps, delays):
        assert delay <= gap < delay + 2.0, (gaps, delays)


def test_backoff_resets_after_a_healthy_run_and_old_crashes_leave_the_window():
    out = io.StringIO()
    # every run lasts 0.3 s, longer than healthy_after: each crash starts over at the initial delay; crashes come
    # about 0.4 s apart, so never 3 of them within 0.5 s
    sup = Supervisor(out=out, backoff_initial=0.1, healthy_after=0.2, max_crashes=3, crash_window=0.5)
    sup.add("flaky", child("import sys, time; time.sleep(0.3); sys.exit(1)"))
    with sup:
        assert sup.run(until=lambda: sup.starts("flaky") >= 5, timeout=15), out.getvalue()
        assert not sup.given_up("flaky")
    delays = [line.rsplit("restarting in ", 1)[1] for line in out.getvalue().splitlines() if "restarting in" in line]
    assert len(delays) >= 4 and set(delays) == {"0.1 s"}


def test_leaving_the_with_block_by_an_exception_stops_children_and_their_helpers(tmp_path):
    out = io.StringIO()
    sup = Supervisor(out=out, stop_timeout=0.5)
    # a child that starts a helper of its own, one that ignores SIGTERM and outlives its parent: it shares the
    # child's process group, and the final SIGKILL to that group must reach it
    helper_code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('armed', flush=True); " \
                  "time.sleep(60)"
    sup.add("parent", child(f"""
        import subprocess, sys, time
        helper = subprocess.Popen([sys.executable, "-c", {helper_code!r}])
        print("helper", helper.pid, flush=True)
        time.sleep(60)
    """))
    with pytest.raises(RuntimeError):
        with sup:
            assert sup.run(until=lambda: "[parent] armed" in out.getvalue(), timeout=10), out.getvalue()
            pid = sup.pids()["parent"]
            helper = int(out.getvalue().split("[parent] helper ")[1].split()[0])
            assert alive(pid) and alive(helper)
            raise RuntimeError("launch failed half-way")
    assert not alive(pid)
    assert wait_until(lambda: not alive(helper), 2)


SUPERVISED_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
from deploy.supervisor import Supervisor, install_signal_handlers

py = sys.executable
sup = Supervisor(stop_timeout={stop_timeout})
install_signal_handlers(sup)
sup.add("sleeper", [py, "-c", "import time; time.sleep(60)"])
sup.add("stubborn", [py, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                               "print('ignoring SIGTERM', flush=True); time.sleep(60)"])
sup.add("parent", [py, "-c", "import subprocess, time; h = subprocess.Popen(['sleep', '60']); "
                             "print('helper', h.pid, flush=True); time.sleep(60)"])
with sup:
    sup.run(until=lambda: all(sup.pids().values()))
    print("PIDS", json.dumps(sup.pids()), flush=True)
    sup.run()
print("CLEAN EXIT", flush=True)
"""


class ScriptRun:
    """A supervising script in a subprocess, its stdout collected line by line without blocking the test."""

    def __init__(self, tmp_path, stop_timeout: float):
        script = tmp_path / "supervised.py"
        script.write_text(SUPERVISED_SCRIPT.format(repo=REPO, stop_timeout=stop_timeout))
        self.proc = subprocess.Popen([PY, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, predicate, timeout: float = 15) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate(self.lines):
            try:
                self.lines.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                return False
        return True

    def pids(self) -> list[int]:
        """Every child and the helper one of them started."""
        ready = lambda lines: (any(x.startswith("PIDS ") for x in lines)
                               and any(x.startswith("[stubborn] ignoring") for x in lines)
                               and any(x.startswith("[parent] helper ") for x in lines))
        assert self.wait_for(ready), self.lines
        pids = list(json.loads(next(x for x in self.lines if x.startswith("PIDS "))[5:]).values())
        pids.append(int(next(x for x in self.lines if x.startswith("[parent] helper ")).split()[2]))
        assert all(alive(p) for p in pids)
        return pids

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def test_sigterm_to_the_supervisor_stops_every_child_within_the_deadline(tmp_path):
    run = ScriptRun(tmp_path, stop_timeout=1.0)
    try:
        pids = run.pids()
        t0 = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        rc = run.proc.wait(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        run.kill()
    run.wait_for(lambda lines: any("CLEAN EXIT" in x for x in lines), timeout=2)
    assert rc == 0 and any("CLEAN EXIT" in x for x in run.lines), run.lines
    # the stubborn child costs the whole grace period, then SIGKILL; nothing waits longer than that
    assert 1.0 <= elapsed < 4.0, elapsed
    assert any("stubborn" in x and "still running after SIGTERM; killing it" in x for x in run.lines), run.lines
    assert wait_until(lambda: not any(alive(p) for p in pids), 2), [p for p in pids if alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux only")
def test_children_die_with_a_sigkilled_supervisor(tmp_path):
    run = ScriptRun(tmp_path, stop_timeout=1.0)
    try:
        pids = run.pids()
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait(timeout=5)
    finally:
        run.kill()
    sleeper, parent = pids[0], pids[2]  # stubborn ignores the SIGTERM that the kernel sends it; clean it up here
    assert wait_until(lambda: not alive(sleeper) and not alive(parent), 5)
    for p in pids:
        if alive(p):
            os.kill(p, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------------------------

def dry_run(capsys, *argv: str) -> dict[str, list[str]]:
    assert launch.main(["--dry-run", *argv]) == 0
    commands = {}
    for line in capsys.readouterr().out.splitlines():
        cmd, name = line.split("  # ")
        commands[name] = shlex.split(cmd)
    return commands


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_dry_run_from_flags(capsys, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    cmds = dry_run(capsys, "--model", "/models/tiny-llama/", "--prefill-workers", "2", "--decode-workers", "3",
                   "--host", "10.1.2.3", "--port", "9000", "--kv-transport", "zmq",
                   "--prefill-args", "--max-num-batched-tokens 4096 --speculative-config '{\"method\": \"ngram\"}'",
                   "--decode-args", "--max-num-seqs 8")
    assert list(cmds) == ["router", "prefill-0", "prefill-1", "decode-0", "decode-1", "decode-2"]
    assert cmds["router"] == [PY, "-m", "router", "--model", "/models/tiny-llama/", "--served-model-name", "tiny-llama",
                              "--host", "10.1.2.3", "--port", "9000", "--control-port", "9100"]
    assert cmds["prefill-1"] == [PY, "-m", "prefill_worker", "--router", "10.1.2.3:9100",
                                 "--model", "/models/tiny-llama/", "--served-model-name", "tiny-llama",
                                 "--host", "10.1.2.3", "--kv-transport", "zmq",
                                 "--threads", "3", "--name", "prefill-1",
                                 "--max-num-batched-tokens", "4096", "--speculative-config", '{"method": "ngram"}']
    assert cmds["decode-2"][:3] == [PY, "-m", "decode_worker"]
    assert cmds["decode-2"][-4:] == ["--name", "decode-2", "--max-num-seqs", "8"]
    assert flag(cmds["decode-2"], "--threads") == "5"  # 16 cores // 3 decode workers
    # (prefill-1's 3 above: 16 cores // 5 workers, on top)
    # each tensor-parallel rank is a process of its own: 2 x 2 prefill ranks + 3 decode workers share 16 cores
    cmds = dry_run(capsys, "--prefill-workers", "2", "--decode-workers", "3",
                   "--prefill-args", "--tensor-parallel-size 2")
    assert (flag(cmds["prefill-1"], "--threads"), flag(cmds["decode-2"], "--threads")) == ("2", "5")
    cmds = dry_run(capsys, "--prefill-workers", "2", "--decode-workers", "3",
                   "--decode-args=--tensor-parallel-size=2")
    assert (flag(cmds["prefill-1"], "--threads"), flag(cmds["decode-2"], "--threads")) == ("2", "2")


def test_dry_run_defaults_pass_the_default_name_through(capsys, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cmds = dry_run(capsys)
    assert list(cmds) == ["router", "prefill-0", "decode-0"]
    assert flag(cmds["router"], "--model") == "SmolLM2-135M-Instruct"
    assert flag(cmds["router"], "--served-model-name") == "SmolLM2-135M-Instruct"
    assert (flag(cmds["router"], "--port"), flag(cmds["router"], "--control-port")) == ("8000", "8100")
    assert flag(cmds["decode-0"], "--router") == "127.0.0.1:8100"
    assert flag(cmds["decode-0"], "--kv-transport") == "auto"
    # on 2 cores decode gets both, prefill one (README "Serving shapes")
    assert (flag(cmds["prefill-0"], "--threads"), flag(cmds["decode-0"], "--threads")) == ("1", "2")


def test_dry_run_from_a_toml_file_with_flags_overriding_it(capsys, tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent("""
        model = "/models/tiny.gguf"
        host = "10.0.0.1"
        port = 7000
        control_port = 7500
        kv_transport = "nixl"
        threads_per_worker = 4
        [prefill]
        workers = 2
        args = "--max-num-batched-tokens 512"
        [decode]
        workers = 1
        args = ["--max-num-seqs", "16"]
    """))
    cmds = dry_run(capsys, "--config", str(spec))
    assert list(cmds) == ["router", "prefill-0", "prefill-1", "decode-0"]
    assert cmds["router"][3:] == ["--model", "/models/tiny.gguf", "--served-model-name", "tiny",
                                  "--host", "10.0.0.1", "--port", "7000", "--control-port", "7500"]
    assert cmds["prefill-1"][3:] == ["--router", "10.0.0.1:7500", "--model", "/models/tiny.gguf",
                                     "--served-model-name", "tiny", "--host", "10.0.0.1",
                                     "--kv-transport", "nixl", "--threads", "4", "--name", "prefill-1",
                                     "--max-num-batched-tokens", "512"]
    assert cmds["decode-0"][-2:] == ["--max-num-seqs", "16"]

    cmds = dry_run(capsys, "--config", str(spec), "--port", "9000", "--decode-workers", "2", "--kv-transport", "zmq",
                   "--decode-args", "--max-num-seqs 4", "--threads-per-worker", "2")
    assert list(cmds) == ["router", "prefill-0", "prefill-1", "decode-0", "decode-1"]
    assert flag(cmds["router"], "--port") == "9000"
    assert flag(cmds["router"], "--control-port") == "7500"  # the file's, since no flag named it
    assert flag(cmds["decode-1"], "--kv-transport") == "zmq" and flag(cmds["decode-1"], "--threads") == "2"
    assert cmds["decode-1"][-2:] == ["--max-num-seqs", "4"]
    assert cmds["prefill-0"][-2:] == ["--max-num-batched-tokens", "512"]  # untouched by --decode-args


def test_mixed_workers_alone_or_beside_prefill_and_decode(capsys, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cmds = dry_run(capsys, "--mixed-workers", "1")  # no P/D by default once there are mixed workers
    assert list(cmds) == ["router", "mixed-0"]
    assert cmds["mixed-0"][:5] == [PY, "-m", "decode_worker", "--role", "mixed"]
    assert flag(cmds["mixed-0"], "--threads") == "2"  # the only worker gets every core
    cmds = dry_run(capsys, "--mixed-workers", "2", "--prefill-workers", "1", "--decode-workers", "1",
                   "--mixed-args", "--max-num-seqs 8")
    assert list(cmds) == ["router", "prefill-0", "decode-0", "mixed-0", "mixed-1"]
    assert cmds["mixed-1"][-2:] == ["--max-num-seqs", "8"] and "--max-num-seqs" not in cmds["decode-0"]
    with pytest.raises(SystemExit):  # a mixed worker is a decode worker's role: the prefill flags do not apply
        launch.main(["--dry-run", "--mixed-workers", "1", "--mixed-args", "--kv-lease x"])
    assert "mixed worker flags" in capsys.readouterr().err


def test_engine_flags_on_the_launcher_reach_every_worker_and_roles_override_them(capsys, tmp_path):
    cmds = dry_run(capsys, "--dtype", "bfloat16", "--max-num-seqs", "32", "--no-prefix-caching",
                   "--speculative-config", '{"method": "ngram"}', "--decode-args", "--max-num-seqs 8")
    common = ["--dtype", "bfloat16", "--max-num-seqs", "32", "--no-prefix-caching",
              "--speculative-config", '{"method": "ngram"}']
    assert cmds["prefill-0"][-len(common):] == common
    assert cmds["decode-0"][-len(common) - 2:] == common + ["--max-num-seqs", "8"]  # the role's own come last
    spec = tmp_path / "spec.toml"
    spec.write_text('args = "--block-size 32"\n[decode]\nargs = "--dtype float32"\n')
    cmds = dry_run(capsys, "--config", str(spec), "--dtype", "bfloat16")
    assert cmds["prefill-0"][-4:] == ["--block-size", "32", "--dtype", "bfloat16"]  # the file's, then the flags
    assert cmds["decode-0"][-6:] == ["--block-size", "32", "--dtype", "bfloat16", "--dtype", "float32"]
    for bad in (["--dtype", "float8"], ["--max-num-seqs", "many"]):  # checked by the workers' own parsers
        with pytest.raises(SystemExit):
            launch.main(["--dry-run", *bad])
        assert "worker flags" in capsys.readouterr().err


def test_no_router_starts_only_workers_pointing_at_the_remote_router(capsys):
    cmds = dry_run(capsys, "--no-router", "--router", "10.0.0.1:8100", "--host", "10.0.0.2",
                   "--prefill-workers", "0", "--decode-workers", "2")
    assert list(cmds) == ["decode-0", "decode-1"]
    assert flag(cmds["decode-1"], "--router") == "10.0.0.1:8100"
    assert flag(cmds["decode-1"], "--host") == "10.0.0.2"


@pytest.mark.parametrize("argv", [
    ["--no-router"],                                    # joining needs the router's address
    ["--router", "10.0.0.1:8100"],                      # a remote router, yet one would be started here
    ["--prefill-workers", "-1"],
    ["--kv-transport", "rdma"],
])
def test_contradictory_or_invalid_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        launch.main(["--dry-run", *argv])
    assert e.value.code == 2


@pytest.mark.parametrize("text", ['prot = 8000', 'port = "8000"', '[decode]\nworkrs = 2', 'kv_transport = "rdma"'])
def test_bad_spec_files_are_refused(tmp_path, capsys, text):
    spec = tmp_path / "bad.toml"
    spec.write_text(text + "\n")
    with pytest.raises(SystemExit) as e:
        launch.main(["--dry-run", "--config", str(spec)])
    assert e.value.code == 2


@pytest.mark.parametrize("where", ["flag", "file"])
def test_a_flag_the_workers_would_refuse_is_a_launcher_error_before_anything_starts(where, tmp_path, capsys,
                                                                                     monkeypatch):
    monkeypatch.setattr(Supervisor, "_spawn", lambda self, child: pytest.fail("nothing may start"))
    spec = tmp_path / "spec.toml"
    spec.write_text('[decode]\nargs = ["--max-num-seqs", "8", "--note", "a b"]\n')
    argv = ["--decode-args", "--max-num-seqs 8 --note 'a b'"] if where == "flag" else ["--config", str(spec)]
    with pytest.raises(SystemExit) as e:
        launch.main(argv)
    assert e.value.code == 2
    assert "decode worker flags" in (err := capsys.readouterr().err) and "unrecognized arguments: --note a b" in err
    for bad, message in [("--max-num-seqs eight", "argument --max-num-seqs: invalid int value: 'eight'"),
                         ("--decode-mode fast", "argument --decode-mode: invalid choice: 'fast'"),
                         ("--speculative-config '{nope'", "argument --speculative-config: invalid loads value")]:
        with pytest.raises(SystemExit):
            launch.main(["--dry-run", "--prefill-args", bad])
        assert message in capsys.readouterr().err
    # the decode role's own flags are known to its parser only
    assert dry_run(capsys, "--decode-args", "--kv-lease 5")["decode-0"][-2:] == ["--kv-lease", "5"]
    with pytest.raises(SystemExit):
        launch.main(["--dry-run", "--prefill-args", "--kv-lease 5"])
    assert "prefill worker flags" in capsys.readouterr().err


def test_bad_spec_file_errors_name_the_file_and_the_key(tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    for text, message in [('port = "8000"', "Expected `int`, got `str` - at `$.port`"),
                          ('[decode]\nworkrs = 2', "unknown field `workrs` - at `$.decode`"),
                          ('threads_per_worker = true', "Expected `int | null`, got `bool`"),
                          ('[prefill]\nargs = [1]', "at `$.prefill.args[0]`")]:
        spec.write_text(text + "\n")
        with pytest.raises(SystemExit):
            launch.main(["--dry-run", "--config", str(spec)])
        assert f"{spec}: " in (err := capsys.readouterr().err) and message in err, err


def test_deploy_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import deploy.launch, deploy.spec, deploy.supervisor"
    done = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_shipped_specs_load(capsys):
    cmds = dry_run(capsys, "--config", os.path.join(REPO, "deploy", "local-1p1d.toml"))
    assert list(cmds) == ["router", "prefill-0", "decode-0"]
    cmds = dry_run(capsys, "--config", os.path.join(REPO, "deploy", "two-hosts.example.toml"),
                   "--no-router", "--router", "10.0.0.1:8100", "--host", "10.0.0.2",
                   "--prefill-workers", "0", "--decode-workers", "2")
    assert list(cmds) == ["decode-0", "decode-1"]
    assert flag(cmds["decode-0"], "--kv-transport") == "zmq"


# ---------------------------------------------------------------------------------------------------------------
# Model resolution
# ---------------------------------------------------------------------------------------------------------------

def test_a_folder_is_passed_as_is_and_served_under_its_basename(monkeypatch):
    import common.names

    monkeypatch.setattr(common.names, "resolve_model", lambda *a, **k: pytest.fail("a folder needs no conversion"))
    assert launch.served_model("/models/Llama-3.2-1B") == ("/models/Llama-3.2-1B",) * 2 + ("Llama-3.2-1B",)
    assert launch.served_model("/models/Llama-3.2-1B/") == ("/models/Llama-3.2-1B/",) * 2 + ("Llama-3.2-1B",)


def test_gguf_and_the_default_model_are_converted_once_and_keep_their_names(monkeypatch):
    """The router reads the float32 folder; the workers get the file itself (so they keep its quantized blocks),
    its folder for their dtype converted before any of them starts."""
    import common.names

    calls = []

    def fake_resolve(model, dtype="float32"):
        calls.append((model, dtype))
        return f"/cache/nano-pd/gguf/converted-{dtype}"

    monkeypatch.setattr(common.names, "resolve_model", fake_resolve)
    gguf = "/models/Qwen3-0.6B-Q8_0.gguf"
    assert launch.served_model(gguf) == ("/cache/nano-pd/gguf/converted-float32", gguf, "Qwen3-0.6B-Q8_0")
    assert launch.served_model("SmolLM2-135M-Instruct", {"bfloat16", "auto"}) == \
        ("/cache/nano-pd/gguf/converted-float32", "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct")
    assert calls == [(gguf, "float32"), ("SmolLM2-135M-Instruct", "bfloat16"), ("SmolLM2-135M-Instruct", "float32")]
    # a dry run names the model without converting it
    assert launch.served_model("/models/x.gguf", convert=False) == ("/models/x.gguf", "/models/x.gguf", "x")
    assert len(calls) == 3


def test_not_ready_in_time_shuts_down_and_exits_1(tmp_path, monkeypatch, capsys):
    # nothing answers /health here (the router and workers are started but cannot come up in a bare checkout, or
    # come up without answering in 1 s): launch must give up, stop every child and say why
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = []
    real_spawn = Supervisor._spawn

    def spawn(self, child):
        child.cmd = [PY, "-c", "import time; time.sleep(30)"]  # stand-ins that never serve
        real_spawn(self, child)
        started.append(child.proc.pid)

    monkeypatch.setattr(Supervisor, "_spawn", spawn)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        rc = launch.main(["--model", str(tmp_path), "--port", str(port), "--wait-ready", "1"])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert rc == 1
    assert len(started) == 3 and not any(alive(p) for p in started)
    assert "did not answer 200 within 1 s" in capsys.readouterr().err
