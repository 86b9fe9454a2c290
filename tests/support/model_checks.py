"""Checks every architecture's tests share: our logits for a chunked prefill, and a 1P1D cluster serving a model
exactly like the offline engine."""
from __future__ import annotations

import contextlib

import torch


def prefill_logits(runner, prompt: list[int], splits: list[int]) -> torch.Tensor:
    """Our logits at every prompt position, prefilled as one sequence (blocks 0, 1, ...) in chunks ending at splits
    (later chunks read the earlier ones back from the paged cache)."""
    from common.layers.attention import AttentionMetadata, PrefillChunk

    bs, n = runner.block_size, len(prompt)
    ids, positions, table = torch.tensor(prompt), torch.arange(n), torch.arange(-(-n // bs))
    logits, start = [], 0
    with torch.inference_mode():
        for end in splits:
            meta = AttentionMetadata(slot_mapping=positions[start:end],
                                     prefills=[PrefillChunk(0, end - start, end, table if start else None)])
            logits.append(runner.model.compute_logits(runner.model(ids[start:end], positions[start:end], meta)))
            start = end
    return torch.cat(logits).float()


@contextlib.contextmanager
def cluster_serving_like_offline(model_dir: str, transport: str, max_tokens: int = 24, num_prompts: int = 12,
                                 prefill_args: tuple[str, ...] = (), decode_args: tuple[str, ...] = ()):
    """A router + 1 prefill + 1 decode worker on model_dir whose streamed greedy chats equal the offline engine's,
    with both workers used, the transport asked for, and no block held afterwards. Yields (cluster, offline LLM,
    prompts) for the caller's own checks on the same run. prefill_args / decode_args: more flags for each worker
    (the offline engine keeps its defaults)."""
    from common import SamplingParams
    from common.engine import LLM
    from tests.support.cluster_harness import LocalCluster, assert_idle
    from tests.workers.test_cluster import prompts, run_concurrently, stream_chat

    ps = prompts(num_prompts, seed=5)
    llm = LLM(model_dir, num_kv_blocks=512)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    expected = [o["text"] for o in llm.chat([[{"role": "user", "content": p}] for p in ps], params)]
    with LocalCluster(model_dir, 0, 0, transport=transport) as c:
        c.add("prefill", extra=prefill_args)
        c.add("decode", extra=decode_args)
        client = c.openai()
        results = run_concurrently(lambda p: stream_chat(client, p, max_tokens, ignore_eos=True), ps,
                                   workers=num_prompts)
        assert [r["text"] for r in results] == expected
        assert all(r["usage"].completion_tokens == max_tokens for r in results)
        for w in c.alive("prefill") + c.alive("decode"):
            assert w["assigned"] > 0 and w["kv_transport"] == transport
        assert_idle(c)
        yield c, llm, ps
