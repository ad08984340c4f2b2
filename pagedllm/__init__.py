"""pagedllm: a small, exact LLM inference and serving engine."""

from pagedllm.engine.beam_search import BeamSearchParams
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):  # LLM imports torch and the model code: only on first use
    if name == "LLM":
        from pagedllm.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput",
           "__version__"]
