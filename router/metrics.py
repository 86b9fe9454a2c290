"""What /metrics reports. vLLM's metric names where one exists, so existing dashboards work; nano_pd: otherwise.

Request latencies are observed by the router as tokens reach it, into this router's own CollectorRegistry (several
routers in one process do not share series). Queue depths, KV usage and the prefix-cache and spec-decode counters
come from the workers' heartbeats: ClusterCollector reads them from the worker registry at every scrape (a dead
worker's series disappear, its counters stay in the cluster totals).
"""
from __future__ import annotations

import dataclasses

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from common.cluster.protocol import DECODE, MIXED, PREFILL, ROLES

# no "<name>_created" series next to each counter: the exposition stays what existing dashboards read
prometheus_client.disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4"  # the text format prometheus_client writes, under its classic name
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ACCEPTANCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class RouterMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        r = self.registry = CollectorRegistry()
        m = ("model_name",)

        def latency(name: str, help: str):
            return Histogram(name, help, m, buckets=LATENCY_BUCKETS, registry=r).labels(model_name=model_name)

        self.ttft = latency("vllm:time_to_first_token_seconds", "Time to first token.")
        self.itl = latency("vllm:inter_token_latency_seconds", "Time between streamed tokens.")
        self.tpot = latency("vllm:request_time_per_output_token_seconds",
                            "Mean time per output token after the first, per request.")
        self.e2e = latency("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.")
        self.prompt_tokens = Counter("vllm:prompt_tokens_total", "Prompt tokens of finished requests.", m,
                                     registry=r).labels(model_name=model_name)
        self.generation_tokens = Counter("vllm:generation_tokens_total", "Generated tokens.", m,
                                         registry=r).labels(model_name=model_name)
        self.request_success = Counter("vllm:request_success_total", "Finished requests by reason.",
                                       ("model_name", "finished_reason"), registry=r)
        self.request_errors = Counter("nano_pd:request_errors_total",
                                      "Requests that ended in an error, by HTTP status.", ("status",), registry=r)
        self.kv_transfer_bytes = Counter("nano_pd:kv_transfer_bytes_total",
                                         "KV bytes pushed from prefill to decode workers.", registry=r)
        self.kv_transfer_seconds = Histogram("nano_pd:kv_transfer_seconds", "Time of one request's KV push.",
                                             buckets=TRANSFER_BUCKETS, registry=r)
        self.migrations = Counter("nano_pd:request_migrations_total",
                                  "Request attempts re-issued after a worker died or failed.", registry=r)
        self.local_prefills = Counter("nano_pd:local_prefills_total",
                                      "Prompts computed by the worker that decodes them (a mixed worker, or a decode "
                                      "worker's short uncached tail) instead of a prefill worker.", ("role",),
                                      registry=r)
        self.queued = Gauge("nano_pd:requests_queued", "Requests without a first token yet (waiting for a worker's "
                            "room, queued at one, or in prefill); new ones get a 429 at --max-queued-requests.",
                            registry=r)
        self.worker_deaths = Counter("nano_pd:worker_deaths_total", "Workers declared dead.", ("role",), registry=r)
        self.request_acceptance = Histogram(
            "nano_pd:request_spec_acceptance_rate", "Per finished request: accepted / proposed speculative tokens.",
            m, buckets=ACCEPTANCE_BUCKETS, registry=r).labels(model_name=model_name)
        self.cluster = ClusterCollector(model_name)
        r.register(self.cluster)

    def watch(self, workers) -> None:
        """Report this worker registry's workers (router.registry.WorkerRegistry) from now on."""
        self.cluster.workers = workers

    def finished(self, reason: str, prompt_tokens: int, draft_tokens: int = 0, accepted_tokens: int = 0):
        self.request_success.labels(model_name=self.model_name, finished_reason=reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        if draft_tokens:
            self.request_acceptance.observe(accepted_tokens / draft_tokens)

    def render(self) -> str:
        return generate_latest(self.registry).decode()


@dataclasses.dataclass(frozen=True)
class PoolSignals:
    """One role's pool, summed over its workers that take new work (draining ones are on their way out): what
    autoscaling reads (router.planner, and HPA/KEDA through /metrics)."""
    workers: int = 0
    running: int = 0
    waiting: int = 0
    queued_prompt_tokens: int = 0
    prefill_tokens_per_s: float = 0.0  # each worker's prompt tokens / seconds of the steps computing them, summed
    used_blocks: int = 0
    total_blocks: int = 0

    @property
    def prefill_backlog_s(self) -> float | None:
        """Seconds the pool needs for the prompt tokens it holds; None while it has some but no speed measured."""
        if not self.queued_prompt_tokens:
            return 0.0
        return self.queued_prompt_tokens / self.prefill_tokens_per_s if self.prefill_tokens_per_s else None

    @property
    def kv_usage(self) -> float:
        return self.used_blocks / self.total_blocks if self.total_blocks else 0.0


COMPUTES_PROMPTS, HOLDS_DECODE_KV = (PREFILL, MIXED), (DECODE, MIXED)  # the roles each signal is reported for


def pool_signals(workers) -> dict[str, PoolSignals]:
    """Every role's PoolSignals from a WorkerRegistry (router.registry)."""
    pools = {}
    for role in ROLES:
        loads = [w.load for w in workers.routable(role)]
        pools[role] = PoolSignals(
            workers=len(loads), running=sum(x.num_running for x in loads),
            waiting=sum(x.num_waiting for x in loads),
            queued_prompt_tokens=sum(x.queued_prompt_tokens for x in loads),
            prefill_tokens_per_s=sum(x.prefill_tokens / x.prefill_seconds for x in loads if x.prefill_seconds > 0),
            used_blocks=sum(x.total_blocks - x.free_blocks for x in loads),
            total_blocks=sum(x.total_blocks for x in loads))
    return pools


class ClusterCollector(Collector):
    """The per-worker and per-role series, read from the worker registry at each scrape: queue depths and KV usage
    of the live workers, and the cumulative counters of all workers plus those of retired ones."""

    def __init__(self, model_name: str, workers=None):
        self.model_name = model_name
        self.workers = workers  # a WorkerRegistry: .workers by id, .retired loads by role

    def describe(self):
        return list(self._families().values())  # the names without samples: the registry refuses a clash

    def collect(self):
        families = self._families()
        if self.workers is not None:
            self._per_worker(families)
            self._pools(families)
            self._totals(families)
        return list(families.values())

    def _families(self) -> dict:
        per_worker, per_role, model = ("model_name", "role", "worker"), ("model_name", "role"), ("model_name",)
        return {
            "running": GaugeMetricFamily("vllm:num_requests_running", "Requests running on a worker.",
                                         labels=per_worker),
            "waiting": GaugeMetricFamily("vllm:num_requests_waiting", "Requests queued on a worker.",
                                         labels=per_worker),
            "usage": GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction of a worker's KV blocks in use.",
                                       labels=per_worker),
            "alive": GaugeMetricFamily("nano_pd:workers_alive", "Live workers by role.", labels=("role",)),
            "pool_workers": GaugeMetricFamily("nano_pd:pool_workers", "Workers of a role that take new work (alive, "
                                              "not draining): the pool the other nano_pd:pool_ series sum over.",
                                              labels=per_role),
            "pool_running": GaugeMetricFamily("nano_pd:pool_requests_running", "Requests running in a role's pool.",
                                              labels=per_role),
            "pool_waiting": GaugeMetricFamily("nano_pd:pool_requests_waiting", "Requests queued in a role's pool.",
                                              labels=per_role),
            "queued_prompt": GaugeMetricFamily("nano_pd:pool_queued_prompt_tokens", "Prompt tokens queued or in "
                                               "prefill in a prompt-computing pool (prefill, mixed).",
                                               labels=per_role),
            "prefill_speed": GaugeMetricFamily("nano_pd:pool_prefill_tokens_per_second", "Measured prefill speed "
                                               "of a prompt-computing pool: each worker's prompt tokens over the "
                                               "seconds of its steps computing them, summed.", labels=per_role),
            "backlog": GaugeMetricFamily("nano_pd:pool_prefill_backlog_seconds", "Queued prompt tokens over the "
                                         "pool's measured prefill speed (absent while tokens are queued but no "
                                         "speed is measured yet).", labels=per_role),
            "pool_kv": GaugeMetricFamily("nano_pd:pool_kv_cache_usage_ratio", "KV blocks in use over KV blocks, "
                                         "summed over a decoding pool (decode, mixed).", labels=per_role),
            "queries": CounterMetricFamily("vllm:prefix_cache_queries_total",
                                           "Prompt tokens looked up in the prefix caches (all workers of a role).",
                                           labels=per_role),
            "hits": CounterMetricFamily("vllm:prefix_cache_hits_total", "Prompt tokens found in the prefix caches.",
                                        labels=per_role),
            "drafts": CounterMetricFamily("vllm:spec_decode_num_draft_tokens_total", "Speculative tokens proposed.",
                                          labels=model),
            "accepted": CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_total",
                                            "Speculative tokens accepted.", labels=model),
            # vLLM's name; mean acceptance length = 1 + accepted tokens / this
            "steps": CounterMetricFamily("vllm:spec_decode_num_drafts_total", "Forward passes that verified drafts.",
                                         labels=model),
        }

    def _per_worker(self, families: dict):
        live = sorted((w for w in self.workers.workers.values() if w.alive), key=lambda w: (w.info.role, w.worker_id))
        for w in live:
            labels, load = [self.model_name, w.info.role, w.worker_id], w.load
            families["running"].add_metric(labels, load.num_running)
            families["waiting"].add_metric(labels, load.num_waiting)
            families["usage"].add_metric(labels, 1 - load.free_blocks / load.total_blocks if load.total_blocks else 0)
        for role in ROLES:
            families["alive"].add_metric([role], sum(1 for w in live if w.info.role == role))

    def _pools(self, families: dict):
        for role, pool in pool_signals(self.workers).items():
            labels = [self.model_name, role]
            families["pool_workers"].add_metric(labels, pool.workers)
            families["pool_running"].add_metric(labels, pool.running)
            families["pool_waiting"].add_metric(labels, pool.waiting)
            if role in COMPUTES_PROMPTS:
                families["queued_prompt"].add_metric(labels, pool.queued_prompt_tokens)
                families["prefill_speed"].add_metric(labels, pool.prefill_tokens_per_s)
                if pool.prefill_backlog_s is not None:
                    families["backlog"].add_metric(labels, pool.prefill_backlog_s)
            if role in HOLDS_DECODE_KV:
                families["pool_kv"].add_metric(labels, pool.kv_usage)

    def _totals(self, families: dict):
        """Every listed worker's cumulative counters, dead or alive, plus the retired ones': never going down."""
        loads = {role: [load] for role, load in self.workers.retired.items()}
        for w in self.workers.workers.values():
            loads[w.info.role].append(w.load)
        for role in ROLES:
            families["queries"].add_metric([self.model_name, role], sum(x.prefix_cache_queries for x in loads[role]))
            families["hits"].add_metric([self.model_name, role], sum(x.prefix_cache_hits for x in loads[role]))
        every = [x for role in loads for x in loads[role]]
        families["drafts"].add_metric([self.model_name], sum(x.spec_draft_tokens for x in every))
        families["accepted"].add_metric([self.model_name], sum(x.spec_accepted_tokens for x in every))
        families["steps"].add_metric([self.model_name], sum(x.spec_verify_steps for x in every))
