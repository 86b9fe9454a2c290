"""Batched sampling: penalties, temperature, top-k, top-p, min-p, seeded draws and top-N logprobs.

Everything is one tensor op over the batch; the only per-sequence work is drawing noise for seeded requests.
A seeded draw depends only on (seed, position of the token drawn): a seed gives the same tokens whatever else
shares the batch, and whichever process samples a position (prefill worker, decode worker, a worker a request
migrated to, or the colocated engine), so seeded output is the same at every cluster size.
"""
import torch

from common.engine.sequence import Sequence


def _sequence_params(seqs: list[Sequence], device) -> dict[str, torch.Tensor]:
    rows = [(s.params.temperature, s.params.top_p, s.params.top_k if s.params.top_k > 0 else 0, s.params.min_p,
             s.params.presence_penalty, s.params.frequency_penalty, s.params.repetition_penalty) for s in seqs]
    t = torch.tensor(rows, dtype=torch.float32, device=device)
    return dict(zip(("temperature", "top_p", "top_k", "min_p", "presence", "frequency", "repetition"), t.unbind(1)))


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence], p: dict[str, torch.Tensor]) -> torch.Tensor:
    vocab = logits.shape[1]
    width = max(max(s.num_output_tokens for s in seqs), 1)
    outputs = torch.full((len(seqs), width), vocab, dtype=torch.long)
    for i, s in enumerate(seqs):
        outputs[i, :s.num_output_tokens] = torch.tensor(s.output_token_ids, dtype=torch.long)
    counts = torch.zeros(len(seqs), vocab + 1, device=logits.device).scatter_add_(
        1, outputs.to(logits.device), torch.ones_like(outputs, dtype=torch.float32, device=logits.device))[:, :vocab]
    seen = counts > 0
    if (p["repetition"] != 1.0).any():
        width = max(s.num_tokens for s in seqs)
        tokens = torch.full((len(seqs), width), vocab, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, :s.num_tokens] = torch.tensor(s.token_ids, dtype=torch.long)
        in_context = torch.zeros(len(seqs), vocab + 1, dtype=torch.bool, device=logits.device).scatter_(
            1, tokens.to(logits.device), True)[:, :vocab]
        rep = p["repetition"].unsqueeze(1)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(in_context, penalised, logits)
    return logits - p["frequency"].unsqueeze(1) * counts - p["presence"].unsqueeze(1) * seen


def _filter(logits: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """top-k, top-p and min-p as -inf masks on temperature-scaled logits."""
    vocab = logits.shape[1]
    sorted_logits, _ = logits.sort(-1, descending=True)
    k = torch.where(p["top_k"] > 0, p["top_k"], float(vocab)).long().clamp(1, vocab)
    kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))
    probs = sorted_logits.softmax(-1)
    # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
    mass_before = probs.cumsum(-1) - probs
    cut = (mass_before < p["top_p"].unsqueeze(1)).sum(-1, keepdim=True).clamp(min=1)
    top_p_threshold = sorted_logits.gather(1, cut - 1)
    min_p_threshold = sorted_logits[:, :1] + torch.log(p["min_p"].clamp(min=1e-30)).unsqueeze(1)
    threshold = torch.maximum(torch.maximum(kth, top_p_threshold), min_p_threshold)
    return logits.masked_fill(logits < threshold, float("-inf"))


def _position_seed(seed: int, position: int) -> int:
    """A well-mixed 63-bit seed per (request seed, token position): splitmix64's finaliser."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


def _apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    rows, cols, values = [], [], []
    for i, s in enumerate(seqs):
        for token, bias in (s.params.logit_bias or {}).items():
            rows.append(i)
            cols.append(token)
            values.append(bias)
    bias = torch.zeros_like(logits)
    bias[torch.tensor(rows), torch.tensor(cols)] = torch.tensor(values, dtype=logits.dtype)
    return logits + bias


def sample(logits: torch.Tensor, seqs: list[Sequence], positions: list[int] | None = None
           ) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits: [len(seqs), vocab] float32. Returns one token per row and its logprobs entry. positions: the index
    each row's token will have (default: appended to its sequence); a sequence verifying drafts has several rows."""
    p = _sequence_params(seqs, logits.device)
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    raw_logprobs = logits.log_softmax(-1) if any(want_logprobs) else None
    if any(s.params.logit_bias for s in seqs):
        logits = _apply_logit_bias(logits, seqs)
    if any(s.params.has_penalties for s in seqs):
        logits = _apply_penalties(logits, seqs, p)
    tokens = logits.argmax(-1)
    sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        sub = {k: v[rows] for k, v in p.items()}
        scaled = _filter(logits[rows] / sub["temperature"].unsqueeze(1), sub)
        probs = scaled.softmax(-1)
        noise = torch.empty_like(probs).exponential_()
        for j, i in enumerate(sampled_rows):
            seq = seqs[i]
            if seq.params.seed is not None:
                position = seq.num_tokens if positions is None else positions[i]
                generator = torch.Generator(device=logits.device).manual_seed(_position_seed(seq.params.seed,
                                                                                              position))
                noise[j].exponential_(generator=generator)
        # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race)
        tokens[rows] = (probs / noise).argmax(-1)
    token_list = tokens.tolist()
    entries: list[dict[int, float] | None] = [None] * len(seqs)
    if raw_logprobs is not None:
        n = max(s.params.logprobs or 0 for s in seqs)
        top_vals, top_ids = raw_logprobs.topk(max(n, 1), -1)
        chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        for i, s in enumerate(seqs):
            if want_logprobs[i]:
                k = s.params.logprobs
                entry = dict(zip(top_ids[i][:k], top_vals[i][:k]))
                entry[token_list[i]] = chosen[i]
                entries[i] = entry
    return token_list, entries
