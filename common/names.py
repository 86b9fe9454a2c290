"""Model names every plane agrees on: the embedded default model, the name clients use, and what --model means.

Torch-free: the router and the launcher resolve names too. Only converting a GGUF file (resolve_model on a .gguf
or the default model) loads the model package, and with it torch.
"""
import os

from common.errors import ModelLoadError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def is_default_model(model: str | None) -> bool:
    return model is None or model in (DEFAULT_MODEL, "default")


def served_model_name(model: str | None) -> str:
    """The name clients use: the default model's name, a .gguf file's stem, or a folder's basename."""
    if is_default_model(model):
        return DEFAULT_MODEL
    base = os.path.basename(os.path.normpath(model))
    return base[:-5] if base.endswith(".gguf") else base


def gguf_source(model: str | None) -> str | None:
    """The .gguf file that `model` names (the default model's included), or None."""
    if is_default_model(model):
        from common.models import gguf

        return gguf.default_gguf_path()
    return model if os.path.isfile(model) and model.endswith(".gguf") else None


def resolve_model(model: str | None, dtype: str = "float32") -> str:
    """A model folder for a folder, a .gguf file (converted once, then cached) or the default model's name."""
    source = gguf_source(model)
    if source:
        from common.models import gguf

        return gguf.gguf_to_hf_folder(source, dtype=dtype)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ModelLoadError(f"{model} has no config.json; expected an HF model folder")
        return model
    raise ModelLoadError(f"model {model!r} not found: give an HF model folder, a .gguf file, "
                         f"or {DEFAULT_MODEL!r}")
