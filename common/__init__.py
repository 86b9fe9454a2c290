"""What every plane shares, torch-free: errors, sampling parameters, grammar specs, model names and block hashes.
The engine is `common.engine`, the control plane `common.cluster`, tensor parallelism `common.parallel`."""
from common.errors import InvalidRequestError, ModelLoadError, NanoPDError
from common.sampling_params import SamplingParams

__all__ = ["SamplingParams", "InvalidRequestError", "ModelLoadError", "NanoPDError"]
