"""Model classes by the name in config.architectures."""
from common.errors import ModelLoadError
from common.models.llama import LlamaForCausalLM
from common.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


# configs converted from GGUF name only a model_type
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def model_class(hf_config):
    archs = getattr(hf_config, "architectures", None) or [MODEL_TYPES.get(getattr(hf_config, "model_type", None))]
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ModelLoadError(f"unsupported architecture {getattr(hf_config, 'architectures', None)}; "
                         f"supported: {', '.join(sorted(MODEL_REGISTRY))}")
