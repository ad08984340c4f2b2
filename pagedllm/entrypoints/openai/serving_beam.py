"""``use_beam_search`` on the completion and chat endpoints: vLLM's beam search, ``n`` beams.

The search itself is ``pagedllm.engine.beam_search`` (the one ``LLM.beam_search`` runs); here are
what the server adds: which request fields it honours or refuses, and ``BeamStream``, which runs
the rounds on the async engine and then yields each prompt's ``RequestOutput`` as an engine
request's output stream would, so the endpoints' usual response code formats the answer.

As vLLM: the beams come back best first as choices ``0..n-1``; a beam that EOS ended has
``finish_reason`` "stop" and ``stop_reason`` the EOS id, others "length"; the EOS is never in the
text and is in ``token_ids`` (and the usage) only with ``include_stop_str_in_output``; an unset
``temperature`` is the model's generation config's or 1.0. vLLM silently ignores the sampling
fields beam search has no use for; pagedllm refuses them by name instead.
"""

from __future__ import annotations

from typing import Any

from pagedllm.engine.async_llm import AsyncLLM, OutputStream
from pagedllm.engine.beam_search import BeamBatch, BeamSearch, BeamSearchParams, round_params
from pagedllm.entrypoints.openai.errors import APIError
from pagedllm.entrypoints.openai.protocol import SamplingRequest
from pagedllm.outputs import CompletionOutput, RequestOutput

# Request fields beam search cannot honour, with the values that change nothing (accepted).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "top_p": (None, 1.0), "top_k": (None, 0, -1), "min_p": (None, 0.0),
    "presence_penalty": (None, 0.0), "frequency_penalty": (None, 0.0),
    "repetition_penalty": (None, 1.0), "seed": (None,), "stop": (None, "", []),
    "stop_token_ids": (None, []), "min_tokens": (0,), "logit_bias": (None, {}),
    "allowed_token_ids": (None,), "bad_words": (None, []), "prompt_logprobs": (None,),
}


def check_beam_request(request: SamplingRequest, max_logprobs: int, structured: bool) -> None:
    """400 for a field that beam search (or its absence) cannot honour. ``structured``: the
    request constrains its output (a grammar, JSON, a forced tool call)."""
    if not request.use_beam_search:
        if request.length_penalty != 1.0:  # vLLM ignores it silently
            raise APIError("length_penalty is only used by beam search (use_beam_search).",
                           param="length_penalty")
        return
    if 2 * request.n > max_logprobs:  # each round asks for 2 * n logprobs
        raise APIError(f"With use_beam_search, n (the beam width) must be at most "
                       f"{max_logprobs // 2} (max_logprobs / 2), got {request.n}.", param="n")
    for name, neutral in _NEUTRAL.items():
        if getattr(request, name, None) not in neutral:
            raise APIError(f"{name} cannot be used with use_beam_search (beam search ranks "
                           "continuations by their logprobs only).", param=name)
    if structured:
        raise APIError("Structured outputs (response_format, structured_outputs, guided_*, a "
                       "required tool call) cannot be used with use_beam_search.",
                       param="use_beam_search")


def beam_params(request: SamplingRequest, max_tokens: int,
                defaults: dict[str, Any] | None) -> BeamSearchParams:
    """vLLM's ``to_beam_search_params``: ``n`` beams; an unset temperature takes the model's
    default, else 1.0."""
    temperature = request.temperature
    if temperature is None:
        temperature = float((defaults or {}).get("temperature", 1.0))
    try:
        return BeamSearchParams(beam_width=request.n, max_tokens=max_tokens,
                                ignore_eos=request.ignore_eos, temperature=temperature,
                                length_penalty=request.length_penalty,
                                include_stop_str_in_output=request.include_stop_str_in_output)
    except ValueError as e:
        raise APIError(str(e)) from None


class BeamStream:
    """Runs the beam searches of one HTTP request (one per prompt) on the engine, every round
    as one batch, then yields one finished ``RequestOutput`` per prompt, with request id
    ``{request_id}-{i}``. ``close()`` aborts the round in flight (the client went away)."""

    def __init__(self, engine: AsyncLLM, request_id: str, prompts: list[list[int]],
                 params: list[BeamSearchParams], request: SamplingRequest,
                 logprobs: int | None) -> None:
        self.engine = engine
        self.request_id = request_id
        self.request = request
        # The prompts' params differ only in max_tokens (each prompt's room in the context).
        self.sampling = round_params(params[0], logprobs)
        eos = engine.tokenizer.eos_token_id
        self.batch = BeamBatch([BeamSearch(ids, p, eos) for ids, p in zip(prompts, params,
                                                                           strict=True)])
        self._results: list[RequestOutput] | None = None
        self._round: OutputStream | None = None
        self._closed = False

    def __aiter__(self) -> BeamStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._results is None:
            await self._search()
            self._results = [self._output(i, s) for i, s in enumerate(self.batch.searches)]
        if not self._results:
            raise StopAsyncIteration
        return self._results.pop(0)

    def close(self) -> None:
        self._closed = True
        if self._round is not None:
            self._round.close()

    async def _search(self) -> None:
        rounds = 0
        while not self.batch.finished and not self._closed:
            prompts = self.batch.requests()
            ids = [f"{self.request_id}-beam{rounds}-{j}" for j in range(len(prompts))]
            self._round = await self.engine.add_requests(
                [(rid, tokens, self.sampling) for rid, tokens in zip(ids, prompts)],
                priority=self.request.priority)  # vLLM drops it; every round keeps it
            finals: dict[str, CompletionOutput] = {}
            try:
                async for out in self._round:
                    finals[out.request_id] = out.outputs[0]
            finally:
                self._round.close()
                self._round = None
            self.batch.advance([finals.get(rid) for rid in ids])
            rounds += 1

    def _output(self, index: int, search: BeamSearch) -> RequestOutput:
        r = self.request
        outputs = []
        for j, beam in enumerate(search.best()):
            generated = beam.output_token_ids
            ends_with_eos = beam.finish_reason == "stop"
            text_ids = generated[:-1] if ends_with_eos else generated  # vLLM: EOS never in text
            kept = generated if search.params.include_stop_str_in_output else text_ids
            text = self.engine.tokenizer.decode(
                text_ids, skip_special_tokens=r.skip_special_tokens,
                spaces_between_special_tokens=r.spaces_between_special_tokens)
            outputs.append(CompletionOutput(j, text, list(kept), beam.cum_logprob,
                                            beam.logprobs[:len(kept)], beam.finish_reason,
                                            beam.stop_reason))
        return RequestOutput(f"{self.request_id}-{index}", None, search.prompt_token_ids,
                             outputs, finished=True)
