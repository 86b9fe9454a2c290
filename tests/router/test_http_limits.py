"""The router's connection limits, against a real router process (no workers) over raw sockets: a request head or
body that does not arrive in time is answered 408 and its connection closed, however slowly bytes keep coming;
connections beyond --max-connections get a 503; a client gone mid-body costs one log line. Every socket waits at
most WAIT seconds for the router, so a limit that does not work fails the test instead of hanging it."""
from __future__ import annotations

import json
import os
import select
import socket
import time

import pytest

from tests.support.cluster_harness import LocalCluster
from tests.support.tiny_models import TinyConfig

WAIT = 15.0  # far beyond the limits the routers below run with


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    return str(tiny_model_factory(TinyConfig()))


@pytest.fixture(scope="module")
def router(model):
    with LocalCluster(model, prefill=0, decode=0, router_args=("--header-timeout", "1", "--body-timeout", "1")) as c:
        yield c


def connect(c: LocalCluster) -> socket.socket:
    return socket.create_connection(("127.0.0.1", c.port), timeout=WAIT)


def read_until_closed(s: socket.socket) -> bytes:
    """Everything the router sends until it closes the connection (socket.timeout after WAIT s if it never does)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def answer(data: bytes) -> tuple[int, dict, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def assert_error(data: bytes, status: int):
    got, headers, body = answer(data)
    assert got == status, data
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


def log_lines(c: LocalCluster, needle: str) -> list[str]:
    with open(os.path.join(c.log_dir, "router.log"), errors="replace") as f:
        return [line for line in f if needle in line]


def wait_for_log(c: LocalCluster, needle: str) -> list[str]:
    deadline = time.monotonic() + WAIT
    while not (lines := log_lines(c, needle)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return lines


def test_a_head_without_crlf_is_answered_408_and_closed(router):
    with connect(router) as s:
        s.sendall(b"A" * 2000)
        assert_error(read_until_closed(s), 408)


def test_an_idle_connection_is_closed_without_an_answer(router):
    with connect(router) as s:
        assert read_until_closed(s) == b""  # its client may be sending a request now: a 408 would answer it


def test_slowloris_connections_are_all_cut_off_while_they_drip(router):
    """20 connections each send a partial head, then a header line every 0.2 s: data must not reset the clock."""
    socks = [connect(router) for _ in range(20)]
    for s in socks:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    answers: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + WAIT
    while len(answers) < len(socks) and time.monotonic() < deadline:
        dripping = [s for s in socks if s not in answers]
        readable, _, _ = select.select(dripping, [], [], 0.2)
        for s in readable:
            try:
                answers[s] = read_until_closed(s)  # the router writes its answer and closes at once
            except ConnectionResetError:
                answers[s] = b""
        for s in dripping:
            if s not in answers:
                try:
                    s.sendall(b"X-Drip: 1\r\n")
                except OSError:
                    pass  # closed under us: the next select reads it
    try:
        assert len(answers) == len(socks), f"{len(socks) - len(answers)} of {len(socks)} connections still held"
        assert any(answers.values())
        for data in filter(None, answers.values()):
            assert_error(data, 408)
    finally:
        for s in socks:
            s.close()


def test_a_stalled_body_is_answered_408_and_logged_once(router):
    with connect(router) as s:
        port = s.getsockname()[1]
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"messages\"")
        assert_error(read_until_closed(s), 408)
    assert len(wait_for_log(router, f":{port} sent part of a request body")) == 1


def test_a_client_gone_mid_body_costs_one_log_line_not_a_traceback(router):
    with connect(router) as s:
        port = s.getsockname()[1]
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"messages\": [")
        time.sleep(0.2)  # not a timing assertion: lets the router start reading the body before the client goes
    assert len(wait_for_log(router, f":{port} sent part of a request body")) == 1
    assert log_lines(router, "Traceback") == [] and log_lines(router, "Exception in ASGI") == []


def test_the_router_still_answers_after_all_that(router):
    status, body = router.get("/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"


def test_connections_beyond_the_limit_get_a_503(model):
    with LocalCluster(model, prefill=0, decode=0, router_args=("--max-connections", "4")) as c:
        held = [connect(c) for _ in range(4)]
        try:
            with connect(c) as s:
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
                assert_error(read_until_closed(s), 503)
        finally:
            for s in held:
                s.close()
        deadline, status = time.monotonic() + WAIT, None
        while status != 200 and time.monotonic() < deadline:  # the router sees the held ones close soon after
            status, _ = c.get("/v1/models")
            time.sleep(0.1)
        assert status == 200
