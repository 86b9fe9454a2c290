"""Speculative decoding: propose a few tokens per running decode, and let one forward pass of the target check them.

Two proposers: n-gram prompt lookup (ngram.py) and a smaller draft model run greedily (draft_model.py).

Verification is exact by construction: every position is sampled exactly as plain decoding would sample it (the
same logits, and for seeded requests the same per-position noise), and a draft token is kept only while it equals
that sample. Greedy and seeded output are therefore identical to decoding without speculation, and unseeded
sampling follows the target distribution: both proposals are deterministic functions of the tokens so far, so they
need no rejection-sampling correction. (vLLM's rejection sampler accepts more often at temperature > 0 for a draft
model, by using the draft's probabilities, but its output cannot equal a seeded plain run.)
"""
