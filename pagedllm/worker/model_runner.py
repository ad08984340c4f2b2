"""ModelRunner: turns a SchedulerOutput into tensors, runs the model and samples.

Per step it flattens the scheduled tokens of all requests into one batch (no padding):
input ids, positions, the slot of each token in the paged cache, and per request its query
range, context length and block table. Only the rows that reach a request's last token are
turned into logits (plus the prompt rows of requests asking for prompt logprobs).

With tensor parallelism every rank runs a runner over the same steps, with its shard of the
model and its KV heads; the logits are gathered on every rank, rank 0 (the driver) samples and
broadcasts the sampled ids, which the other ranks need as their next step's inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pagedllm.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    ForwardContext,
    forward_context,
)
from pagedllm.core.scheduler import NewRequestData, ScheduledRequest, SchedulerOutput
from pagedllm.distributed.parallel_state import begin_forward, broadcast, tp_group
from pagedllm.engine.messages import LogprobsEntry
from pagedllm.models.arch import ModelArch
from pagedllm.multimodal.image_processor import ProcessedImage
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output.bitmask import StepBitmask
from pagedllm.worker.block_table import BlockTables
from pagedllm.worker.cuda_graphs import CUDAGraphRunner
from pagedllm.worker.device_copy import to_device
from pagedllm.worker.multimodal import EncoderCache, StepImages, step_mrope_positions
from pagedllm.worker.sampler import Sampler, SamplerOutput, SamplingTensors, gather_logprobs

# The float32 columns of SamplingTensors, in the order _sampling_tensors builds them, and the
# value of each that changes nothing (temperature 0: greedy; the sampling params' ranges make
# "differs from it" the same as "min_p > 0", "top_p < 1").
_FLOAT_PARAMS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")
_NEUTRAL = np.array([0.0, 1.0, 0.0, 0.0, 0.0, 1.0])


@dataclass
class ModelRunnerOutput:
    """A step's results in rows: one per scheduled request that samples, in scheduled order."""

    req_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobsEntry | None] | None = None  # None: no row asked for logprobs
    # (request id, prompt logprobs of its chunk): entry j scores prompt token (start + j + 1)
    prompt_logprobs: list[tuple[str, list[LogprobsEntry]]] = field(default_factory=list)


@dataclass
class LaunchedStep:
    """A step queued on the device. Its sampled ids are copied to pinned host memory behind the
    step's kernels, so waiting for them never waits for a step launched after it."""

    requests: list[NewRequestData]  # the sampling rows, in order
    sampled: SamplerOutput | None = None
    output: ModelRunnerOutput = field(default_factory=ModelRunnerOutput)
    _host_ids: torch.Tensor | None = None
    _ready: torch.cuda.Event | None = None

    def copy_to_host(self) -> None:
        ids = self.sampled.token_ids
        if ids.is_cuda:
            self._host_ids = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self._host_ids.copy_(ids, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host_ids = ids

    def result(self) -> ModelRunnerOutput:
        out, result = self.output, self.sampled
        if result is None:
            return out
        if self._ready is not None:
            self._ready.synchronize()
        out.req_ids = [r.request_id for r in self.requests]
        out.sampled_token_ids = self._host_ids.tolist()
        for req, token in zip(self.requests, out.sampled_token_ids):
            req.output_token_ids.append(token)  # the runner's view of the request
        if result.logprobs is None:
            return out
        ids, lps, ranks = (result.logprob_token_ids.tolist(), result.logprobs.tolist(),
                           result.sampled_ranks.tolist())
        out.logprobs = [None if (k := req.sampling_params.logprobs) is None
                        else (ids[i][:1 + k], lps[i][:1 + k], ranks[i])
                        for i, req in enumerate(self.requests)]
        return out


class ModelRunner:
    def __init__(self, model: nn.Module, arch: ModelArch, backend: AttentionBackend,
                 block_size: int, dtype: torch.dtype, device: torch.device,
                 kv_cache_dtype: torch.dtype | None = None) -> None:
        self.model, self.arch, self.backend = model, arch, backend
        self.block_size, self.dtype, self.device = block_size, dtype, device
        self.kv_cache_dtype = kv_cache_dtype or dtype  # float8_e4m3fn with --kv-cache-dtype fp8
        tp = tp_group()
        self.driver = tp.rank == 0  # samples; the other ranks receive its tokens
        self.num_kv_heads = arch.kv_heads_per_rank(tp.size)
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler()
        self.requests: dict[str, NewRequestData] = {}  # what the runner knows of each request
        self._generators: dict[str, torch.Generator] = {}
        self._block_tables = BlockTables()
        self.graphs: CUDAGraphRunner | None = None
        self.peak_activation_bytes: int | None = None  # measured at start-up on a GPU
        self.encoder_cache: EncoderCache | None = None  # set up by enable_images()
        # The last launched step's sampled ids (on the device) and each request's row in them.
        self._last_sampled: tuple[torch.Tensor, dict[str, int]] | None = None

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.arch.head_dim)
        self.kv_caches = []  # release the old cache before taking the new one
        # Not zeroed (a multi-GiB memset slows start-up). Block 0 pads block tables, so it must
        # hold finite values; backends that read whole blocks clear a block when its first
        # slot is written (see TorchAttentionBackend).
        self.kv_caches = [torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device)
                          for _ in range(self.arch.num_layers)]
        for cache in self.kv_caches:
            cache[:, 0].zero_()

    def profile_run(self, num_tokens: int, num_reqs: int) -> int:
        """Peak activation bytes (CUDA) of one dummy step at the largest shape the scheduler
        can emit: ``num_tokens`` prompt tokens over ``num_reqs`` requests, every one of them
        sampling (so the sampler's logits are at their largest too). The temporary KV cache
        it needs is allocated before the measurement starts."""
        num_reqs = max(1, min(num_reqs, num_tokens))
        lens = [num_tokens // num_reqs + (i < num_tokens % num_reqs) for i in range(num_reqs)]
        bs = self.block_size
        self.allocate_kv_cache(sum(-(-n // bs) for n in lens) + 1)
        scheduled, next_block = [], 1
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
        new = []
        for i, n in enumerate(lens):
            blocks = list(range(next_block, next_block + -(-n // bs)))
            next_block += len(blocks)
            new.append(NewRequestData(f"profile-{i}", [0] * n, params, []))
            scheduled.append(ScheduledRequest(f"profile-{i}", [0] * n, n, blocks, 0, True))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        self.execute(SchedulerOutput(scheduled=scheduled, new_requests=new))
        torch.cuda.synchronize()
        for data in new:
            self.free_request(data.request_id)
        self.kv_caches = []
        return torch.cuda.max_memory_allocated() - base

    def enable_images(self, budget_tokens: int) -> None:
        self.encoder_cache = EncoderCache(self.model, self.device, budget_tokens)

    def profile_encoder(self, image: ProcessedImage) -> int:
        """Peak activation bytes (CUDA) of the vision encoder's largest call: copies of
        ``image`` (the largest allowed) up to the encoder cache's token budget."""
        assert self.encoder_cache is not None
        copies = max(1, self.encoder_cache.budget_tokens // image.num_tokens)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            self.encoder_cache.encode([image] * copies)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def capture_cuda_graphs(self, sizes: list[int], max_model_len: int,
                            mixed_sizes: list[int] | None = None, max_reqs: int = 0) -> None:
        """Decode graphs for ``sizes`` requests; graphs of steps with prompt tokens for
        ``mixed_sizes`` tokens over up to ``max_reqs`` requests (``cuda_graphs.py``)."""
        self.graphs = CUDAGraphRunner(self, sizes, max_model_len, mixed_sizes, max_reqs)
        self.graphs.capture()

    def free_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self._generators.pop(request_id, None)
        if self.encoder_cache is not None:
            self.encoder_cache.free(request_id)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.launch(sched).result()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput,
               token_masks: Callable[[], StepBitmask | None] | None = None) -> LaunchedStep:
        """Queues the step on the device and returns at once (on a GPU); ``result()`` waits for
        its sampled tokens. A request whose last token is still pending from the step launched
        before takes it straight from that step's output on the device. ``token_masks`` makes
        the sampling rows' token masks (grammars, ...): it is called once the forward is queued,
        so on a GPU the host fills them while the device runs the model."""
        for data in sched.new_requests:  # new, or resumed after a preemption: replaces
            self.requests[data.request_id] = data
        input_ids, positions, metadata = self._prepare_inputs(sched.scheduled)
        starts = metadata.query_starts_cpu
        sampling = [(s, starts[i + 1] - 1) for i, s in enumerate(sched.scheduled) if s.samples]
        requests = [self.requests[s.request_id] for s, _ in sampling]
        # Host-to-device copies before the forward is queued, so none of them waits for it.
        if sampling:
            rows = to_device(np.array([row for _, row in sampling]), self.device)
            if self.driver:
                tensors = self._sampling_tensors(requests, self.arch.vocab_size)
        images = None
        if self.arch.mrope_section:
            positions = to_device(step_mrope_positions(sched.scheduled, self.requests,
                                                       metadata.num_tokens), self.device)
        if self.encoder_cache is not None:
            images = self.encoder_cache.step_images(sched.scheduled, self.requests)
        if images is None and self.graphs is not None and self.graphs.can_run(metadata):
            hidden = self.graphs.run(input_ids, positions, metadata)
        else:
            hidden = self.forward(input_ids, positions, metadata, images)
        step = LaunchedStep(requests)
        if sampling:
            logits = self.model.compute_logits(hidden[rows])
            if self.driver:
                masks = token_masks() if token_masks is not None else None
                if masks is not None:  # some rows' token masks (grammars, ...)
                    tensors.bitmask_rows = to_device(masks.rows, self.device)
                    tensors.token_bitmask = to_device(masks.bitmask, self.device)
                step.sampled = self.sampler(logits, tensors)
                token_ids = step.sampled.token_ids
            else:
                token_ids = torch.empty(len(requests), dtype=torch.int64, device=self.device)
            broadcast(token_ids)
            if self.driver:
                step.copy_to_host()
            self._last_sampled = (token_ids, {r.request_id: i for i, r in enumerate(requests)})
        self._prompt_logprobs(sched.scheduled, hidden, metadata, step.output)
        return step

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: AttentionMetadata, images: StepImages | None = None) -> torch.Tensor:
        """The model over one flattened step: [T] ids and [T] positions ([3, T] for M-RoPE)
        -> [T, hidden]. ``images`` replace the embeddings of the step's image tokens."""
        self.backend.prepare(metadata, self.block_size)
        begin_forward()
        with forward_context(ForwardContext(metadata, self.kv_caches, self.backend)):
            if images is None:
                return self.model(input_ids, positions)
            return self.model(input_ids, positions, images.embeds, images.token_index)

    def _prepare_inputs(self, scheduled: list[ScheduledRequest]
                        ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flattens the step on the host with numpy (no per-token Python loop but the token
        ids) and copies each array to the device once."""
        bs = self.block_size
        query_lens = np.fromiter((s.num_new_tokens for s in scheduled), np.int64,
                                 len(scheduled))
        computed = np.fromiter((s.num_computed_tokens for s in scheduled), np.int64,
                               len(scheduled))
        seq_lens = computed + query_lens
        table = self._block_tables.gather(scheduled)
        starts = np.zeros(len(scheduled) + 1, np.int64)
        np.cumsum(query_lens, out=starts[1:])
        owner = np.repeat(np.arange(len(scheduled)), query_lens)  # request of each token
        positions = np.arange(starts[-1]) - starts[owner] + computed[owner]
        slots = table[owner, positions // bs].astype(np.int64) * bs + positions % bs
        token_ids: list[int] = []
        pending: list[tuple[int, str]] = []  # (batch row, request) of tokens still on the device
        for s in scheduled:
            token_ids += s.token_ids
            if len(s.token_ids) < s.num_new_tokens:  # being sampled by the step before
                pending.append((len(token_ids), s.request_id))
                token_ids.append(0)
        ids = np.array(token_ids, np.int64)

        def dev(a: np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return to_device(a, self.device, dtype)

        metadata = AttentionMetadata(
            num_tokens=int(starts[-1]), slot_mapping=dev(slots),
            query_start_loc=dev(starts, torch.int32), seq_lens=dev(seq_lens, torch.int32),
            block_tables=dev(table, torch.int32), max_query_len=int(query_lens.max()),
            max_seq_len=int(seq_lens.max()), query_lens_cpu=query_lens.tolist(),
            seq_lens_cpu=seq_lens.tolist())
        input_ids = dev(ids)
        if pending:
            previous, rows = self._last_sampled
            index = to_device(np.array([[i, rows[r]] for i, r in pending]), self.device)
            input_ids[index[:, 0]] = previous[index[:, 1]]
        return input_ids, dev(positions), metadata

    def _sampling_tensors(self, requests: list[NewRequestData], vocab: int) -> SamplingTensors:
        dev = self.device
        params = [r.sampling_params for r in requests]
        # One pass over the rows; the flags come from the host copy, and each dtype crosses to
        # the device in one copy.
        rows = np.array([(0.0 if p.greedy else p.temperature, p.top_p, p.min_p, p.presence_penalty,
                          p.frequency_penalty, p.repetition_penalty) for p in params])
        sampled, top_p, min_p, presence, frequency, repetition = \
            (rows != _NEUTRAL).any(axis=0).tolist()  # does any row use it
        top_k = np.fromiter((p.top_k for p in params), np.int64, len(params))
        floats = to_device(np.ascontiguousarray(rows.T, np.float32), dev)  # [6, N]
        # Rows using a seed, logprobs, logit bias or min_tokens (rare): only these are visited.
        rare = [i for i, p in enumerate(params) if p.seed is not None or p.logprobs is not None
                or p.logit_bias or p.min_tokens]
        generators: list[torch.Generator | None] = [None] * len(params)
        for i in rare:
            generators[i] = self._generator(requests[i])
        t = SamplingTensors(
            **dict(zip(_FLOAT_PARAMS, floats.unbind())), top_k=to_device(top_k, dev),
            generators=generators,
            max_num_logprobs=max((params[i].logprobs for i in rare
                                  if params[i].logprobs is not None), default=-1),
            all_greedy=not sampled, use_min_p=min_p, use_top_k=bool(top_k.any()),
            use_top_p=top_p)
        if presence or frequency or repetition:
            t.output_counts = self._token_counts([r.output_token_ids for r in requests], vocab)
        if repetition:
            t.prompt_mask = self._token_counts([r.prompt_token_ids for r in requests], vocab) > 0
        self._bias_and_ban(t, requests, rare, vocab)
        return t

    def _bias_and_ban(self, t: SamplingTensors, requests: list[NewRequestData], rare: list[int],
                      vocab: int) -> None:
        """Logit bias and the min_tokens ban, [N, vocab] each, if any row uses them."""
        n, dev = len(requests), self.device
        params = [requests[i].sampling_params for i in rare]
        if any(p.logit_bias for p in params):
            t.logit_bias = torch.zeros(n, vocab, device=dev)
            for i, p in zip(rare, params):
                for token, bias in (p.logit_bias or {}).items():
                    t.logit_bias[i, token] = bias
        banned = [(i, p) for i, p in zip(rare, params)
                  if len(requests[i].output_token_ids) < p.min_tokens]
        if banned:
            t.banned = torch.zeros(n, vocab, dtype=torch.bool, device=dev)
            for i, p in banned:
                stop = set(p.stop_token_ids) | (set() if p.ignore_eos else p.all_stop_token_ids)
                t.banned[i, list(stop)] = True

    def _token_counts(self, token_lists: list[list[int]], vocab: int) -> torch.Tensor:
        """[N, vocab] int64 occurrence counts of each row's tokens."""
        width = max((len(t) for t in token_lists), default=0)
        padded = torch.full((len(token_lists), width + 1), vocab, dtype=torch.int64)
        for i, toks in enumerate(token_lists):
            padded[i, :len(toks)] = torch.tensor(toks, dtype=torch.int64)
        counts = torch.zeros(len(token_lists), vocab + 1, dtype=torch.int64)
        counts.scatter_add_(1, padded, torch.ones_like(padded))
        return counts[:, :vocab].to(self.device)

    def _generator(self, req: NewRequestData) -> torch.Generator | None:
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
        wanted = [(i, s, self.requests[s.request_id]) for i, s in enumerate(scheduled)
                  if self.requests[s.request_id].sampling_params.prompt_logprobs is not None]
        if not wanted:
            return
        starts = metadata.query_starts_cpu
        for i, s, req in wanted:
            k = req.sampling_params.prompt_logprobs
            first = s.num_computed_tokens
            last = min(first + s.num_new_tokens, req.num_prompt_tokens - 1)
            if first >= last:
                continue
            rows = hidden[starts[i]:starts[i] + last - first]
            logits = self.model.compute_logits(rows)  # a collective: every rank computes it
            if not self.driver:
                continue
            logprobs = logits.log_softmax(dim=-1)
            targets = torch.tensor(req.prompt_token_ids[first + 1:last + 1], device=self.device)
            ids, lps, ranks = gather_logprobs(logprobs, targets, k)
            out.prompt_logprobs.append(
                (req.request_id, list(zip(ids.tolist(), lps.tolist(), ranks.tolist()))))
