"""n > 1: one user request fans out into n scheduler requests, one per sample.

The samples share the prompt: sample 0 computes it and the others wait for that (``wait_for``),
then reuse its KV blocks through the prefix cache. A seeded request gives sample ``i`` the seed
``seed + i``, so each sample is reproducible and they differ. The output processor gathers the
samples back into one ``RequestOutput`` by the ids made here.
"""

from __future__ import annotations

import copy

from pagedllm.engine.inputs import ProcessedPrompt
from pagedllm.engine.messages import EngineCoreRequest
from pagedllm.sampling_params import MAX_SEED, SamplingParams


def fan_out(request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
            arrival_time: float, priority: int = 0) -> list[EngineCoreRequest]:
    """The scheduler requests of one user request, sample 0 first; ``request_id`` itself when
    ``n == 1``, else ``<request_id>-<i>``."""
    if params.n == 1:
        return [EngineCoreRequest(request_id, prompt.token_ids, params, arrival_time,
                                  images=prompt.images, mrope=prompt.mrope, priority=priority)]
    samples: list[EngineCoreRequest] = []
    for i in range(params.n):
        sample_params = copy.copy(params)
        sample_params.n = 1
        if params.seed is not None:
            sample_params.seed = (params.seed + i) % (MAX_SEED + 1)
        first = samples[0].request_id if samples else None
        samples.append(EngineCoreRequest(f"{request_id}-{i}", prompt.token_ids, sample_params,
                                         arrival_time, wait_for=first, images=prompt.images,
                                         mrope=prompt.mrope, priority=priority))
    return samples
