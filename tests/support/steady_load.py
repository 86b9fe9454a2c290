"""A steady load of greedy chat streams for scenarios that change the cluster while it serves (a worker joins, one
drains, a pool grows and shrinks): `concurrency` streams stay in flight, each one that ends is followed by the
next prompt (round the list again: a scenario lasts as long as a worker takes to start), until stop() or
max_requests; afterwards every stream is checked against the offline engine.

    with SteadyLoad(c.openai(), prompts(64, seed=1), max_tokens=16, concurrency=16) as load:
        load.wait_done(20, timeout=60)      # some streams served before the change
        ...                                 # change the cluster
    tally = load.tally(offline)             # Tally(requests=..., lost=0, errors=0)
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time

from tests.workers.test_cluster import stream_chat

STOP_WAIT_S = 150.0  # a stream in flight when the load stops ends within its client's 120 s timeout
MAX_REQUESTS = 5000  # a bound only: a scenario stops its load long before (some hundred streams)


@dataclasses.dataclass
class Stream:
    prompt: str
    result: dict | None = None  # stream_chat's answer, when it completed
    error: str | None = None  # what it raised instead (an HTTP error, an error event, a broken connection)


@dataclasses.dataclass
class Tally:
    requests: int
    lost: int  # completed without an error, but not with the offline engine's whole text: a silent loss
    errors: int  # failed with an error the client saw
    problems: list[str]  # the first few lost or failed streams, for the failure message


class SteadyLoad:
    def __init__(self, client, prompts: list[str], max_tokens: int, concurrency: int,
                 max_requests: int = MAX_REQUESTS):
        self.client, self.prompts, self.max_tokens, self.max_requests = client, prompts, max_tokens, max_requests
        self.streams: list[Stream] = []
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(concurrency)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _run(self):
        while not self._stopped.is_set():
            with self._lock:
                i = next(self._next)
                if i >= self.max_requests:
                    return
                stream = Stream(self.prompts[i % len(self.prompts)])
                self.streams.append(stream)
            try:
                stream.result = stream_chat(self.client, stream.prompt, self.max_tokens, ignore_eos=True)
            except Exception as e:  # counted as an error, and the load goes on
                stream.error = f"{type(e).__name__}: {e}"

    def done(self) -> int:
        return sum(s.result is not None or s.error is not None for s in self.streams)

    def wait_done(self, n: int, timeout: float):
        """Wait until n more streams have ended than now."""
        target, deadline = self.done() + n, time.monotonic() + timeout
        while self.done() < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.done()} of {target} streams ended within {timeout:g} s")
            if not any(t.is_alive() for t in self._threads):
                raise RuntimeError(f"the load reached its {self.max_requests} streams")
            time.sleep(0.1)

    def stop(self):
        """No new stream from now; wait for those in flight."""
        self._stopped.set()
        deadline = time.monotonic() + STOP_WAIT_S
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def tally(self, offline) -> Tally:
        """The streams against offline(prompts, max_tokens, ignore_eos=True), the offline engine's texts; a stream
        still running (stop timed out) counts as lost."""
        expected = dict(zip(self.prompts, offline(self.prompts, self.max_tokens, ignore_eos=True)))
        lost, errors = [], []
        for stream in self.streams:
            want = expected[stream.prompt]
            if stream.error is not None:
                errors.append(f"{stream.prompt!r}: {stream.error}")
            elif stream.result is None or stream.result["finish_reason"] != "length" or stream.result["text"] != want:
                lost.append(f"{stream.prompt!r}: got {stream.result}, want {want!r}")
        return Tally(len(self.streams), len(lost), len(errors), (errors + lost)[:5])
