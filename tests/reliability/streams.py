"""Many chat requests at once from one asyncio client, each answered as one Outcome (status, text, headers): the
load and fault scenarios count outcomes by status and compare the texts with the offline engine's."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import random

import httpx

WORDS = "alpha beta gamma delta river stone cloud paper seven green quiet window north table light music".split()
CLIENT_TIMEOUT_S = 60.0  # a request that takes longer has hung: the scenario fails instead of waiting for ever


def distinct_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + f" #{i}" for i in range(n)]


@dataclasses.dataclass
class Outcome:
    status: int
    text: str = ""
    error: dict | None = None  # the OpenAI error object, from the answer's body or the stream's error event
    headers: dict = dataclasses.field(default_factory=dict)
    transport_error: str | None = None  # the connection failed (a dead router): no HTTP answer at all


def body(prompt: str, max_tokens: int, stream: bool, ignore_eos: bool = True) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "ignore_eos": ignore_eos}


async def chat(client: httpx.AsyncClient, request: dict) -> Outcome:
    """One request, streamed or not as request["stream"] says; never raises (a failed connection is an Outcome)."""
    try:
        if not request.get("stream"):
            r = await client.post("/v1/chat/completions", json=request)
            data = r.json()
            if r.status_code != 200:
                return Outcome(r.status_code, error=data.get("error"), headers=dict(r.headers))
            return Outcome(200, data["choices"][0]["message"]["content"] or "", headers=dict(r.headers))
        async with client.stream("POST", "/v1/chat/completions", json=request) as r:
            if r.status_code != 200:
                data = json.loads(await r.aread())
                return Outcome(r.status_code, error=data.get("error"), headers=dict(r.headers))
            parts, error = [], None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    continue
                for choice in event["choices"]:
                    parts.append(choice["delta"].get("content") or "")
            return Outcome(200, "".join(parts), error=error, headers=dict(r.headers))
    except (httpx.TransportError, json.JSONDecodeError) as e:
        return Outcome(0, transport_error=f"{type(e).__name__}: {e}")


async def _many(base_url: str, requests: list[dict]) -> list[Outcome]:
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        return await asyncio.gather(*(chat(client, r) for r in requests))


def send_all(base_url: str, requests: list[dict]) -> list[Outcome]:
    """Every request at once, each on its own connection; the outcomes in the requests' order."""
    return asyncio.run(_many(base_url, requests))


def by_status(outcomes: list[Outcome]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for o in outcomes:
        key = o.status if o.error is None or o.status != 200 else -1  # -1: a 200 stream that ended in an error
        counts[key] = counts.get(key, 0) + 1
    return counts
