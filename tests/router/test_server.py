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
    cluster = Cluster("tiny", "127.0.0.1", 1, migrate_wait_s=0.0, metrics=metrics)  # no workers: 503 at once
    app = create_app(cluster, tokenizer=None, model_name="tiny", metrics=metrics, api_key=KEY, max_request_bytes=1000,
                     vocab_size=32)
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
    assert client.get("/cluster").json() == {"healthy": False, "requests": 0, "workers": [], "starting": [],
                                             "draining": False, "open_requests": 0}


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


def test_trailing_slash_gets_the_same_answer_not_a_redirect(client):
    for path in ("/v1/chat/completions", "/v1/chat/completions/"):
        r = client.post(path, headers=auth(), content=CHAT, follow_redirects=False)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", (path, r.text)
        r = client.post(path, headers=auth(), content=b"{", follow_redirects=False)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body is not valid JSON")
    r = client.get("/v1/models/", headers=auth(), follow_redirects=False)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"


def test_wrong_method_is_a_405_with_allow_and_error_json(client):
    for path in ("/v1/chat/completions", "/v1/chat/completions/"):
        r = client.get(path, headers=auth(), follow_redirects=False)
        assert r.status_code == 405 and r.headers["allow"] == "POST", (path, r.headers)
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/metrics")
    assert r.status_code == 405 and r.headers["allow"] == "GET" and set(r.json()["error"]) == {
        "message", "type", "param", "code"}


def test_chunked_body_over_the_limit_is_a_413_that_closes_the_connection(client):
    chunks = (b"x" * 400 for _ in range(10))  # no Content-Length: the middleware cannot refuse it up front
    r = client.post("/v1/chat/completions", headers=auth(), content=chunks)
    assert r.status_code == 413 and "1000" in r.json()["error"]["message"]
    assert r.headers["connection"] == "close"


def test_openapi_describes_the_bodies_and_metrics_as_text(client):
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]

    def resolve(schema: dict) -> dict:
        ref = schema["$ref"]
        assert ref.startswith("#/components/schemas/")
        return schemas[ref.rsplit("/", 1)[1]]

    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert "/v1/chat/completions/" not in doc["paths"]  # served, not documented twice
    request = resolve(chat["requestBody"]["content"]["application/json"]["schema"])
    assert request["required"] == ["messages"]
    assert {"messages", "model", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
            "stop", "n", "logprobs", "top_logprobs", "logit_bias", "response_format", "tools",
            "tool_choice"} <= set(request["properties"])
    seed = request["properties"]["seed"]["anyOf"][0]
    assert (seed["type"], seed["minimum"], seed["maximum"]) == ("integer", -2**63, 2**63 - 1)
    message = resolve(request["properties"]["messages"]["items"])
    assert {"role", "content", "tool_calls"} <= set(message["properties"])

    ok = chat["responses"]["200"]["content"]
    completion = resolve(ok["application/json"]["schema"])
    assert {"id", "object", "created", "model", "choices", "usage"} <= set(completion["properties"])
    event_data = ok["text/event-stream"]["schema"]["properties"]["data"]  # of each event: a chunk's JSON, or [DONE]
    assert "choices" in resolve(event_data["else"]["contentSchema"]["anyOf"][0])["properties"]
    for status in ("400", "401", "404", "413", "503"):
        error = resolve(chat["responses"][status]["content"]["application/json"]["schema"])
        detail = resolve(error["properties"]["error"])
        assert set(detail["properties"]) == {"message", "type", "param", "code"}

    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


def test_a_draining_router_refuses_new_requests_and_is_not_ready(client):
    assert client.get("/ready").status_code == 503  # no worker: not ready, for the reason /health gives
    client.app.state.drain.begin()
    r = client.get("/ready")
    assert r.status_code == 503 and "draining" in r.json()["error"]["message"]
    for r in (client.post("/v1/chat/completions", headers=auth(), content=CHAT), client.get("/v1/models")):
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
    assert client.get("/health").json()["error"]["message"] == "no live prefill or decode worker in the cluster"
    assert client.get("/cluster").json()["draining"] is True


def test_admin_drain_needs_the_key_and_a_live_worker(client):
    assert client.post("/admin/workers/w-1/drain").status_code == 401
    r = client.post("/admin/workers/w-1/drain", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
