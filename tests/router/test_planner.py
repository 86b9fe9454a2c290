"""router.planner on synthetic series: HPA's ceil(current x value / target), the tolerance, the scale-down
stabilisation window, the bounds, the query string, and the router's /debug/desired-replicas."""
from __future__ import annotations

import math

import pytest

from router.metrics import PoolSignals
from router.planner import (MAX_WINDOW_S, MetricWindow, PlannerConfig, Sample, Targets, desired_replicas,
                            recommend)

CONFIG = PlannerConfig(Targets(prefill_backlog_s=2.0, kv_usage=0.5, requests_per_worker=4.0), tolerance=0.1,
                       scale_down_window_s=60.0, bounds={"prefill": (1, 4), "decode": (1, 3)})


def pools(prefill: PoolSignals = PoolSignals(workers=1), decode: PoolSignals = PoolSignals(workers=1)):
    return {"prefill": prefill, "decode": decode, "mixed": PoolSignals()}


def decode_pool(workers: int, requests: int, used: int = 0, total: int = 100) -> PoolSignals:
    return PoolSignals(workers=workers, running=requests, used_blocks=used * workers, total_blocks=total * workers)


def series(*points: tuple[float, dict]) -> MetricWindow:
    window = MetricWindow()
    for t, p in points:
        window.add(Sample.of(t, p, PlannerConfig()))
    return window


def decide(window: MetricWindow, now: float, config: PlannerConfig = CONFIG) -> dict[str, int]:
    return {role: d.desired for role, d in desired_replicas(window.samples, now, config).items()}


def test_hpa_rule_per_signal_and_the_largest_wins():
    # 1 decode worker with 10 requests (target 4 per worker): ceil(1 x 10 / 4) = 3; KV 20% of 50%: 1
    assert recommend("decode", decode_pool(1, 10, used=20), CONFIG) == 3
    # 2 workers, KV at 90% (target 50%): ceil(2 x 1.8) = 4, above the requests' ceil(2 x 1 / 4) = 1
    assert recommend("decode", decode_pool(2, 2, used=90), CONFIG) == 4
    # prefill: 3000 queued tokens at 500 tok/s = 6 s of backlog, target 2 s: ceil(1 x 3) = 3
    assert recommend("prefill", PoolSignals(workers=1, queued_prompt_tokens=3000, prefill_tokens_per_s=500),
                     CONFIG) == 3
    # idle: every signal 0, so the pool may shrink to nothing before the bounds apply
    assert recommend("decode", decode_pool(3, 0), CONFIG) == 0


def test_tolerance_keeps_the_current_count_near_the_target():
    # 2 workers at 54% KV (target 50%): ratio 1.08, inside the 10% tolerance; plain ceil(2 x 1.08) would give 3
    near = decode_pool(2, 8, used=54)
    assert recommend("decode", near, CONFIG) == 2
    assert recommend("decode", near, PlannerConfig(CONFIG.targets, tolerance=0.05)) == 3


def test_a_backlog_without_a_measured_speed_is_no_signal():
    cold = PoolSignals(workers=1, queued_prompt_tokens=5000, prefill_tokens_per_s=0.0)
    assert cold.prefill_backlog_s is None
    assert recommend("prefill", cold, CONFIG) == 1  # nothing to go on: the current count
    assert PoolSignals(workers=1).prefill_backlog_s == 0.0


def test_scale_up_is_immediate_and_bounded_by_max():
    window = series((0.0, pools(decode=decode_pool(1, 1))), (5.0, pools(decode=decode_pool(1, 40))))
    got = desired_replicas(window.samples, 5.0, CONFIG)["decode"]
    assert (got.current, got.recommended, got.desired) == (1, 10, 3)  # ceil(40 / 4) = 10, max 3
    assert got.signals == {"kv_usage": 0.0, "requests_per_worker": 40.0}


def test_scale_down_waits_for_the_window_then_stops_at_min():
    burst = pools(decode=decode_pool(3, 12))  # 4 per worker: on target, 3 wanted
    window = series((0.0, burst), (10.0, pools(decode=decode_pool(3, 0))))
    assert decide(window, 10.0)["decode"] == 3  # the burst 10 s ago is inside the 60 s window
    window.add(Sample.of(50.0, pools(decode=decode_pool(3, 4)), CONFIG))  # 4 requests: 1 worker would do
    assert decide(window, 50.0)["decode"] == 3
    window.add(Sample.of(61.0, pools(decode=decode_pool(3, 4)), CONFIG))  # the burst sample has left the window
    assert decide(window, 61.0)["decode"] == 1
    window.add(Sample.of(200.0, pools(decode=decode_pool(3, 0)), CONFIG))
    assert decide(window, 200.0)["decode"] == 1  # recommended 0, min 1


def test_the_window_keeps_the_largest_recent_recommendation_not_the_newest():
    window = series((0.0, pools(decode=decode_pool(3, 8))),  # 2 wanted
                    (20.0, pools(decode=decode_pool(3, 12))),  # 3 wanted
                    (40.0, pools(decode=decode_pool(3, 0))))
    assert decide(window, 40.0)["decode"] == 3
    assert decide(window, 75.0)["decode"] == 3  # the 0 s sample left the window; the 20 s one is 55 s old
    assert decide(window, 81.0)["decode"] == 1  # only the 40 s sample, which asks for 0, is left


def test_roles_outside_the_cluster_are_left_out_and_bounds_bring_them_in():
    window = series((0.0, pools()))
    assert set(decide(window, 0.0)) == {"prefill", "decode"}  # no mixed worker, no mixed bounds
    with_mixed = PlannerConfig(CONFIG.targets, bounds={**CONFIG.bounds, "mixed": (2, 2)})
    assert decide(window, 0.0, with_mixed)["mixed"] == 2


def test_the_window_forgets_old_and_surplus_samples():
    window = MetricWindow(max_samples=3)
    for t in range(5):
        window.add(Sample.of(float(t), pools(), CONFIG))
    assert [s.time for s in window.samples] == [2.0, 3.0, 4.0]
    window.add(Sample.of(MAX_WINDOW_S + 3.5, pools(), CONFIG))
    assert [s.time for s in window.samples] == [4.0, MAX_WINDOW_S + 3.5]


def test_the_callers_replicas_count_a_worker_still_loading():
    """The caller runs 2 decode workers, one still loading: the router sees 1. A lull must not drain the new one
    while the window remembers the burst, and the burst's rule counts both."""
    config = PlannerConfig(CONFIG.targets, scale_down_window_s=60.0, bounds=CONFIG.bounds, current={"decode": 2})
    window = MetricWindow()
    window.add(Sample.of(0.0, pools(decode=decode_pool(1, 8)), config))
    got = desired_replicas(window.samples, 0.0, config)["decode"]
    # 8 requests on the one registered worker, 4 per worker wanted: ceil(2 x 8 / 4) = 4, max 3
    assert (got.current, got.recommended, got.desired) == (2, 4, 3)
    window.add(Sample.of(5.0, pools(decode=decode_pool(1, 0)), config))
    assert decide(window, 5.0, config)["decode"] == 2  # counting only the router's 1 it would say 1
    assert decide(window, 5.0, CONFIG)["decode"] == 2  # a later sample without the caller's count is the pool's


def test_query_string():
    config = PlannerConfig.from_query({"min_decode": "2", "max_decode": "5", "target_kv_usage": "0.25",
                                       "tolerance": "0", "scale_down_window_s": "30", "current_decode": "3"})
    assert config.bounds == {"decode": (2, 5)} and config.limits("prefill") == (1, 64)
    assert config.targets.kv_usage == 0.25 and config.targets.prefill_backlog_s == Targets().prefill_backlog_s
    assert (config.tolerance, config.scale_down_window_s, config.current) == (0.0, 30.0, {"decode": 3})
    assert PlannerConfig.from_query({}) == PlannerConfig()


@pytest.mark.parametrize("query, message", [
    ({"max_decoder": "3"}, "unknown parameter 'max_decoder'"),
    ({"min_decode": "x"}, "min_decode must be an integer"),
    ({"min_decode": "3", "max_decode": "2"}, "min_decode (3) is above max_decode (2)"),
    ({"target_kv_usage": "0"}, "target_kv_usage must be in"),
    ({"target_kv_usage": "nan"}, "target_kv_usage must be in"),
    ({"tolerance": "-1"}, "tolerance must be in [0, 1]"),
    ({"scale_down_window_s": "1e9"}, "scale_down_window_s must be in"),
])
def test_bad_query_strings_are_refused(query, message):
    with pytest.raises(ValueError) as e:
        PlannerConfig.from_query(query)
    assert message in str(e.value)
