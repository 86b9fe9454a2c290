"""Engine configuration: resolves the model, reads its HF config and checks the engine arguments."""
import logging
import os
from dataclasses import dataclass, field

import torch

from common.engine_args import EngineArgs
from common.errors import InvalidRequestError, ModelLoadError
from common.names import gguf_source, resolve_model

log = logging.getLogger("nano_pd.config")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# What dtype=auto means can be pinned for a whole deployment (or a test suite: its oracle is float32).
AUTO_DTYPE_ENV = "NANO_PD_DTYPE"


def native_bf16() -> bool:
    """bf16 matmuls run on bf16 instructions here (AVX-512 BF16) instead of being emulated through float32.

    torch asks cpuid at run time, so a CPU that lists a feature the VM does not let it use is not counted."""
    return bool(torch.cpu._is_avx512_bf16_supported() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def auto_dtype(device: torch.device, hf_config) -> str:
    """$NANO_PD_DTYPE when set; on a CPU bfloat16 where it is native (twice the matmul rate and half the bytes of
    float32) and float32 elsewhere (emulated bf16 is slower than float32); on a GPU the checkpoint's own dtype."""
    pinned = os.environ.get(AUTO_DTYPE_ENV, "auto")
    if pinned != "auto":
        return pinned
    if device.type == "cpu":
        return "bfloat16" if native_bf16() else "float32"
    name = str(getattr(hf_config, "dtype", None) or "float32").replace("torch.", "")
    return name if name in DTYPES else "float32"


@dataclass
class EngineConfig(EngineArgs):
    """EngineArgs (the options and their defaults), checked, with the model resolved and its HF config read."""
    hf_config: object = field(default=None, repr=False)
    gguf_file: str | None = None  # the .gguf file the model was converted from

    def __post_init__(self):
        from transformers import AutoConfig

        def check(ok: bool, msg: str):
            if not ok:
                raise InvalidRequestError(msg)

        check(self.dtype == "auto" or self.dtype in DTYPES, f"dtype must be auto or one of {list(DTYPES)}")
        check(os.environ.get(AUTO_DTYPE_ENV, "auto") in ("auto", *DTYPES),
              f"${AUTO_DTYPE_ENV} must be auto or one of {list(DTYPES)}")
        check(isinstance(self.block_size, int) and self.block_size >= 1, "block_size must be a positive integer")
        check(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        check(isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens >= 1,
              "max_num_batched_tokens must be >= 1")
        from common.engine.compiled_step import AUTO_MODE_ENV, MODES
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise InvalidRequestError(f"bad device {self.device!r}: {e}") from e
        check(device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available()),
              f"device {self.device!r} is not available here (cpu{', cuda' if torch.cuda.is_available() else ''})")
        check(self.decode_mode != "cuda_graph" or device.type == "cuda", "decode_mode cuda_graph needs a CUDA device")
        check(self.decode_mode in MODES, f"decode_mode must be one of {list(MODES)}")
        check(os.environ.get(AUTO_MODE_ENV) in (None, "", "eager", "compile"),
              f"${AUTO_MODE_ENV} must be eager or compile")
        check(self.num_kv_blocks is None or (isinstance(self.num_kv_blocks, int) and self.num_kv_blocks >= 1),
              "num_kv_blocks must be a positive integer")
        check(self.quantization in ("auto", "none", "int4"), "quantization must be auto, none or int4")
        from common.layers.quantized_linear import GROUP_SIZES
        check(self.quantization_group_size in GROUP_SIZES, f"quantization_group_size must be one of {GROUP_SIZES}")
        self.gguf_file = gguf_source(self.model)
        self.model = resolve_model(self.model, "float32" if self.dtype == "auto" else self.dtype)
        try:
            self.hf_config = AutoConfig.from_pretrained(self.model)
        except Exception as e:  # transformers raises several kinds for unreadable configs
            raise ModelLoadError(f"cannot read the config of {self.model}: {e}") from e
        if self.dtype == "auto":
            self.dtype = auto_dtype(device, self.hf_config)
        if self.quantization == "auto":
            # torch's int4 kernel is fast for bf16 activations only; float32 keeps the parity path
            self.quantization = "int4" if self.gguf_file and self.dtype == "bfloat16" and device.type == "cpu" \
                else "none"
        check(self.quantization == "none" or device.type == "cpu", "int4 weights run on the CPU only")
        limit = self.hf_config.max_position_embeddings
        check(self.max_model_len is None or 1 <= self.max_model_len <= limit,
              f"max_model_len must be in [1, {limit}] for this model")
        self.max_model_len = self.max_model_len or limit
        from common.engine.spec_decode.config import SpeculativeConfig
        self.speculative = SpeculativeConfig.from_dict(self.speculative_config)
        from common.models import model_class
        arch = model_class(self.hf_config)
        self._check_parallelism(arch, check)
        if getattr(arch, "has_recurrent_state", False):
            # the state of a sequence is one running value: no other sequence can start from it (prefix
            # caching) and rejected draft tokens cannot be taken back out of it (speculative decoding)
            check(self.speculative is None, f"{arch.__name__} keeps a recurrent state that cannot be rolled back: "
                                            f"speculative decoding is not supported for it")
            if self.enable_prefix_caching:
                log.info("%s keeps a per-sequence recurrent state: prefix caching is off", arch.__name__)
                self.enable_prefix_caching = False

    def _check_parallelism(self, arch, check):
        tp, hf = self.tensor_parallel_size, self.hf_config
        check(isinstance(tp, int) and tp >= 1, "tensor_parallel_size must be a positive integer")
        experts = next((getattr(hf, name) for name in ("num_experts", "n_routed_experts", "num_local_experts")
                        if getattr(hf, name, None)), 0)
        check(not self.enable_expert_parallel or experts, f"enable_expert_parallel needs a mixture-of-experts model; "
                                                          f"{arch.__name__} has no experts")
        if tp == 1:
            return
        check(not getattr(arch, "has_recurrent_state", False),
              f"{arch.__name__}'s linear-attention layers are not sharded: tensor_parallel_size must be 1")
        check(self.quantization == "none", "int4 weights are not sharded: tensor_parallel_size must be 1, "
                                           "or quantization none")
        check(self.speculative is None or self.speculative.method != "draft_model",
              "a draft model is not supported with tensor_parallel_size > 1 (n-gram speculation is)")
        check(torch.device(self.device).type == "cpu" or torch.cuda.device_count() >= tp,
              f"tensor_parallel_size {tp} needs {tp} GPUs, this machine has {torch.cuda.device_count()}")
        heads = hf.num_attention_heads
        kv_heads = getattr(hf, "num_key_value_heads", None) or heads
        check(heads % tp == 0, f"tensor_parallel_size {tp} must divide the {heads} attention heads")
        check(kv_heads % tp == 0 or tp % kv_heads == 0,
              f"tensor_parallel_size {tp} and the {kv_heads} KV heads must divide one another")
        sliced = ["intermediate_size", "shared_expert_intermediate_size"]
        if self.enable_expert_parallel:
            check(experts % tp == 0, f"expert parallelism over {tp} ranks must divide the {experts} experts")
        else:
            sliced.append("moe_intermediate_size")
        for name in sliced:
            size = getattr(hf, name, None)
            check(not size or size % tp == 0, f"tensor_parallel_size {tp} must divide {name} ({size})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
