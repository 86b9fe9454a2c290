"""benchmarks/serving.py against a fake OpenAI-compatible server with known timing.

The fake streams one chunk per token: the first after FIRST_DELAY_S, the rest GAP_S apart, then a finish chunk, a
usage chunk and `data: [DONE]`, so TTFT ~ FIRST_DELAY_S and ITL ~ TPOT ~ GAP_S. /flaky/v1 answers 500 to every
third request. It runs in a uvicorn thread of this process, so the benchmark and the server share the GIL: the
upper bounds on timings are loose on purpose (2-core CI boxes).
"""
import asyncio
import itertools
import json
import math
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

import fastapi  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402


def _load_serving():
    """benchmarks/ is not a package; load the script by path. Putting benchmarks/ on sys.path instead would shadow
    the kv_transfer package with benchmarks/kv_transfer.py in every process spawned later in the session."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py"
    spec = importlib.util.spec_from_file_location("serving", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serving"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


serving = _load_serving()

FIRST_DELAY_S = 0.05
GAP_S = 0.01
MODEL = "fake-model"


def _make_app():
    app = fastapi.FastAPI()
    app.state.bodies = []
    app.state.flaky_counter = itertools.count()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def stream(body):
        n = body["max_tokens"]
        prompt_tokens = len(body["messages"][0]["content"].split())
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body["model"]}

        def chunk(**kw):
            return f"data: {json.dumps(base | kw)}\n\n"

        yield chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for i in range(n):
            await asyncio.sleep(FIRST_DELAY_S if i == 0 else GAP_S)
            yield chunk(choices=[{"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}])
        yield chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "length"}])
        yield chunk(choices=[], usage={"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                       "total_tokens": prompt_tokens + n})
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request):
        body = await request.json()
        app.state.bodies.append(body)
        return StreamingResponse(stream(body), media_type="text/event-stream")

    @app.get("/flaky/v1/models")
    async def flaky_models():
        return await models()

    @app.post("/flaky/v1/chat/completions")
    async def flaky_chat(request: fastapi.Request):
        body = await request.json()
        if next(app.state.flaky_counter) % 3 == 2:
            return JSONResponse({"error": {"message": "injected failure", "type": "server_error"}}, status_code=500)
        return StreamingResponse(stream(body), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server():
    app = _make_app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here and handed to uvicorn, so no other process can take the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        assert time.time() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield app, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)
    sock.close()


def _check_ordered_positive(summary):
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        st = summary[key]
        assert 0 < st["p50"] <= st["p90"] <= st["p99"], (key, st)


def _run(**kw):
    return asyncio.run(serving.run_benchmark(serving.BenchConfig(**kw)))


def test_fixed_concurrency(fake_server, tmp_path):
    app, url = fake_server
    app.state.bodies.clear()
    png, js = tmp_path / "cdf.png", tmp_path / "runs.json"
    rec = _run(base_url=f"{url}/v1", num_prompts=8, input_len=32, output_len=8, concurrency=4, plot=str(png),
               json=str(js), label="fake")
    s = rec["summary"]
    assert rec["model"] == MODEL and rec["label"] == "fake"
    assert (s["completed"], s["failed"]) == (8, 0) and s["errors"] == {}
    assert s["mean_prompt_tokens"] == 32 and s["mean_completion_tokens"] == 8 and s["short_outputs"] == 0
    _check_ordered_positive(s)
    assert FIRST_DELAY_S * 900 <= s["ttft_ms"]["p50"] <= FIRST_DELAY_S * 1000 + 60
    assert GAP_S * 900 <= s["itl_ms"]["p50"] <= GAP_S * 1000 + 30
    assert GAP_S * 900 <= s["tpot_ms"]["p50"] <= GAP_S * 1000 + 30
    # two waves of 4, each ~ FIRST_DELAY_S + 7 * GAP_S
    one = FIRST_DELAY_S + 7 * GAP_S
    assert 2 * one * 0.9 <= s["duration_s"] <= 2 * one + 1.0
    assert s["output_throughput"] == pytest.approx(8 * 8 / s["duration_s"])
    assert s["total_throughput"] == pytest.approx(8 * (8 + 32) / s["duration_s"])
    assert s["goodput"] == pytest.approx(s["request_throughput"])  # default SLOs are far above these timings
    # never more than 4 requests in flight
    spans = sorted((r["start"], 1) for r in rec["requests"]) + sorted(
        (r["start"] + r["latency"], -1) for r in rec["requests"])
    assert max(itertools.accumulate(d for _, d in sorted(spans, key=lambda x: (x[0], x[1])))) <= 4

    body = app.state.bodies[0]
    assert body["stream"] is True and body["ignore_eos"] is True and body["max_tokens"] == 8
    assert body["temperature"] == 0 and body["stream_options"] == {"include_usage": True}
    assert body["messages"][0]["role"] == "user"

    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads(js.read_text())
    assert len(runs) == 1 and len(runs[0]["requests"]) == 8
    table = serving.format_table([rec])
    assert table.count("\n") == 2 and table.splitlines()[2].startswith("| fake | 8/0 |")

    # --json appends; a tight TPOT SLO makes goodput zero
    rec2 = _run(base_url=f"{url}/v1", num_prompts=2, input_len=4, output_len=4, concurrency=2, json=str(js),
                slo_tpot_ms=1)
    assert len(json.loads(js.read_text())) == 2
    assert rec2["summary"]["completed"] == 2 and rec2["summary"]["goodput"] == 0


def test_poisson_rate_and_failures(fake_server, tmp_path):
    app, url = fake_server
    app.state.flaky_counter = itertools.count()
    rate = 20.0
    rec = _run(base_url=f"{url}/flaky/v1", num_prompts=9, input_len=16, output_len=4, request_rate=rate, seed=3,
               model=MODEL)
    s = rec["summary"]
    assert (s["completed"], s["failed"]) == (6, 3)
    assert list(s["errors"]) and all(e.startswith("HTTP 500") for e in s["errors"])
    assert sum(s["errors"].values()) == 3
    _check_ordered_positive(s)
    assert FIRST_DELAY_S * 900 <= s["ttft_ms"]["p50"] <= FIRST_DELAY_S * 1000 + 60
    # arrivals follow the seeded Poisson schedule, not all at once
    starts = sorted(r["start"] for r in rec["requests"])
    expected = serving.arrival_times(9, rate, 3)
    assert all(abs(a - b) < 0.05 for a, b in zip(starts, expected))
    assert expected[-1] > 0 and len(set(expected)) == 9


def test_unreachable_server_counts_failures():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens once closed
    rec = _run(base_url=f"http://127.0.0.1:{port}/v1", num_prompts=3, input_len=4, output_len=4, model=MODEL,
               timeout=5)
    s = rec["summary"]
    assert (s["completed"], s["failed"]) == (0, 3) and s["goodput"] == 0
    assert s["ttft_ms"]["p50"] is None
    assert "| 0/3 |" in serving.format_table([rec])


def test_helpers():
    assert serving.make_prompts(3, 10, 0) == serving.make_prompts(3, 10, 0)
    assert serving.make_prompts(3, 10, 0) != serving.make_prompts(3, 10, 1)
    assert all(len(p.split()) == 10 for p in serving.make_prompts(3, 10, 0))
    assert serving.arrival_times(4, math.inf, 0) == [0.0] * 4
    gaps = [b - a for a, b in itertools.pairwise(serving.arrival_times(2000, 10.0, 0))]
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.1)
    assert serving.percentile([1, 2, 3, 4], 50) == 2.5 and serving.percentile([], 50) is None
    assert serving.percentile([5.0], 99) == 5.0
    cfg = serving.parse_args(["--concurrency", "4", "--request-rate", "inf", "--label", "x", "--plot", "a.png"])
    assert cfg.concurrency == 4 and math.isinf(cfg.request_rate) and cfg.label == "x" and cfg.plot == "a.png"


def test_colocated_engine(tiny_model_factory, tmp_path):
    from transformers import AutoTokenizer

    from tests.support.tiny_models import TinyConfig

    folder = str(tiny_model_factory(TinyConfig(arch="llama", num_heads=4, num_kv_heads=2, head_dim=32,
                                               hidden_size=128, num_layers=2, vocab_size=512)))
    js = tmp_path / "runs.json"
    rec = serving.run_colocated(serving.BenchConfig(colocated=folder, dtype="float32", num_prompts=8, input_len=16,
                                                    output_len=8, concurrency=4, json=str(js)))
    s = rec["summary"]
    assert rec["label"] == "nano-pd colocated" and rec["engine"]["max_num_seqs"] == 4
    assert (s["completed"], s["failed"]) == (8, 0) and s["errors"] == {}
    assert s["mean_completion_tokens"] == 8 and s["short_outputs"] == 0
    assert all(r["completion_tokens"] == 8 and r["chunks"] == 8 and len(r["itl"]) == 7 for r in rec["requests"])
    _check_ordered_positive(s)
    # prompts are rendered and tokenized as the router does
    tok = AutoTokenizer.from_pretrained(folder)
    for r, p in zip(rec["requests"], serving.make_prompts(8, 16, 0)):
        text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        assert r["prompt_tokens"] == len(tok.encode(text, add_special_tokens=False))
    # never more than 4 requests in flight, and the same record / table / json path as HTTP mode
    spans = sorted((r["start"], 1) for r in rec["requests"]) + sorted(
        (r["start"] + r["latency"], -1) for r in rec["requests"])
    assert max(itertools.accumulate(d for _, d in sorted(spans, key=lambda x: (x[0], x[1])))) <= 4
    assert max(r["start"] + r["latency"] for r in rec["requests"]) <= s["duration_s"]
    assert serving.format_table([rec]).splitlines()[2].startswith("| nano-pd colocated | 8/0 |")
    assert len(json.loads(js.read_text())[0]["requests"]) == 8

    cfg = serving.parse_args(["--colocated", "--dtype", "bfloat16"])
    assert cfg.colocated == "default" and cfg.dtype == "bfloat16"
    assert serving.parse_args(["--colocated", folder]).colocated == folder
    with pytest.raises(SystemExit):
        serving.parse_args(["--dtype", "bfloat16"])  # --dtype without --colocated
