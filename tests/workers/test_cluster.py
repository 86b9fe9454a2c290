"""End to end: a real router and real prefill/decode worker processes, driven by the official openai client.

Greedy outputs are compared with the offline engine on the same tiny random-weight model, for 1P1D and 2P2D over
both KV transports, and with workers joining late (faults under load: tests/reliability/test_faults.py).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import random
import threading
import time

import pytest

from tests.support.cluster_harness import LocalCluster, assert_idle

WORDS = "alpha beta gamma delta river stone cloud paper seven green quiet window north table light music".split()


def prompts(n: int, seed: int = 0, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, words))) + f" #{i}" for i in range(n)]


def stream_chat(client, prompt: str, max_tokens: int, ignore_eos: bool = False, on_chunk=None) -> dict:
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": ignore_eos})
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices:
            if chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
                if on_chunk:
                    on_chunk(len(parts))
            finish = chunk.choices[0].finish_reason or finish
    return {"text": "".join(parts), "finish_reason": finish, "usage": usage}


def run_concurrently(fn, items, workers: int = 32) -> list:
    with cf.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def metric_value(text: str, series: str) -> float:
    """The value of one sample line of a Prometheus exposition (series = name plus its {labels}, if any)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise KeyError(series)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["zmq", "nixl"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 2)], ids=["1P1D", "2P2D"])
def test_concurrent_streams_match_offline(model_dir, offline, transport, shape):
    ps = prompts(32, seed=shape[0])
    expected = offline(ps, 24)
    with LocalCluster(model_dir, *shape, transport=transport) as c:
        client = c.openai()
        results = run_concurrently(lambda p: stream_chat(client, p, 24), ps)
        assert [r["text"] for r in results] == expected
        assert all(r["finish_reason"] in ("stop", "length") for r in results)
        assert all(r["usage"].completion_tokens >= 1 for r in results)
        for w in c.alive("prefill") + c.alive("decode"):
            assert w["assigned"] > 0, f"{w['worker_id']} got no traffic"
            assert w["kv_transport"] == transport
        assert_idle(c)


@pytest.mark.slow
def test_workers_started_later_take_traffic(model_dir, offline):
    ps = prompts(16, seed=7)
    with LocalCluster(model_dir, 1, 1, transport="zmq") as c:
        client = c.openai()
        assert [stream_chat(client, p, 8)["text"] for p in ps[:2]] == offline(ps[:2], 8)
        late_prefill, late_decode = c.add("prefill").pid, c.add("decode").pid
        results = run_concurrently(lambda p: stream_chat(client, p, 16), ps, workers=16)
        assert [r["text"] for r in results] == offline(ps, 16)
        by_pid = {w["pid"]: w for w in c.workers()}
        assert by_pid[late_prefill]["assigned"] > 0 and by_pid[late_decode]["assigned"] > 0


@pytest.fixture(scope="module")
def cluster(model_dir):
    with LocalCluster(model_dir, 1, 1, transport="zmq", worker_args=("--num-kv-blocks", "512", "--max-model-len",
                                                                     "256")) as c:
        yield c


def post(c: LocalCluster, body, raw: bool = False):
    status, _, got = c.post("/v1/chat/completions", body, raw=raw)
    return status, got


GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "tiny"}, 400, None),
    ({**GOOD, "messages": []}, 400, "messages"),
    ({**GOOD, "messages": "hello"}, 400, "messages"),
    ({**GOOD, "messages": [{"content": "no role"}]}, 400, None),
    ({**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({**GOOD, "model": "gpt-9"}, 404, "model"),
    ({**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": 10**12}, 400, "max_tokens"),
    ({**GOOD, "max_completion_tokens": 300}, 400, "max_completion_tokens"),
    ({**GOOD, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    ({**GOOD, "temperature": "hot"}, 400, "temperature"),
    ({**GOOD, "temperature": 5}, 400, "temperature"),
    ({**GOOD, "top_p": 0}, 400, None),
    ({**GOOD, "stream": "yes"}, 400, "stream"),
    ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({**GOOD, "seed": 1.5}, 400, "seed"),
    ({**GOOD, "n": "three"}, 400, "n"),
])
def test_bad_requests_get_openai_errors(cluster, body, status, param):
    got_status, got = post(cluster, body, raw=isinstance(body, bytes))
    assert got_status == status, got
    assert set(got) == {"error"} and got["error"]["message"] and got["error"]["type"]
    if param is not None:
        assert got["error"]["param"] == param


def test_good_request_after_bad_ones_and_usage(cluster, offline):
    status, got = post(cluster, {**GOOD, "max_tokens": 12, "temperature": 0, "unknown_field": {"ignored": True}})
    assert status == 200, got
    assert got["choices"][0]["message"]["content"] == offline(["hi"], 12)[0]
    assert got["usage"]["prompt_tokens"] > 0 and got["usage"]["completion_tokens"] >= 1
    assert cluster.get("/nope")[0] == 404 and "error" in json.loads(cluster.get("/nope")[1])
    models = json.loads(cluster.get("/v1/models")[1])
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == 256


def test_prefix_cache_hits_reported(cluster):
    client = cluster.openai()
    shared = "paper stone river " * 20
    first = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": shared + "one"}],
                                           max_tokens=2, temperature=0)
    second = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": shared + "two"}],
                                            max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= 32
    time.sleep(1.0)  # heartbeats carry the workers' counters
    metrics = cluster.get("/metrics")[1].decode()
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "nano_pd:kv_transfer_bytes_total",
                 'vllm:prefix_cache_hits_total{model_name="tiny",role="prefill"}', "vllm:num_requests_running"):
        assert name in metrics, name
    assert metric_value(metrics, 'vllm:prefix_cache_hits_total{model_name="tiny",role="prefill"}') >= 32


def test_stop_strings_and_client_disconnect(cluster, offline):
    client = cluster.openai()
    full = offline(["stone"], 40, ignore_eos=True)[0]
    stop = full[10:13]
    got = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "stone"}],
                                         max_tokens=40, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert got.choices[0].message.content == full[:full.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    # a client that walks away mid-stream frees its blocks
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "cloud"}],
                                            max_tokens=200, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    assert_idle(cluster)


def test_no_live_worker_is_a_clear_503(model_dir):
    # a request waits --migrate-wait for a missing role to join before it is refused
    with LocalCluster(model_dir, 0, 0, router_args=("--migrate-wait", "1")) as c:
        assert c.get("/health")[0] == 503
        status, got = post(c, GOOD)
        assert status == 503 and "no live prefill or decode worker" in got["error"]["message"]
        c.add("prefill")
        status, got = post(c, GOOD)
        assert status == 503 and "no live decode worker" in got["error"]["message"]
        c.add("decode")
        assert post(c, GOOD)[0] == 200
        c.kill("decode", 0)
        c.wait_for(lambda: not c.alive("decode"), "the decode worker to be declared dead", 5)
        status, got = post(c, GOOD)
        assert status == 503 and "no live decode worker" in got["error"]["message"]


@pytest.mark.slow
def test_launch_starts_supervises_and_stops_a_cluster(model_dir, offline):
    """deploy/launch.py with real processes: ready line, a request, a crashed worker restarted, clean SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    from tests.support.cluster_harness import ROOT, free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "deploy.launch", "--model", model_dir, "--port", str(port),
                             "--control-port", str(free_port()), "--kv-transport", "zmq", "--threads-per-worker", "1",
                             "--decode-args=--num-kv-blocks 512", "--prefill-args=--num-kv-blocks 512"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("nano-pd ready:"):
                break
        assert lines and lines[-1].startswith(f"nano-pd ready: http://127.0.0.1:{port}/v1"), "".join(lines)
        threading.Thread(target=lines.extend, args=(proc.stdout,), daemon=True).start()  # never let the pipe fill
        c = LocalCluster.__new__(LocalCluster)  # only its HTTP helpers: launch owns the processes
        c.base_url, c.procs, c.log_dir = f"http://127.0.0.1:{port}", {}, "(launch output)"
        name = os.path.basename(model_dir)
        status, got = post(c, {**GOOD, "model": name, "max_tokens": 12, "temperature": 0})
        assert status == 200 and got["choices"][0]["message"]["content"] == offline(["hi"], 12)[0]
        decode_pid = c.alive("decode")[0]["pid"]
        os.kill(decode_pid, signal.SIGKILL)
        c.wait_for(lambda: any(w["pid"] != decode_pid for w in c.alive("decode")), "a restarted decode worker", 60)
        assert post(c, {**GOOD, "model": name})[0] == 200
        children = [w["pid"] for w in c.workers() if w["alive"]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        for pid in children:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_mismatched_worker_is_refused_with_a_clear_error(cluster):
    proc = cluster.add("decode", wait=False, extra=("--block-size", "32"))
    assert proc.wait(120) == 2
    log = open(f"{cluster.log_dir}/decode-{len(cluster.procs['decode']) - 1}.log").read()
    assert "refused this worker" in log and "differs from the cluster's" in log
    cluster.procs["decode"].pop()  # it is gone; the other tests' cluster is untouched
    assert cluster.get("/health")[0] == 200


@pytest.mark.slow
def test_prefix_aware_prefill_routing(model_dir):
    shared = "music table light north window quiet " * 12
    with LocalCluster(model_dir, 2, 1, transport="zmq") as c:
        client = c.openai()
        cached = []
        for i in range(6):
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"{shared} {i}"}],
                                               max_tokens=2, temperature=0)
            cached.append(r.usage.prompt_tokens_details.cached_tokens)
        # the first request fills one prefill worker's cache; every later one is routed there and hits it
        assert cached[0] == 0 and all(n >= 64 for n in cached[1:]), cached
        assigned = sorted(w["assigned"] for w in c.alive("prefill"))
        assert assigned == [0, 6]
