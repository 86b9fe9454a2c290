"""Loads safetensors checkpoints into our (fused, possibly sharded) parameters."""
import glob
import os

from safetensors import safe_open
from torch import nn

from common.errors import ModelLoadError


def load_weights(model: nn.Module, folder: str):
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {folder}")
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules", {})
    tied = getattr(model.config, "tie_word_embeddings", False)
    loaded = set()
    for path in files:
        with safe_open(path, "pt") as f:
            for name in f.keys():
                if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
                    continue
                target, shard_id = name, None
                for ckpt_part, (our_part, shard) in packed.items():
                    if f".{ckpt_part}." in name:
                        target, shard_id = name.replace(f".{ckpt_part}.", f".{our_part}."), shard
                        break
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
