"""The offline API: LLM(model, **engine_args).generate(prompts, sampling_params)."""
from common.engine.config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.errors import InvalidRequestError
from common.sampling_params import SamplingParams
from common.engine.sequence import Sequence


class LLM:
    def __init__(self, model: str | None = None, **engine_args):
        from transformers import AutoTokenizer

        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.tokenizer = AutoTokenizer.from_pretrained(self.engine.config.model)

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return list(prompt)
        raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[dict]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
        # validate every prompt before any is queued, so a bad one leaves the engine untouched
        encoded = [self.encode(p) for p in prompts]
        seqs: list[Sequence] = []
        try:
            for ids, p in zip(encoded, params):
                seqs.append(self.engine.add_request(ids, p))
        except InvalidRequestError:
            self._abort(seqs)
            raise
        progress = None
        if use_tqdm:
            from tqdm.auto import tqdm
            progress = tqdm(total=len(seqs), desc="generate")
        while self.engine.has_unfinished():
            done = sum(s.is_finished for s in self.engine.step())
            if progress is not None and done:
                progress.update(done)
        if progress is not None:
            progress.close()
        return [self._output(s) for s in seqs]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, use_tqdm: bool = False,
             **template_kwargs) -> list[dict]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False, **template_kwargs)
                   for c in conversations]
        # the rendered template already holds the special tokens
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(ids, sampling_params, use_tqdm=use_tqdm)

    def _abort(self, seqs: list[Sequence]):
        for seq in seqs:
            self.engine.scheduler.waiting.remove(seq)

    def _output(self, seq: Sequence) -> dict:
        return {
            "text": self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True),
            "token_ids": seq.output_token_ids,
            "prompt_token_ids": seq.token_ids[:seq.num_prompt_tokens],
            "finish_reason": seq.finish_reason,
            "logprobs": seq.logprobs,
            "num_cached_tokens": seq.num_cached_tokens,
            # speculative decoding: draft tokens this request verified, and how many of them were kept
            "num_draft_tokens": seq.num_spec_draft_tokens,
            "num_accepted_tokens": seq.num_spec_accepted_tokens,
        }

    def stats(self) -> dict:
        return self.engine.stats()

    def close(self):
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
