"""router.server without workers or sockets (the lifespan that binds the control socket is not entered): routes,
middleware and error bodies."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from router.cluster import Cluster
from router.metrics import RouterMetrics
from router.server import create_app

KEY = "sekrit"
CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
def client():
    metrics = RouterMetrics("tiny")
    app = create_app(Cluster("tiny", "127.0.0.1", 1, metrics=metrics), tokenizer=None, model_name="tiny",
                     metrics=metrics, api_key=KEY, max_request_bytes=1000, vocab_size=32)
    return TestClient(app)


def auth(**headers) -> dict:
    return {"Authorization": f"Bearer {KEY}", **headers}


def test_metrics_content_type_and_body(client):
    r = client.get("/metrics")  # not under /v1: no key needed
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"vllm:time_to_first_token_seconds", "nano_pd:workers_alive", "vllm:prefix_cache_hits"} <= names


def test_health_and_cluster_page_without_workers(client):
    r = client.get("/health")
    assert r.status_code == 503
    assert r.json()["error"] == {"message": "no live prefill or decode worker in the cluster",
                                 "type": "service_unavailable", "param": None, "code": None}
    assert client.get("/cluster").json() == {"healthy": False, "workers": []}


def test_models(client):
    data = client.get("/v1/models", headers=auth()).json()["data"]
    assert [(m["id"], m["owned_by"], m["max_model_len"]) for m in data] == [("tiny", "nano-pd", None)]


def test_api_key_and_request_id(client):
    r = client.get("/v1/models", headers={"X-Request-Id": "abc"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["x-request-id"] == "abc"
    assert client.get("/v1/models", headers=auth(**{"X-Request-Id": "def"})).headers["x-request-id"] == "def"


def test_size_limit_and_unknown_route(client):
    r = client.post("/v1/chat/completions", headers=auth(), content=b"x" * 1001)
    assert r.status_code == 413 and "limit is 1000" in r.json()["error"]["message"]
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_chat_without_workers_is_a_counted_503(client):
    r = client.post("/v1/chat/completions", headers=auth(), content=CHAT)
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    r = client.post("/v1/chat/completions", headers=auth(), content=json.dumps({"messages": [], "model": "x"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    other_model = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}]})
    r = client.post("/v1/chat/completions", headers=auth(), content=other_model)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert 'nano_pd:request_errors_total{status="503"} 1.0' in client.get("/metrics").text
