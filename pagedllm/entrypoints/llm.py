"""The offline API: ``LLM(...).generate(prompts, sampling_params)`` and ``LLM.chat(...)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from pagedllm.engine.beam_search import (
    BeamBatch,
    BeamSearch,
    BeamSearchOutput,
    BeamSearchParams,
    round_params,
)
from pagedllm.engine.inputs import PromptType
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.entrypoints.chat_utils import render_chat
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """Loads a model and generates for batches of prompts with continuous batching.

    Keyword arguments are the engine's (see ``pagedllm.config``): ``max_model_len``,
    ``max_num_seqs``, ``max_num_batched_tokens``, ``block_size``, ``kv_cache_memory_bytes``,
    ``enable_chunked_prefill``, ``enable_prefix_caching``, ``dtype``, ``seed``, ...
    ``model=None`` loads the default model (SmolLM2-135M-Instruct).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine.from_engine_args(model=model, **kwargs)
        self._ids = itertools.count()

    def get_tokenizer(self):  # noqa: ANN201 - pagedllm.tokenizer.Tokenizer
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None
                 ) -> list[RequestOutput]:
        """Completes each prompt; outputs come back in input order. A prompt is text, token ids
        or a dict ``{"prompt": text}`` / ``{"prompt_token_ids": ids}`` with optional
        ``"multi_modal_data": {"image": image or [images]}`` (PIL images). ``priority``: one per
        prompt, lower first (needs ``scheduling_policy="priority"``)."""
        prompts = _prompt_list(prompts)
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"The lengths of prompts ({len(prompts)}) and priority "
                             f"({len(priority)}) must be the same.")
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                p = _final_only(p)
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, p,
                                        priority=priority[i] if priority else 0)
                ids.append(request_id)
            return self._run(ids, use_tqdm)
        except BaseException:
            self.engine.abort_request(ids)
            raise

    def chat(self, messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generates replies to one conversation or a batch of them (OpenAI-style messages)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[PromptType] = []
        for conversation in conversations:
            _, token_ids, images = render_chat(
                self.engine.tokenizer, conversation, self.engine.input_processor.supports_images,
                add_generation_prompt)
            prompts.append({"prompt_token_ids": token_ids,
                            "multi_modal_data": {"image": images}} if images else token_ids)
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's beam search (see ``pagedllm.engine.beam_search``): one output per prompt, its
        ``sequences`` best first. A sequence's ``tokens`` are the prompt's and the generated
        ones; its ``text`` is theirs decoded with special tokens, as vLLM's, except that a final
        EOS is in it only with ``include_stop_str_in_output`` (vLLM always puts it there)."""
        prompts = _prompt_list(prompts)
        max_logprobs = self.engine.config.model.max_logprobs
        if 2 * params.beam_width > max_logprobs:  # each round asks for 2 * beam_width logprobs
            raise ValueError(f"beam_width must be at most max_logprobs / 2 "
                             f"({max_logprobs // 2}), got {params.beam_width}.")
        token_lists = [self._beam_prompt(p, params) for p in prompts]
        tokenizer = self.engine.tokenizer
        batch = BeamBatch([BeamSearch(ids, params, tokenizer.eos_token_id)
                           for ids in token_lists])
        sampling = round_params(params)
        bar = tqdm(total=params.max_tokens, desc="Beam search", disable=not use_tqdm)
        while not batch.finished:
            # Every live beam of every prompt in one batch: the engine runs them together.
            outputs = self.generate(batch.requests(), sampling, use_tqdm=False)
            batch.advance([out.outputs[0] for out in outputs])
            bar.update(1)
        bar.close()
        results = []
        for search in batch.searches:
            best = search.best()
            for beam in best:
                ends_with_eos = beam.finish_reason == "stop"
                tokens = beam.tokens[:-1] if ends_with_eos and not \
                    params.include_stop_str_in_output else beam.tokens
                beam.text = tokenizer.decode(tokens, skip_special_tokens=False)
            results.append(BeamSearchOutput(best))
        return results

    def _beam_prompt(self, prompt: PromptType, params: BeamSearchParams) -> list[int]:
        processed = self.engine.input_processor.process(prompt)
        if processed.images:
            raise ValueError("beam search does not take images.")
        limit = self.engine.config.model.max_model_len
        if len(processed.token_ids) + params.max_tokens > limit:
            raise ValueError(f"a prompt of {len(processed.token_ids)} tokens plus max_tokens "
                             f"{params.max_tokens} exceeds max_model_len ({limit}).")
        return processed.token_ids

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm or len(ids) < 2)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[i] for i in ids]


def _prompt_list(prompts: PromptType | Sequence[PromptType]) -> Sequence[PromptType]:
    """One prompt (text, a dict, token ids) as a list of one; a list of prompts as it is."""
    if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
        return [prompts]  # type: ignore[list-item]
    return prompts  # type: ignore[return-value]


def _final_only(params: SamplingParams) -> SamplingParams:
    if params.output_kind == RequestOutputKind.FINAL_ONLY:
        return params
    import copy

    params = copy.copy(params)
    params.output_kind = RequestOutputKind.FINAL_ONLY
    return params
