"""Prometheus exposition: vLLM's metric names under the ``pagedllm:`` prefix.

Every server builds its own ``CollectorRegistry`` (never the process-global one), so one process
can run several servers, as the tests do. All metrics carry the label ``model_name``.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pagedllm.metrics.stats import IterationStats, SchedulerStats

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.5, 4.0,
                 6.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                2.0, 5.0, 10.0, 30.0)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0,
                    60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def _one_two_five(limit: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's token-count buckets)."""
    out, decade = [], 1
    while True:
        for m in (1, 2, 5):
            if m * decade > limit:
                return out
            out.append(float(m * decade))
        decade *= 10


def _powers_of_two(limit: int) -> list[float]:
    out, b = [], 1
    while b < limit:
        out.append(float(b))
        b *= 2
    return [*out, float(limit)]


class PrometheusStatLogger:
    """Records ``SchedulerStats`` / ``IterationStats`` into a registry of its own.

    ``max_num_seqs`` and ``max_num_batched_tokens`` set the per-step histograms' top buckets.
    """

    def __init__(self, model_name: str, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192,
                 registry: CollectorRegistry | None = None, max_model_len: int = 8192,
                 cache_config: dict[str, str] | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: list[float] | tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("pagedllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("pagedllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("pagedllm:kv_cache_usage_perc",
                              "KV cache usage: 1 means every block is in use.")
        self.free_blocks = gauge("pagedllm:kv_cache_free_blocks", "Free KV cache blocks.")
        self.total_blocks = gauge("pagedllm:kv_cache_total_blocks", "KV cache blocks in all.")
        self.preemptions = counter("pagedllm:num_preemptions", "Preemptions, cumulative.")
        self.prompt_tokens = counter("pagedllm:prompt_tokens", "Prompt tokens computed.")
        self.generation_tokens = counter("pagedllm:generation_tokens", "Tokens generated.")
        self.prefix_queries = counter("pagedllm:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("pagedllm:prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache.")
        self._success = Counter("pagedllm:request_success", "Finished requests by reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._model_name = model_name
        self.ttft = histogram("pagedllm:time_to_first_token_seconds",
                              "Time from arrival to the first generated token.", _TTFT_BUCKETS)
        self.itl = histogram("pagedllm:inter_token_latency_seconds",
                             "Time between consecutive generated tokens.", _ITL_BUCKETS)
        self.e2e = histogram("pagedllm:e2e_request_latency_seconds",
                             "Time from arrival to finish.", _REQUEST_BUCKETS)
        self.queue_time = histogram("pagedllm:request_queue_time_seconds",
                                    "Time from arrival to first scheduling.", _REQUEST_BUCKETS)
        self.iteration_tokens = histogram("pagedllm:iteration_tokens_total",
                                          "Tokens computed per engine step.",
                                          _powers_of_two(max_num_batched_tokens))
        self.iteration_reqs = histogram("pagedllm:iteration_num_requests",
                                        "Requests scheduled per engine step (the batch size).",
                                        _powers_of_two(max_num_seqs))
        # vLLM's per-request histograms, observed when a request ends
        tokens = _one_two_five(max_model_len)
        self.request_prompt_tokens = histogram("pagedllm:request_prompt_tokens",
                                               "Prompt tokens of each finished request.", tokens)
        self.request_generation_tokens = histogram(
            "pagedllm:request_generation_tokens",
            "Generated tokens of each finished request (all its samples).", tokens)
        self.request_n = histogram("pagedllm:request_params_n", "The n of each request.",
                                   (1, 2, 5, 10, 20))
        self.request_max_tokens = histogram("pagedllm:request_params_max_tokens",
                                            "The max_tokens of each request.", tokens)
        self.request_prefill = histogram("pagedllm:request_prefill_time_seconds",
                                         "First scheduled to first token.", _REQUEST_BUCKETS)
        self.request_decode = histogram("pagedllm:request_decode_time_seconds",
                                        "First token to last token.", _REQUEST_BUCKETS)
        self.request_inference = histogram("pagedllm:request_inference_time_seconds",
                                           "First scheduled to last token.", _REQUEST_BUCKETS)
        self.request_tpot = histogram("pagedllm:request_time_per_output_token_seconds",
                                      "Decode time over generated tokens less one.",
                                      _ITL_BUCKETS)
        if cache_config:  # vLLM's info gauge: the cache settings as labels, value 1
            Gauge("pagedllm:cache_config_info", "Information of the KV cache config.",
                  sorted(cache_config), registry=r).labels(**cache_config).set(1)
        for reason in ("stop", "length", "abort"):
            self._success.labels(model_name, reason)  # shown at 0 from the start

    def record(self, scheduler: SchedulerStats, iteration: IterationStats) -> None:
        self.running.set(scheduler.num_running_reqs)
        self.waiting.set(scheduler.num_waiting_reqs)
        self.kv_usage.set(scheduler.kv_cache_usage)
        self.free_blocks.set(scheduler.num_free_blocks)
        self.total_blocks.set(scheduler.num_total_blocks)
        for metric, value in ((self.preemptions, iteration.num_preemptions),
                              (self.prompt_tokens, iteration.num_prompt_tokens),
                              (self.generation_tokens, iteration.num_generation_tokens),
                              (self.prefix_queries, iteration.prefix_cache_queries),
                              (self.prefix_hits, iteration.prefix_cache_hits)):
            if value > 0:
                metric.inc(value)
        if iteration.step_num_tokens is not None:
            self.iteration_tokens.observe(iteration.step_num_tokens)
        if iteration.step_num_reqs is not None:
            self.iteration_reqs.observe(iteration.step_num_reqs)
        for ttft in iteration.time_to_first_tokens:
            self.ttft.observe(ttft)
        for itl in iteration.inter_token_latencies:
            self.itl.observe(itl)
        for done in iteration.finished:
            self._success.labels(self._model_name, done.finish_reason).inc()
            if done.e2e_latency is not None:
                self.e2e.observe(done.e2e_latency)
            for metric, value in ((self.queue_time, done.queue_time),
                                  (self.request_prefill, done.prefill_time),
                                  (self.request_decode, done.decode_time),
                                  (self.request_inference, done.inference_time),
                                  (self.request_tpot, done.time_per_output_token),
                                  (self.request_max_tokens, done.max_tokens)):
                if value is not None:
                    metric.observe(value)
            self.request_prompt_tokens.observe(done.num_prompt_tokens)
            self.request_generation_tokens.observe(done.num_generation_tokens)
            self.request_n.observe(done.n)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
