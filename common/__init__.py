"""nano-pd's engine core. Heavy modules (torch, the model) load only when LLM is first used, so the router can
import the light parts (messages, sampling params, block hashes) without them."""
from common.errors import InvalidRequestError, ModelLoadError, NanoPDError
from common.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "InvalidRequestError", "ModelLoadError", "NanoPDError"]


def __getattr__(name):
    if name == "LLM":
        from common.llm import LLM
        return LLM
    raise AttributeError(name)
