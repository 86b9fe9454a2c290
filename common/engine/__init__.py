"""One process's engine: config, the engine loop, scheduler, block manager, sequences, the model runner and its KV
cache, compiled steps, speculative decoding, the offline LLM and the chat CLI."""
from common.engine.llm import LLM

__all__ = ["LLM"]
