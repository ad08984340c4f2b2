"""Frontend: what the offline ``LLMEngine`` and the server's ``AsyncLLM`` share.

The door: a user's prompt and parameters are validated (a bad one raises ``ValueError`` before
anything reaches the core), tokenized, their images processed, and fanned out into the core's
requests. The way back: the core's step messages become ``RequestOutput``s. Neither loads a model.
"""

from __future__ import annotations

import copy
from typing import Any

from pagedllm.core.scheduler import check_prompt_fits
from pagedllm.distributed.launch import become_worker_if_torchrun, tensor_parallel_size
from pagedllm.engine.builder import FrontendParts, build_frontend
from pagedllm.engine.core_client import MPClient
from pagedllm.engine.inputs import ProcessedPrompt, PromptType
from pagedllm.engine.messages import EngineCoreOutputs, EngineCoreRequest
from pagedllm.engine.output_processor import OutputProcessor, ProcessedOutputs
from pagedllm.engine.parallel_sampling import fan_out
from pagedllm.sampling_params import SamplingParams


class Frontend:
    def __init__(self, parts: FrontendParts) -> None:
        self.config = parts.config
        self.arch = parts.arch
        self.tokenizer = parts.tokenizer
        self.input_processor = parts.input_processor
        self.model_name = parts.model_name
        self.default_sampling = parts.default_sampling
        self.vocab_size = parts.arch.vocab_size
        self.output_processor = OutputProcessor(parts.tokenizer)
        self._eos_ids = set(parts.arch.eos_token_ids)
        if parts.tokenizer.eos_token_id is not None:
            self._eos_ids.add(parts.tokenizer.eos_token_id)

    @classmethod
    def from_engine_args(cls, kwargs: dict[str, Any]) -> Frontend:
        return cls(build_frontend(kwargs))

    @property
    def max_model_len(self) -> int:
        return int(self.config.model.max_model_len)

    def add(self, request_id: str, prompt: PromptType | ProcessedPrompt, params: SamplingParams,
            arrival_time: float, priority: int = 0) -> list[EngineCoreRequest]:
        """Validates and registers a request; returns what to send to the core."""
        check_priority(priority, self.config.scheduler.scheduling_policy)
        processed = self.input_processor.process(prompt)
        self._validate(processed.token_ids, params)
        params = copy.copy(params)
        params.all_stop_token_ids = set(self._eos_ids)
        params.update_from_tokenizer(self.tokenizer)
        samples = fan_out(request_id, processed, params, arrival_time, priority)
        if self.output_processor.is_in_use(request_id, samples):
            raise ValueError(f"Request id {request_id!r} is already in use.")
        self.output_processor.add(request_id, processed.text, params, samples, arrival_time)
        return samples

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("The prompt cannot be empty.")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary (size {self.vocab_size}).")
        check_prompt_fits(len(token_ids), self.max_model_len)
        params.check_limits(self.vocab_size, self.config.model.max_logprobs)

    def abort(self, request_id: str) -> list[str]:
        """Forgets the request; returns the core requests to abort."""
        return self.output_processor.abort(request_id)

    def process(self, message: EngineCoreOutputs, now: float) -> ProcessedOutputs:
        return self.output_processor.process(message, now)

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.states)


def check_priority(priority: int, policy: str) -> None:
    """vLLM's rule and message: a priority other than 0 needs the priority policy."""
    if priority != 0 and policy != "priority":
        raise ValueError(f"Got priority {priority} but Priority scheduling is not enabled.")


def start_with_core(engine_kwargs: dict[str, Any],
                    in_thread: bool = False) -> tuple[Frontend, MPClient]:
    """Starts the engine core in a process of its own (or on a thread), builds the front end
    (tokenizer, image processor) while the core loads the model, and waits until it is ready.

    On a torchrun rank other than 0 it never returns: the process serves as that rank's
    tensor-parallel worker, then exits."""
    become_worker_if_torchrun(engine_kwargs)
    if in_thread and tensor_parallel_size(engine_kwargs) > 1:
        raise ValueError("with tensor parallelism the engine core runs in a process of its own "
                         "(its workers' watchdog may end it)")
    client = MPClient(engine_kwargs, in_thread)
    try:
        frontend = Frontend.from_engine_args(engine_kwargs)
        client.wait_ready()
    except BaseException:
        client.shutdown()
        raise
    return frontend, client
