"""router.metrics: rendered text parsed back and checked against what was recorded."""

from __future__ import annotations

import math
import re
import threading

import pytest

from router.metrics import Counter, Gauge, Histogram, Registry

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v)


def parse(text: str):
    """-> ({(name, frozenset(labels)): value}, {name: help}, {name: type})"""
    samples, helps, types = {}, {}, {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, h = line[7:].partition(" ")
            helps[name] = h
        elif line.startswith("# TYPE "):
            name, t = line[7:].split(" ")
            types[name] = t
        else:
            m = _SAMPLE.match(line)
            assert m, line
            name, labels, value = m.groups()
            pairs = _LABEL.findall(labels or "")
            # the whole label block must be consumed by well-formed pairs
            assert ",".join(f'{k}="{v}"' for k, v in pairs) == (labels or "")
            key = (name, frozenset((k, _unescape(v)) for k, v in pairs))
            assert key not in samples, line
            samples[key] = float(value)
    return samples, helps, types


def lbl(**kw):
    return frozenset(kw.items())


def test_counter_and_gauge():
    reg = Registry()
    c = reg.register(Counter("vllm:prompt_tokens_total", "Prompt tokens."))
    g = reg.register(Gauge("vllm:num_requests_running", "Running requests."))
    c.inc()
    c.inc(41)
    g.set(5)
    g.inc(2)
    g.dec()
    with pytest.raises(ValueError):
        c.inc(-1)
    samples, helps, types = parse(reg.render())
    assert samples == {("vllm:prompt_tokens_total", lbl()): 42.0, ("vllm:num_requests_running", lbl()): 6.0}
    assert types == {"vllm:prompt_tokens_total": "counter", "vllm:num_requests_running": "gauge"}
    assert helps["vllm:prompt_tokens_total"] == "Prompt tokens."


def test_render_layout():
    reg = Registry()
    reg.register(Counter("a_total", "A.", ["model"])).labels(model="m").inc(3)
    assert reg.render() == '# HELP a_total A.\n# TYPE a_total counter\na_total{model="m"} 3.0\n'


def test_labels():
    reg = Registry()
    c = reg.register(Counter("req_total", "Requests.", labelnames=("model", "finished_reason")))
    c.labels(model="m", finished_reason="stop").inc()
    c.labels(finished_reason="stop", model="m").inc()
    c.labels(model="m", finished_reason="length").inc(5)
    with pytest.raises(ValueError):
        c.labels(model="m")
    samples, _, _ = parse(reg.render())
    assert samples == {
        ("req_total", lbl(model="m", finished_reason="stop")): 2.0,
        ("req_total", lbl(model="m", finished_reason="length")): 5.0,
    }


def test_label_and_help_escaping():
    reg = Registry()
    nasty = 'a\\b"c\nd'
    g = reg.register(Gauge("g", 'help with \\ and\nnewline "quoted"', ["path"]))
    g.labels(path=nasty).set(1.5)
    text = reg.render()
    assert 'g{path="a\\\\b\\"c\\nd"} 1.5' in text
    assert '# HELP g help with \\\\ and\\nnewline "quoted"\n' in text
    assert len(text.splitlines()) == 3  # no raw newline leaked
    samples, _, _ = parse(text)
    assert samples == {("g", lbl(path=nasty)): 1.5}


def test_histogram_cumulative_buckets():
    reg = Registry()
    buckets = [0.01, 0.1, 1.0, 10.0]
    h = reg.register(Histogram("vllm:time_to_first_token_seconds", "TTFT.", buckets, ["model"]))
    values = [0.005, 0.01, 0.05, 0.5, 0.7, 5.0, 50.0, 1e9]
    for v in values:
        h.labels(model="m").observe(v)
    samples, _, types = parse(reg.render())
    assert types == {"vllm:time_to_first_token_seconds": "histogram"}
    name = "vllm:time_to_first_token_seconds"
    got = {
        dict(k[1])["le"]: v for k, v in samples.items() if k[0] == name + "_bucket"
    }
    # upper bounds are inclusive
    assert got == {"0.01": 2, "0.1": 3, "1.0": 5, "10.0": 6, "+Inf": 8}
    assert samples[(name + "_count", lbl(model="m"))] == len(values)
    assert samples[(name + "_sum", lbl(model="m"))] == pytest.approx(sum(values))
    # buckets appear in increasing order with +Inf last
    les = re.findall(r'le="([^"]+)"', reg.render())
    assert [float(x) for x in les] == sorted(float(x) for x in les) and les[-1] == "+Inf"


def test_histogram_unlabelled_empty_and_inf_bucket_given():
    reg = Registry()
    h = reg.register(Histogram("lat", "Latency.", [1, 2, math.inf]))
    samples, _, _ = parse(reg.render())
    assert samples[("lat_bucket", lbl(le="+Inf"))] == 0
    assert samples[("lat_count", lbl())] == 0 and samples[("lat_sum", lbl())] == 0
    h.observe(1.5)
    h.observe(float("nan"))  # lands in +Inf rather than raising
    samples, _, _ = parse(reg.render())
    assert samples[("lat_bucket", lbl(le="1.0"))] == 0
    assert samples[("lat_bucket", lbl(le="2.0"))] == 1
    assert samples[("lat_bucket", lbl(le="+Inf"))] == 2
    assert len([k for k in samples if k[0] == "lat_bucket"]) == 3


def test_registry_rejects_duplicates():
    reg = Registry()
    reg.register(Counter("x_total", "X."))
    with pytest.raises(ValueError):
        reg.register(Gauge("x_total", "X again."))


def test_concurrent_increments():
    c = Counter("n_total", "N.", ["k"])

    def work():
        for _ in range(2000):
            c.labels(k="a").inc()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.labels(k="a").value == 8000
