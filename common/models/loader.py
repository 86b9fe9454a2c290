"""Loads safetensors checkpoints into our (fused, possibly sharded) parameters."""
import glob
import os

from safetensors import safe_open
from torch import nn

from common.errors import ModelLoadError
from common.layers.moe import expert_checkpoint_target


def checkpoint_target(model: nn.Module, name: str) -> tuple[str, object]:
    """Checkpoint tensor name -> (our parameter name, shard id or None).

    Module renames (e.g. MiniMax's block_sparse_moe -> mlp) apply first, then expert weights go to their FusedMoE
    stack, then the packed mapping (q/k/v -> qkv_proj, gate/up -> gate_up_proj) applies."""
    for ckpt_part, our_part in getattr(model, "renamed_modules", {}).items():
        name = name.replace(f".{ckpt_part}.", f".{our_part}.")
    expert = expert_checkpoint_target(name, getattr(model, "expert_proj_names", {}))
    if expert is not None:
        return expert
    for ckpt_part, (our_part, shard) in getattr(model, "packed_modules", {}).items():
        if f".{ckpt_part}." in name:
            return name.replace(f".{ckpt_part}.", f".{our_part}."), shard
    return name, None


def load_weights(model: nn.Module, folder: str):
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {folder}")
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model.config, "tie_word_embeddings", False)
    loaded = set()
    for path in files:
        with safe_open(path, "pt") as f:
            for name in f.keys():
                if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
                    continue
                target, shard_id = checkpoint_target(model, name)
                param = params.get(target)
                if param is None:
                    raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
                tensor = f.get_tensor(name)
                loader = getattr(param, "weight_loader", None)
                if loader is None:
                    param.data.copy_(tensor)
                elif shard_id is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard_id)
                loaded.add(target)
    missing = {n for n in params if n not in loaded and not (tied and n == "lm_head.weight")}
    if missing:
        raise ModelLoadError(f"checkpoint in {folder} lacks {sorted(missing)[:5]} ...")
