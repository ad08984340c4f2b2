"""ModelRunner: turns a SchedulerOutput into tensors, runs the model and samples.

Per step it flattens the scheduled tokens of all requests into one batch (no padding):
input ids, positions, the slot of each token in the paged cache, and per request its query
range, context length and block table. Only the rows that reach a request's last token are
turned into logits (plus the prompt rows of requests asking for prompt logprobs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pagedllm.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    ForwardContext,
    forward_context,
)
from pagedllm.core.request import Request
from pagedllm.core.scheduler import ScheduledRequest, SchedulerOutput
from pagedllm.models.arch import ModelArch
from pagedllm.worker.sampler import Sampler, SamplingTensors, gather_logprobs

# (token ids, logprobs, rank of the first id): the first id is the chosen/actual token.
LogprobsEntry = tuple[list[int], list[float], int]


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, LogprobsEntry] = field(default_factory=dict)
    # prompt logprobs of this step's chunk: entry j scores prompt token (chunk start + j + 1)
    prompt_logprobs: dict[str, list[LogprobsEntry]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: nn.Module, arch: ModelArch, backend: AttentionBackend,
                 num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model, self.arch, self.backend = model, arch, backend
        self.block_size, self.dtype, self.device = block_size, dtype, device
        shape = (2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
        # Not zeroed (a multi-GiB memset slows start-up): a slot is written before it is read,
        # except block 0, which pads block tables and gathers, so it must hold finite values.
        self.kv_caches = [torch.empty(shape, dtype=dtype, device=device)
                          for _ in range(arch.num_layers)]
        for cache in self.kv_caches:
            cache[:, 0].zero_()
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator] = {}

    def free_request(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        input_ids, positions, metadata = self._prepare_inputs(sched.scheduled)
        self.backend.prepare(metadata, self.block_size)
        ctx = ForwardContext(metadata, self.kv_caches, self.backend)
        with forward_context(ctx):
            hidden = self.model(input_ids, positions)
        out = ModelRunnerOutput()
        ends = metadata.query_start_loc[1:].tolist()
        sampling = [(s, ends[i] - 1) for i, s in enumerate(sched.scheduled) if s.samples]
        if sampling:
            rows = torch.tensor([row for _, row in sampling], device=self.device)
            self._sample(self.model.compute_logits(hidden[rows]), [s for s, _ in sampling], out)
        self._prompt_logprobs(sched.scheduled, hidden, metadata, out)
        return out

    def _prepare_inputs(self, scheduled: list[ScheduledRequest]
                        ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        starts, seq_lens, query_lens = [0], [], []
        for s in scheduled:
            start = s.request.num_computed_tokens
            end = start + s.num_new_tokens
            ids += s.request.token_ids(start, end)
            pos += range(start, end)
            slots += [s.block_ids[p // bs] * bs + p % bs for p in range(start, end)]
            starts.append(starts[-1] + s.num_new_tokens)
            seq_lens.append(end)
            query_lens.append(s.num_new_tokens)
        width = max(len(s.block_ids) for s in scheduled)
        table = [s.block_ids + [0] * (width - len(s.block_ids)) for s in scheduled]
        dev = self.device
        metadata = AttentionMetadata(
            num_tokens=len(ids),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(table, dtype=torch.int32, device=dev),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        return (torch.tensor(ids, dtype=torch.int64, device=dev),
                torch.tensor(pos, dtype=torch.int64, device=dev), metadata)

    def _sample(self, logits: torch.Tensor, scheduled: list[ScheduledRequest],
                out: ModelRunnerOutput) -> None:
        requests = [s.request for s in scheduled]
        result = self.sampler(logits, self._sampling_tensors(requests, logits.shape[-1]))
        token_ids = result.token_ids.tolist()
        for req, token in zip(requests, token_ids):
            out.sampled[req.request_id] = token
        if result.logprobs is None:
            return
        ids, lps, ranks = (result.logprob_token_ids.tolist(), result.logprobs.tolist(),
                           result.sampled_ranks.tolist())
        for i, req in enumerate(requests):
            k = req.sampling_params.logprobs
            if k is not None:
                out.logprobs[req.request_id] = (ids[i][:1 + k], lps[i][:1 + k], ranks[i])

    def _sampling_tensors(self, requests: list[Request], vocab: int) -> SamplingTensors:
        dev = self.device
        params = [r.sampling_params for r in requests]

        def col(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=dev)

        t = SamplingTensors(
            temperature=torch.tensor([0.0 if p.greedy else p.temperature for p in params],
                                     device=dev),
            top_p=col("top_p"), top_k=col("top_k", torch.int64), min_p=col("min_p"),
            presence_penalty=col("presence_penalty"),
            frequency_penalty=col("frequency_penalty"),
            repetition_penalty=col("repetition_penalty"),
            generators=[self._generator(r) for r in requests],
            max_num_logprobs=max((p.logprobs for p in params if p.logprobs is not None),
                                 default=-1))
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
               for p in params):
            t.output_counts = self._token_counts([r.output_token_ids for r in requests], vocab)
        if any(p.repetition_penalty != 1.0 for p in params):
            t.prompt_mask = self._token_counts([r.prompt_token_ids for r in requests], vocab) > 0
        if any(p.logit_bias for p in params):
            t.logit_bias = torch.zeros(len(params), vocab, device=dev)
            for i, p in enumerate(params):
                for token, bias in (p.logit_bias or {}).items():
                    t.logit_bias[i, token] = bias
        banned = [(i, p) for i, (r, p) in enumerate(zip(requests, params))
                  if r.num_output_tokens < p.min_tokens]
        if banned:
            t.banned = torch.zeros(len(params), vocab, dtype=torch.bool, device=dev)
            for i, p in banned:
                stop = set(p.stop_token_ids) | (set() if p.ignore_eos else p.all_stop_token_ids)
                t.banned[i, list(stop)] = True
        return t

    def _token_counts(self, token_lists: list[list[int]], vocab: int) -> torch.Tensor:
        """[N, vocab] int64 occurrence counts of each row's tokens."""
        width = max((len(t) for t in token_lists), default=0)
        padded = torch.full((len(token_lists), width + 1), vocab, dtype=torch.int64)
        for i, toks in enumerate(token_lists):
            padded[i, :len(toks)] = torch.tensor(toks, dtype=torch.int64)
        counts = torch.zeros(len(token_lists), vocab + 1, dtype=torch.int64)
        counts.scatter_add_(1, padded, torch.ones_like(padded))
        return counts[:, :vocab].to(self.device)

    def _generator(self, req: Request) -> torch.Generator | None:
        seed = req.sampling_params.seed
        if seed is None or req.sampling_params.greedy:
            return None
        gen = self._generators.get(req.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[req.request_id] = gen
        return gen

    def _prompt_logprobs(self, scheduled: list[ScheduledRequest], hidden: torch.Tensor,
                         metadata: AttentionMetadata, out: ModelRunnerOutput) -> None:
        starts = metadata.query_start_loc.tolist()
        for i, s in enumerate(scheduled):
            req, k = s.request, s.request.sampling_params.prompt_logprobs
            first = req.num_computed_tokens
            last = min(first + s.num_new_tokens, req.num_prompt_tokens - 1)
            if k is None or first >= last:
                continue
            rows = hidden[starts[i]:starts[i] + last - first]
            logprobs = self.model.compute_logits(rows).log_softmax(dim=-1)
            targets = torch.tensor(req.prompt_token_ids[first + 1:last + 1], device=self.device)
            ids, lps, ranks = gather_logprobs(logprobs, targets, k)
            out.prompt_logprobs[req.request_id] = list(
                zip(ids.tolist(), lps.tolist(), ranks.tolist()))
