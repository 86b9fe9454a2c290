"""Rotary position embedding with a precomputed cos/sin table (rotate-half layout, as transformers' Llama)."""
import math

import torch
from torch import nn

from common.errors import ModelLoadError


def rope_parameters(hf_config) -> dict:
    """rope settings from a transformers 5 (rope_parameters) or 4 (rope_theta + rope_scaling) config."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params.update(getattr(hf_config, "rope_scaling", None) or {})
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    if "partial_rotary_factor" not in params and getattr(hf_config, "rotary_dim", None):
        # configs written for transformers 4 name the rotated width directly (MiniMax-M2)
        params["partial_rotary_factor"] = hf_config.rotary_dim / (getattr(hf_config, "head_dim", None) or
                                                                  hf_config.hidden_size // hf_config.num_attention_heads)
    return params


def _inv_freq(dim: int, params: dict) -> torch.Tensor:
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = params["rope_type"]
    if kind == "yarn":
        return _yarn_inv_freq(dim, params)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / params["factor"]
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ModelLoadError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3, yarn)")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_factor(params: dict, max_positions: int) -> float:
    # DeepSeek-V3 configs may leave factor out; transformers then derives it from the context extension
    return params.get("factor") or max_positions / params["original_max_position_embeddings"]


def _yarn_inv_freq(dim: int, params: dict) -> torch.Tensor:
    """YaRN: interpolate the low frequencies, keep the high ones, ramp between (in transformers' float order)."""
    base, old_len = params["rope_theta"], params["original_max_position_embeddings"]
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the original (extrapolated) frequency is kept
    return 1.0 / (params["factor"] * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep


def _attention_factor(params: dict) -> float:
    """How much YaRN scales cos and sin (1 for every other rope type)."""
    if params["rope_type"] != "yarn":
        return 1.0
    if params.get("attention_factor") is not None:
        return params["attention_factor"]
    factor, mscale, mscale_all = params["factor"], params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    return yarn_mscale(factor)


class RotaryEmbedding(nn.Module):
    """Rotates the first rotary_dim = head_dim * partial_rotary_factor features of each head; the rest pass."""

    def __init__(self, head_dim: int, max_positions: int, params: dict):
        super().__init__()
        if params["rope_type"] == "yarn":
            params = {**params, "factor": _yarn_factor(params, max_positions)}
        self.rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.partial = self.rotary_dim < head_dim
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), _inv_freq(self.rotary_dim, params))
        emb = torch.cat((freqs, freqs), -1)
        scale = _attention_factor(params)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), -1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        if self.partial:
            d = self.rotary_dim
            q_rot, k_rot = q[..., :d], k[..., :d]
            return (torch.cat((q_rot * cos + self._rotate_half(q_rot) * sin, q[..., d:]), -1),
                    torch.cat((k_rot * cos + self._rotate_half(k_rot) * sin, k[..., d:]), -1))
        return q * cos + self._rotate_half(q) * sin, k * cos + self._rotate_half(k) * sin
