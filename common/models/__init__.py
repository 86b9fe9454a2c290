"""Model classes by the name in config.architectures."""
from common.errors import ModelLoadError
from common.models.deepseek_v3 import DeepseekV3ForCausalLM
from common.models.llama import LlamaForCausalLM
from common.models.minimax_m2 import MiniMaxM2ForCausalLM
from common.models.qwen3 import Qwen3ForCausalLM
from common.models.qwen3_moe import Qwen3MoeForCausalLM
from common.models.qwen3_next import Qwen3NextForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MiniMaxM2ForCausalLM": MiniMaxM2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "Qwen3NextForCausalLM": Qwen3NextForCausalLM,
}


# configs converted from GGUF name only a model_type
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
               "minimax_m2": "MiniMaxM2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
               "qwen3_next": "Qwen3NextForCausalLM"}


def model_class(hf_config):
    archs = getattr(hf_config, "architectures", None) or [MODEL_TYPES.get(getattr(hf_config, "model_type", None))]
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ModelLoadError(f"unsupported architecture {getattr(hf_config, 'architectures', None)}; "
                         f"supported: {', '.join(sorted(MODEL_REGISTRY))}")
