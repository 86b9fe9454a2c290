"""Build tiny random-weight HF model folders (Llama / Qwen3 / Qwen3-MoE / MiniMax-M2) for parity tests.

Everything is generated locally and deterministically (no hub access):
a seeded random-weight model saved with ``save_pretrained`` (config.json +
model.safetensors) plus a small byte-level BPE tokenizer trained with the
``tokenizers`` library on generated text, wrapped as a
``PreTrainedTokenizerFast`` with eos/bos/pad tokens and a ChatML chat template.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Weight init std. HF's default initializer_range (0.02) gives a tiny model whose
# logits have a std of ~0.2 and whose greedy output is dominated by the last
# token (short repeating cycles). 0.15 gives logits with std ~1.5-2, clearly
# separated top-2 logits and varied continuations (checked in test_hf_reference).
DEFAULT_INIT_STD = 0.15


@dataclass(frozen=True)
class TinyConfig:
    arch: str = "llama"  # "llama" | "qwen3"
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 32
    tie_word_embeddings: bool = False
    hidden_size: int = 128
    num_layers: int = 2
    vocab_size: int = 512
    intermediate_size: int | None = None
    max_position_embeddings: int = 2048
    seed: int = 0
    init_std: float = DEFAULT_INIT_STD

    @property
    def id(self) -> str:
        return (
            f"{self.arch}-h{self.num_heads}kv{self.num_kv_heads}-d{self.head_dim}"
            f"-{'tied' if self.tie_word_embeddings else 'untied'}-hid{self.hidden_size}"
        )


@dataclass(frozen=True)
class TinyMoeConfig(TinyConfig):
    """A tiny mixture-of-experts model: arch "qwen3_moe" or "minimax_m2"."""

    arch: str = "qwen3_moe"
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 64  # each expert's (MiniMax-M2 calls it intermediate_size)
    norm_topk_prob: bool = True  # qwen3_moe only; minimax_m2 always renormalises
    mlp_only_layers: tuple = ()  # qwen3_moe: layers with a dense MLP instead of experts
    rotary_dim: int | None = None  # minimax_m2: rotary on the first rotary_dim features of each head
    # minimax_m2: e_score_correction_bias ~ N(0, bias_std), large enough against the sigmoid scores' gaps
    # that it changes some tokens' choice of experts (zero would leave the bias path untested)
    bias_std: float = 0.2

    @property
    def id(self) -> str:
        return f"{super().id}-e{self.num_experts}k{self.top_k}-s{self.seed}"


# ----------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------

_SYLLABLES = [
    "ka", "lo", "mi", "ten", "ra", "qu", "ish", "om", "bel", "dra", "ne", "st", "ur",
    "pha", "ix", "zo", "gen", "tal", "ver", "cu", "ly", "an", "the", "ing", "ed",
    "ion", "er", "re", "pro", "sy", "mo", "del", "ca", "che", "ble", "at", "ou",
]
_WORDS = [
    "the", "of", "and", "to", "in", "is", "model", "token", "cache", "block", "prefix",
    "attention", "layer", "what", "capital", "France", "Paris", "hello", "world", "a",
    "batch", "sequence", "decode", "prefill", "engine", "serving", "query", "key", "value",
]


def _corpus(num_lines: int = 600, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = []
        for _ in range(rng.randint(4, 18)):
            r = rng.random()
            if r < 0.45:
                words.append(rng.choice(_WORDS))
            elif r < 0.9:
                words.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
            else:
                words.append(str(rng.randint(0, 9999)))
        line = " ".join(words)
        if rng.random() < 0.5:
            line = line.capitalize()
        line += rng.choice([".", "?", "!", ",", ":", ""])
        lines.append(line)
    return lines


def make_tokenizer(vocab_size: int):
    """Byte-level BPE with exactly ``vocab_size`` entries (padded with reserved tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    n = tok.get_vocab_size()
    if n < vocab_size:
        # pad to exactly vocab_size so every model id decodes to something
        from tokenizers import AddedToken

        tok.add_tokens(
            [AddedToken(f"<|reserved_{i}|>", special=False) for i in range(vocab_size - n)]
        )
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------


def _hf_config(cfg: TinyConfig, eos_id: int, bos_id: int, pad_id: int):
    inter = cfg.intermediate_size or (cfg.hidden_size * 2 + 32)
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=inter,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.init_std,
        rms_norm_eps=1e-6,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        attention_bias=False,
    )
    if cfg.arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(rope_theta=10000.0, mlp_bias=False, **common)
    if cfg.arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(rope_theta=1000000.0, use_sliding_window=False, **common)
    if cfg.arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            rope_theta=1000000.0, use_sliding_window=False, num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
            mlp_only_layers=list(cfg.mlp_only_layers), **common,
        )
    if cfg.arch == "minimax_m2":
        from transformers import MiniMaxM2Config

        common.pop("attention_bias")
        common["intermediate_size"] = cfg.moe_intermediate_size
        return MiniMaxM2Config(
            rope_theta=5000000.0, rotary_dim=cfg.rotary_dim or cfg.head_dim,
            num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, **common,
        )
    raise ValueError(f"unknown arch {cfg.arch!r}")


def _init_weights(model: torch.nn.Module, std: float, seed: int) -> None:
    """Explicit deterministic init: N(0, std) for matrices/embeddings, norm weights
    ~ 1 + N(0, 0.1) (non-trivial so a missing/mis-loaded norm is caught)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
            else:  # biases (none by default)
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _init_correction_bias(model: torch.nn.Module, std: float, seed: int) -> None:
    """e_score_correction_bias is a buffer, which _init_weights leaves at zero."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * std)


def make_tiny_model(
    directory,
    arch: str = "llama",
    num_heads: int = 4,
    num_kv_heads: int = 4,
    head_dim: int = 32,
    tie_word_embeddings: bool = False,
    hidden_size: int = 128,
    num_layers: int = 2,
    vocab_size: int = 512,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    init_std: float = DEFAULT_INIT_STD,
) -> Path:
    """Create a tiny random HF model folder in ``directory`` and return its path."""
    cfg = TinyConfig(
        arch=arch, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        tie_word_embeddings=tie_word_embeddings, hidden_size=hidden_size,
        num_layers=num_layers, vocab_size=vocab_size, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, seed=seed, init_std=init_std,
    )
    return make_tiny_model_from_config(directory, cfg)


def save_random_model(directory, vocab_size: int, seed: int, init_std: float, hf_config, customize=None) -> Path:
    """The tiny tokenizer plus a seeded random model built from hf_config(bos_id, eos_id, pad_id), saved as an HF
    folder; customize(model) adjusts weights that _init_weights leaves generic."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(vocab_size)
    bos_id, eos_id, pad_id = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(bos_id, eos_id, pad_id), dtype=torch.float32).eval()
    _init_weights(model, init_std, seed)
    if customize is not None:
        customize(model)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def make_tiny_model_from_config(directory, cfg: TinyConfig) -> Path:
    def customize(model):
        if isinstance(cfg, TinyMoeConfig):
            _init_correction_bias(model, cfg.bias_std, cfg.seed)
        if cfg.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    directory = save_random_model(directory, cfg.vocab_size, cfg.seed, cfg.init_std,
                                  lambda bos, eos, pad: _hf_config(cfg, eos, bos, pad), customize)
    with open(directory / "tiny_config.json", "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    return directory


if __name__ == "__main__":  # manual: python tests/support/tiny_models.py /tmp/tiny
    import sys

    out = make_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny_llama")
    print(out, sorted(os.listdir(out)))


# the model the end-to-end cluster tests serve: small enough that a worker starts in seconds
SERVING_TINY = TinyConfig(arch="llama", num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=128, num_layers=2,
                          vocab_size=512)
