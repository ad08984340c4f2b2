"""LLMEngine: the offline front end; requests in, RequestOutputs out, one ``step()`` at a time.

It validates and tokenizes at the door (``Frontend``), sends token ids to the engine core and
turns the core's step messages back into text. The core runs in this process (the default,
``engine_process=False``: the core steps when ``step()`` is called) or in a process of its own
(``engine_process=True``: it steps on its own, and ``step()`` waits for its next message).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from pagedllm.distributed.launch import tensor_parallel_size
from pagedllm.engine.core import EngineCore
from pagedllm.engine.core_client import InprocClient, MPClient
from pagedllm.engine.frontend import Frontend, start_with_core
from pagedllm.engine.inputs import ProcessedPrompt, PromptType
from pagedllm.engine.messages import EngineStats
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, frontend: Frontend, client: InprocClient | MPClient) -> None:
        self.frontend = frontend
        self.client = client
        self.config = frontend.config
        self.tokenizer = frontend.tokenizer
        self.input_processor = frontend.input_processor
        self.model_name = frontend.model_name
        self.vocab_size = frontend.vocab_size

    @classmethod
    def from_engine_args(cls, engine_process: bool = False, **kwargs: Any) -> LLMEngine:
        """Builds the engine from flat arguments (``pagedllm.config`` field names). With
        tensor parallelism the core always runs in a process of its own."""
        if not engine_process and tensor_parallel_size(kwargs) == 1:
            return cls(Frontend.from_engine_args(kwargs), InprocClient(kwargs))
        return cls(*start_with_core(kwargs))

    @property
    def core(self) -> EngineCore:
        """The engine core, when it runs in this process (tests and benchmarks look inside)."""
        if not isinstance(self.client, InprocClient):
            raise RuntimeError("the engine core runs in another process")
        return self.client.core

    def add_request(self, request_id: str, prompt: PromptType | ProcessedPrompt,
                    params: SamplingParams, arrival_time: float | None = None,
                    priority: int = 0) -> None:
        """Validates and queues a request; raises ValueError with a clear message if bad.

        ``prompt``: text, token ids, a dict with ``multi_modal_data`` (see ``engine.inputs``),
        or a prompt the caller already ran through ``self.input_processor``. ``priority``
        (lower first) needs ``scheduling_policy="priority"``."""
        arrival = time.monotonic() if arrival_time is None else arrival_time
        for request in self.frontend.add(request_id, prompt, params, arrival, priority):
            self.client.add_request(request)

    def abort_request(self, request_ids: Iterable[str]) -> None:
        """Ends the requests now and frees their KV blocks; no more output is produced."""
        core_ids = [i for request_id in request_ids for i in self.frontend.abort(request_id)]
        if core_ids:
            self.client.abort_requests(core_ids)

    def has_unfinished_requests(self) -> bool:
        return self.frontend.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        result = self.frontend.process(self.client.get_output(), time.monotonic())
        if result.to_abort:
            self.client.abort_requests(result.to_abort)
        for request_id, error in result.errors.items():
            # Its output ends with finish reason "error"; its other samples (n > 1) go on.
            logger.error("Request %s failed in the engine: %s", request_id, error)
        return result.outputs

    def get_stats(self) -> EngineStats:
        return self.client.call_utility("get_stats")
