"""Minimal Prometheus metrics rendered in the text exposition format 0.0.4.

Just enough for the router's /metrics (counters, gauges, histograms with
labels) without a third-party dependency. Each Registry is independent, so
several routers in one process (tests) do not share series.
"""

from __future__ import annotations

import math
import threading


def _escape(value: str, quote: bool = True) -> str:
    value = str(value).replace("\\", "\\\\").replace("\n", "\\n")
    return value.replace('"', '\\"') if quote else value


def _fmt(v: float) -> str:
    # Same spelling as prometheus_client (le="1.0"), so dashboards written
    # against vLLM's /metrics match our bucket labels.
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return "NaN" if math.isnan(v) else repr(v)


def _labelstr(pairs: list[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


class _Metric:
    type = ""

    def __init__(self, name: str, help: str, labelnames=()):
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._children: dict[tuple[str, ...], _Metric] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self._init_value()

    def _init_value(self) -> None:
        self.value = 0.0

    def labels(self, **kw) -> "_Metric":
        if set(kw) != set(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {sorted(kw)}")
        key = tuple(str(kw[n]) for n in self.labelnames)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._child()
        return child

    def _child(self) -> "_Metric":
        return type(self)(self.name, self.help)

    def _samples(self, labels: list[tuple[str, str]]) -> list[str]:
        return [f"{self.name}{_labelstr(labels)} {_fmt(self.value)}"]

    def render(self) -> str:
        with self._lock:
            series = [] if self.labelnames else [([], self)]
            series += [(list(zip(self.labelnames, k)), c) for k, c in sorted(self._children.items())]
        lines = [f"# HELP {self.name} {_escape(self.help, quote=False)}", f"# TYPE {self.name} {self.type}"]
        for labels, metric in series:
            # a histogram's buckets, sum and count must come from one moment
            with metric._lock:
                lines += metric._samples(labels)
        return "\n".join(lines) + "\n"


class Counter(_Metric):
    type = "counter"

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        with self._lock:
            self.value += amount


class Gauge(_Metric):
    type = "gauge"

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)


class Histogram(_Metric):
    type = "histogram"

    def __init__(self, name: str, help: str, buckets, labelnames=()):
        self.buckets = sorted(float(b) for b in buckets if b != math.inf) + [math.inf]
        super().__init__(name, help, labelnames)

    def _init_value(self) -> None:
        self.counts = [0] * len(self.buckets)  # per bucket, made cumulative on render
        self.sum = 0.0

    def _child(self) -> "Histogram":
        return Histogram(self.name, self.help, self.buckets)

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets) - 1)
        with self._lock:
            self.counts[i] += 1
            self.sum += value

    def _samples(self, labels: list[tuple[str, str]]) -> list[str]:
        out, total = [], 0
        for b, n in zip(self.buckets, self.counts):
            total += n
            out.append(f"{self.name}_bucket{_labelstr(labels + [('le', _fmt(b))])} {total}")
        out.append(f"{self.name}_sum{_labelstr(labels)} {_fmt(self.sum)}")
        out.append(f"{self.name}_count{_labelstr(labels)} {total}")
        return out


class Registry:
    def __init__(self):
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} already registered")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        return "".join(m.render() for m in self._metrics.values())
