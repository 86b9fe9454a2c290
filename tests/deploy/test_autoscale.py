"""deploy/launch.py --autoscale, end to end on the serving tiny model: a burst of streams grows the decode pool,
quiet shrinks it by draining (the retired worker exits 0 and is not restarted), and every stream completes with
the offline engine's greedy output. And the Autoscaler's arithmetic against a stand-in supervisor."""
from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from deploy.launch import Autoscaler, planner_query, _parser
from tests.support.cluster_harness import ROOT, LocalCluster, free_port
from tests.workers.test_cluster import prompts

GROW_WAIT_S = 120.0  # a second decode worker loads and registers well within this on a busy 2-core box
SHRINK_WAIT_S = 60.0  # the 3 s scale-down window, a 0.5 s poll and a drain of an idle worker


class FakeSupervisor:
    def __init__(self, *names: str):
        self.children = {n: False for n in names}  # name -> retiring
        self.added: list[tuple[str, list[str]]] = []

    def names(self):
        return list(self.children)

    def retiring(self, name):
        return self.children[name]

    def add(self, name, cmd):
        self.children[name] = False
        self.added.append((name, cmd))

    def retire(self, name):
        self.children[name] = True


def test_autoscaler_adds_under_free_names_and_retires_the_newest():
    sup = FakeSupervisor("router", "prefill-0", "decode-0", "decode-2")
    scaler = Autoscaler("http://unused", lambda role, i: (f"{role}-{i}", ["cmd", role, str(i)]), interval=1.0)
    scaler.scale(sup, "decode", 4)
    assert [n for n, _ in sup.added] == ["decode-1", "decode-3"]
    assert scaler.local_workers(sup, "decode") == ["decode-0", "decode-1", "decode-2", "decode-3"]
    scaler.scale(sup, "decode", 1)
    assert {n for n, r in sup.children.items() if r} == {"decode-1", "decode-2", "decode-3"}
    assert scaler.local_workers(sup, "decode") == ["decode-0"]
    scaler.scale(sup, "prefill", 1)  # already there: nothing
    assert len(sup.added) == 2 and not sup.children["prefill-0"]


def test_autoscaler_survives_a_router_that_does_not_answer(capsys):
    scaler = Autoscaler(f"http://127.0.0.1:{free_port()}/debug/desired-replicas", lambda r, i: ("x", []), 60.0)
    assert scaler.step(FakeSupervisor("decode-0")) is False
    assert "did not answer" in capsys.readouterr().err


def test_planner_query_carries_the_flags():
    args = _parser().parse_args(["--autoscale", "--max-decode-workers", "3", "--scale-down-window", "30"])
    query = planner_query(args)
    assert "min_decode=1" in query and "max_decode=3" in query and "scale_down_window_s=30.0" in query


@pytest.mark.parametrize("argv, message", [
    (["--autoscale", "--min-decode-workers", "3", "--max-decode-workers", "2"], "need 0 <= min <= max"),
    (["--autoscale", "--no-router", "--router", "h:1"], "cannot be used with --no-router"),
    (["--autoscale", "--autoscale-interval", "0"], "--autoscale-interval must be positive"),
])
def test_bad_autoscale_flags_are_refused(argv, message, capsys):
    from deploy import launch

    with pytest.raises(SystemExit) as e:
        launch.main([*argv, "--dry-run"])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_a_burst_grows_the_decode_pool_and_quiet_drains_it(model_dir, offline):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.launch", "--model", model_dir, "--port", str(port),
         "--control-port", str(free_port()), "--kv-transport", "zmq", "--threads-per-worker", "1",
         "--decode-args=--num-kv-blocks 512", "--prefill-args=--num-kv-blocks 512",
         "--autoscale", "--min-decode-workers", "1", "--max-decode-workers", "2", "--max-prefill-workers", "1",
         "--autoscale-interval", "0.5", "--scale-down-window", "3", "--target-requests-per-worker", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("nano-pd ready:"):
                break
        assert lines and lines[-1].startswith("nano-pd ready:"), "".join(lines)
        threading.Thread(target=lines.extend, args=(proc.stdout,), daemon=True).start()  # never let the pipe fill
        c = LocalCluster.__new__(LocalCluster)  # only its HTTP helpers: launch owns the processes
        c.base_url, c.procs, c.log_dir = f"http://127.0.0.1:{port}", {}, "(launch output)"
        client = c.openai()
        name = os.path.basename(model_dir)

        def chat(p: str) -> dict:
            stream = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": p}], max_tokens=48, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

        # waves of 8 streams (4 per worker over the target of 2) until the second decode worker takes work
        results, deadline, wave = [], time.monotonic() + GROW_WAIT_S, 0
        with cf.ThreadPoolExecutor(8) as pool:
            while time.monotonic() < deadline and len(c.alive("decode")) < 2:
                ps = prompts(8, seed=100 + wave)
                results.append((ps, list(pool.map(chat, ps))))
                wave += 1
            assert len(c.alive("decode")) == 2, "".join(lines[-40:])
            ps = prompts(8, seed=100 + wave)  # one more wave across both decode workers
            results.append((ps, list(pool.map(chat, ps))))
        for ps, texts in results:
            assert texts == offline(ps, 48, ignore_eos=True)
        assert any("started decode-1" in x for x in lines), "".join(lines[-40:])

        # quiet: the planner's window passes, decode-1 is retired by SIGTERM, drains and exits 0, no restart
        c.wait_for(lambda: any(re.search(r"retired decode-1 \(pid \d+\) exited with code 0", x) for x in lines),
                   "decode-1 retired", SHRINK_WAIT_S)
        c.wait_for(lambda: len(c.alive("decode")) == 1, "one live decode worker", SHRINK_WAIT_S)
        assert not any("restarting" in x for x in lines), "".join(lines[-40:])
        assert chat("after the drain") == offline(["after the drain"], 48, ignore_eos=True)[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
