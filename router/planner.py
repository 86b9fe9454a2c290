"""The autoscaling planner: a window of pool samples -> desired replicas per role, by the Kubernetes HPA's rule.

Pure: no I/O and no clock. The router's /debug/desired-replicas samples its pools (router.metrics.pool_signals) at
every call into a MetricWindow and answers with desired_replicas(); deploy/launch.py --autoscale polls it and adds
or drains local workers. Like the HPA, for each signal of a role

    recommended = ceil(current x value / target)      (current kept while |value / target - 1| <= tolerance)

and a role's recommendation is the largest of its signals'. Scaling up follows it at once; scaling down takes the
largest recommendation of the last scale_down_window_s (HPA's behavior.scaleDown.stabilizationWindowSeconds), so a
short lull does not drain a worker the next burst needs. Then the role's [min, max] bounds apply. Signals per role:
prefill backlog seconds (prefill, mixed), KV-block use ratio and requests per worker (decode, mixed).
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque

from common.cluster.protocol import DECODE, MIXED, PREFILL, ROLES
from router.metrics import PoolSignals

MAX_WINDOW_S = 3600.0  # the longest scale-down window a caller may ask for: what a MetricWindow keeps
MAX_SAMPLES = 4096  # samples a MetricWindow keeps at most (a caller polling faster thins its own window)
MAX_REPLICAS = 64  # the default upper bound of a role

ROLE_SIGNALS = {PREFILL: ("prefill_backlog_s",), DECODE: ("kv_usage", "requests_per_worker"),
                MIXED: ("prefill_backlog_s", "kv_usage", "requests_per_worker")}


@dataclasses.dataclass(frozen=True)
class Targets:
    """The value of each signal one replica should run at (HPA's target averageValue)."""
    prefill_backlog_s: float = 2.0
    kv_usage: float = 0.7
    requests_per_worker: float = 16.0


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    targets: Targets = Targets()
    tolerance: float = 0.1
    scale_down_window_s: float = 300.0
    bounds: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # role -> (min, max) replicas
    # role -> the replicas the caller runs, loading ones included (a Deployment's spec.replicas): the current count
    # of HPA's rule; without it, the workers taking work. A worker still loading must count, or the planner, not
    # seeing it yet, asks to drain it before it registers
    current: dict[str, int] = dataclasses.field(default_factory=dict)

    def limits(self, role: str) -> tuple[int, int]:
        return self.bounds.get(role, (1, MAX_REPLICAS))

    @classmethod
    def from_query(cls, query: dict[str, str]) -> PlannerConfig:
        """The config a /debug/desired-replicas query string names (min_decode=1&max_decode=3&target_kv_usage=0.5
        &tolerance=0.1&scale_down_window_s=60 ...); ValueError naming the parameter for anything else."""
        known = {f"{edge}_{role}" for edge in ("min", "max") for role in ROLES} | {"tolerance", "scale_down_window_s"}
        known |= {f"target_{f.name}" for f in dataclasses.fields(Targets)} | {f"current_{role}" for role in ROLES}
        unknown = sorted(set(query) - known)
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r}; known: {', '.join(sorted(known))}")

        def number(name: str, default: float, low: float, high: float, kind=float):
            if name not in query:
                return default
            try:
                value = kind(query[name])
            except ValueError:
                raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}") from None
            if not low <= value <= high:  # NaN fails too
                raise ValueError(f"{name} must be in [{low:g}, {high:g}]")
            return value

        targets = Targets(**{f.name: number(f"target_{f.name}", f.default, 1e-9, 1e9)
                             for f in dataclasses.fields(Targets)})
        bounds = {}
        for role in ROLES:
            if f"min_{role}" in query or f"max_{role}" in query:
                low = number(f"min_{role}", 1, 0, MAX_REPLICAS, int)
                high = number(f"max_{role}", max(low, MAX_REPLICAS), 0, 1024, int)
                if low > high:
                    raise ValueError(f"min_{role} ({low}) is above max_{role} ({high})")
                bounds[role] = (low, high)
        current = {role: number(f"current_{role}", 0, 0, 1024, int) for role in ROLES if f"current_{role}" in query}
        return cls(targets, number("tolerance", cls.tolerance, 0, 1), number(
            "scale_down_window_s", cls.scale_down_window_s, 0, MAX_WINDOW_S), bounds, current)


@dataclasses.dataclass(frozen=True)
class Sample:
    time: float  # monotonic seconds
    pools: dict[str, PoolSignals]
    current: dict[str, int]  # the replicas of each role when it was taken (PlannerConfig.current, or the pool's)

    @classmethod
    def of(cls, time: float, pools: dict[str, PoolSignals], config: PlannerConfig) -> Sample:
        return cls(time, pools, {role: config.current.get(role, pool.workers) for role, pool in pools.items()})


class MetricWindow:
    """The recent samples, oldest first: at most MAX_SAMPLES, none older than MAX_WINDOW_S before the newest."""

    def __init__(self, max_samples: int = MAX_SAMPLES):
        self.samples: deque[Sample] = deque(maxlen=max_samples)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        while sample.time - self.samples[0].time > MAX_WINDOW_S:
            self.samples.popleft()


def signal_values(role: str, pool: PoolSignals) -> dict[str, float | None]:
    """The role's signals in this sample (None: not measured yet, e.g. no prefill speed)."""
    values = {"prefill_backlog_s": pool.prefill_backlog_s, "kv_usage": pool.kv_usage,
              "requests_per_worker": (pool.running + pool.waiting) / pool.workers if pool.workers else 0.0}
    return {name: values[name] for name in ROLE_SIGNALS[role]}


def recommend(role: str, pool: PoolSignals, config: PlannerConfig, current: int | None = None) -> int:
    """HPA's rule for one sample: the largest of ceil(current x value / target) over the role's signals (current:
    the pool's workers unless given)."""
    current, proposals = pool.workers if current is None else current, []
    for name, value in signal_values(role, pool).items():
        if value is None:
            continue
        ratio = value / getattr(config.targets, name)
        proposals.append(current if abs(ratio - 1) <= config.tolerance else math.ceil(current * ratio))
    return max(proposals, default=current)


@dataclasses.dataclass(frozen=True)
class Decision:
    current: int  # the role's replicas in the newest sample
    recommended: int  # the newest sample's recommendation, before the window and the bounds
    desired: int
    signals: dict[str, float | None]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def desired_replicas(samples, now: float, config: PlannerConfig) -> dict[str, Decision]:
    """Each role's decision from the window's samples (oldest first, at least one). A role with no worker in the
    newest sample and no bounds given is not part of the cluster, and left out."""
    *_, newest = samples
    recent = [s for s in samples if now - s.time <= config.scale_down_window_s] or [newest]
    decisions = {}
    for role in ROLES:
        pool, current = newest.pools[role], newest.current[role]
        if not current and role not in config.bounds:
            continue
        recommended = recommend(role, pool, config, current)
        wanted = recommended
        if recommended < current:  # down only as far as every recommendation of the window allows
            wanted = min(current, max(recommend(role, s.pools[role], config, s.current[role]) for s in recent))
        low, high = config.limits(role)
        decisions[role] = Decision(current, recommended, min(max(wanted, low), high), signal_values(role, pool))
    return decisions
