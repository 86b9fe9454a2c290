"""What /metrics reports. vLLM's metric names where one exists, so existing dashboards work; nano_pd: otherwise.

Request latencies are observed by the router as tokens reach it. Queue depths, KV usage and prefix-cache counters
come from the workers' heartbeats and are rendered fresh at every scrape (a dead worker's series disappear, its
counters stay in the cluster totals).
"""
from __future__ import annotations

from router.metrics import Counter, Gauge, Histogram, Registry

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ACCEPTANCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class RouterMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        r = self.registry = Registry()
        m = ("model_name",)
        self.ttft = r.register(Histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                                         LATENCY_BUCKETS, m)).labels(model_name=model_name)
        self.itl = r.register(Histogram("vllm:inter_token_latency_seconds", "Time between streamed tokens.",
                                        LATENCY_BUCKETS, m)).labels(model_name=model_name)
        self.tpot = r.register(Histogram("vllm:request_time_per_output_token_seconds",
                                         "Mean time per output token after the first, per request.",
                                         LATENCY_BUCKETS, m)).labels(model_name=model_name)
        self.e2e = r.register(Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.",
                                        LATENCY_BUCKETS, m)).labels(model_name=model_name)
        self.prompt_tokens = r.register(Counter("vllm:prompt_tokens_total", "Prompt tokens of finished requests.",
                                                m)).labels(model_name=model_name)
        self.generation_tokens = r.register(Counter("vllm:generation_tokens_total", "Generated tokens.",
                                                    m)).labels(model_name=model_name)
        self.request_success = r.register(Counter("vllm:request_success_total", "Finished requests by reason.",
                                                  ("model_name", "finished_reason")))
        self.request_errors = r.register(Counter("nano_pd:request_errors_total",
                                                 "Requests that ended in an error, by HTTP status.", ("status",)))
        self.kv_transfer_bytes = r.register(Counter("nano_pd:kv_transfer_bytes_total",
                                                    "KV bytes pushed from prefill to decode workers."))
        self.kv_transfer_seconds = r.register(Histogram("nano_pd:kv_transfer_seconds",
                                                        "Time of one request's KV push.", TRANSFER_BUCKETS))
        self.migrations = r.register(Counter("nano_pd:request_migrations_total",
                                             "Request attempts re-issued after a worker died or failed."))
        self.worker_deaths = r.register(Counter("nano_pd:worker_deaths_total", "Workers declared dead.",
                                                ("role",)))
        self.request_acceptance = r.register(Histogram(
            "nano_pd:request_spec_acceptance_rate", "Per finished request: accepted / proposed speculative tokens.",
            ACCEPTANCE_BUCKETS, m)).labels(model_name=model_name)

    def finished(self, reason: str, prompt_tokens: int, draft_tokens: int = 0, accepted_tokens: int = 0):
        self.request_success.labels(model_name=self.model_name, finished_reason=reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        if draft_tokens:
            self.request_acceptance.observe(accepted_tokens / draft_tokens)

    def render(self, cluster) -> str:
        return self.registry.render() + self._cluster_metrics(cluster).render()

    def _cluster_metrics(self, cluster) -> Registry:
        r = Registry()
        labels = ("model_name", "role", "worker")
        running = r.register(Gauge("vllm:num_requests_running", "Requests running on a worker.", labels))
        waiting = r.register(Gauge("vllm:num_requests_waiting", "Requests queued on a worker.", labels))
        usage = r.register(Gauge("vllm:kv_cache_usage_perc", "Fraction of a worker's KV blocks in use.", labels))
        alive = r.register(Gauge("nano_pd:workers_alive", "Live workers by role.", ("role",)))
        queries = r.register(Counter("vllm:prefix_cache_queries_total",
                                     "Prompt tokens looked up in the prefix caches (all workers of a role).",
                                     ("model_name", "role")))
        hits = r.register(Counter("vllm:prefix_cache_hits_total", "Prompt tokens found in the prefix caches.",
                                  ("model_name", "role")))
        drafts = r.register(Counter("vllm:spec_decode_num_draft_tokens_total", "Speculative tokens proposed.",
                                    ("model_name",)))
        accepted = r.register(Counter("vllm:spec_decode_num_accepted_tokens_total",
                                      "Speculative tokens accepted.", ("model_name",)))
        # vLLM's name; mean acceptance length = 1 + accepted tokens / this
        steps = r.register(Counter("vllm:spec_decode_num_drafts_total", "Forward passes that verified drafts.",
                                   ("model_name",)))
        totals = {role: [old.prefix_cache_queries, old.prefix_cache_hits] for role, old in cluster.retired.items()}
        spec = [sum(old.spec_draft_tokens for old in cluster.retired.values()),
                sum(old.spec_accepted_tokens for old in cluster.retired.values()),
                sum(old.spec_verify_steps for old in cluster.retired.values())]
        counts = {"prefill": 0, "decode": 0}
        for w in cluster.workers.values():
            role, load = w.info.role, w.load
            totals[role][0] += load.prefix_cache_queries
            totals[role][1] += load.prefix_cache_hits
            spec[0] += load.spec_draft_tokens
            spec[1] += load.spec_accepted_tokens
            spec[2] += load.spec_verify_steps
            if not w.alive:
                continue
            counts[role] += 1
            key = dict(model_name=self.model_name, role=role, worker=w.worker_id)
            running.labels(**key).set(load.num_running)
            waiting.labels(**key).set(load.num_waiting)
            usage.labels(**key).set(1 - load.free_blocks / load.total_blocks if load.total_blocks else 0)
        drafts.labels(model_name=self.model_name).inc(spec[0])
        accepted.labels(model_name=self.model_name).inc(spec[1])
        steps.labels(model_name=self.model_name).inc(spec[2])
        for role in counts:
            alive.labels(role=role).set(counts[role])
            queries.labels(model_name=self.model_name, role=role).inc(totals[role][0])
            hits.labels(model_name=self.model_name, role=role).inc(totals[role][1])
        return r
