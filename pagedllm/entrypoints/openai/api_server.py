"""``pagedllm serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over ``AsyncLLM``.

Engine flags come from the config dataclasses (``add_engine_args``); this module adds only the
server's own. ``build_app`` wires an engine to a FastAPI app; ``main`` builds the engine, then
serves until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Awaitable
from types import FrameType

import prometheus_client
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pagedllm import __version__
from pagedllm.config import add_engine_args, engine_kwargs_from_args
from pagedllm.engine.async_llm import AsyncLLM, EngineDeadError
from pagedllm.engine.core_proc import freeze_gc_heap
from pagedllm.entrypoints.openai.auth import APIKeyMiddleware
from pagedllm.entrypoints.openai.errors import error_response, install_error_handlers, to_api_error
from pagedllm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.protocol_chat import ChatCompletionRequest, ChatMessage
from pagedllm.entrypoints.openai.protocol_completion import CompletionRequest
from pagedllm.entrypoints.openai.reasoning_parsers import REASONING_PARSERS
from pagedllm.entrypoints.openai.serving_chat import ChatOptions, OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.streaming import ClientDisconnected
from pagedllm.entrypoints.openai.tool_parsers import TOOL_PARSERS
from pagedllm.layers.quantization.int_weight_only import serve_default_quantization
from pagedllm.metrics.prometheus import CONTENT_TYPE, PrometheusStatLogger

logger = logging.getLogger(__name__)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    server = parser.add_argument_group("Server")
    server.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    server.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    server.add_argument("--api-key", default=None,
                        help="Require 'Authorization: Bearer <key>' on the /v1 endpoints (as "
                             "vLLM does). Default: $PAGEDLLM_API_KEY.")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    server.add_argument("--disable-uvicorn-access-log", action="store_true",
                        help="Do not log one line per HTTP request.")
    server.add_argument("--disable-log-stats", action="store_true",
                        help="Do not print the periodic throughput / cache log line.")
    tools = parser.add_argument_group("Tool calling and reasoning")
    tools.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='Let the model call tools on its own (tool_choice "auto", the '
                            "default with tools): needs --tool-call-parser.")
    tools.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None,
                       help="How tool calls are written in the model's text: hermes "
                            "(<tool_call> JSON: Qwen2.5, Qwen3, Hermes), llama3_json (Llama 3.x).")
    tools.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS), default=None,
                       help="Split <think>...</think> off into reasoning_content: deepseek_r1, "
                            "qwen3.")
    server.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="On SIGTERM or Ctrl-C, seconds to let requests in flight finish "
                             "before they are aborted (new requests get a 503 meanwhile).")


async def _answer(work: Awaitable[Response]) -> Response:
    """Any failure as an OpenAI error response; the server keeps serving."""
    try:
        return await work
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it
    except Exception as e:
        return to_api_error(e).response()


def build_app(engine: AsyncLLM, api_key: str | None = None,
              chat_options: ChatOptions | None = None) -> FastAPI:
    """The routes over ``engine``, with a Prometheus registry of this app's own."""
    app = FastAPI(title="pagedllm", version=__version__)
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    names = [engine.model_name]
    completion = OpenAIServingCompletion(engine, names)
    chat = OpenAIServingChat(engine, names, chat_options)
    cfg = engine.config
    cache = cfg.cache
    info = engine.core_info
    metrics = PrometheusStatLogger(
        engine.model_name, cfg.scheduler.max_num_seqs,
        cfg.scheduler.max_num_batched_tokens or 8192, max_model_len=cfg.model.max_model_len,
        cache_config={"block_size": str(info.block_size), "num_gpu_blocks": str(info.num_blocks),
                      "gpu_memory_utilization": str(cache.gpu_memory_utilization),
                      "enable_prefix_caching": str(cache.enable_prefix_caching),
                      "cache_dtype": cache.kv_cache_dtype})
    engine.add_stat_logger(metrics)
    app.state.engine = engine
    app.state.metrics = metrics

    app.state.draining = False

    def shutting_down() -> Response | None:
        if not app.state.draining:
            return None
        return error_response("The server is shutting down.", 503)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw: Request) -> Response:
        return shutting_down() or await _answer(completion.create(request, raw))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Response:
        return shutting_down() or await _answer(chat.create(request, raw))

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=name, max_model_len=engine.max_model_len)
                               for name in names])

    @app.get("/health")
    async def health() -> Response:
        try:
            engine.check_health()
        except Exception as e:
            return error_response(str(e), 503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> Response:
        async def work() -> Response:
            completion.model_name(request.model)
            if request.messages is not None:
                chat_request = ChatCompletionRequest(
                    messages=[ChatMessage.model_validate(m) for m in request.messages],
                    add_generation_prompt=request.add_generation_prompt,
                    continue_final_message=request.continue_final_message)
                tokens = (await chat.render(chat_request)).token_ids
            else:
                tokens = await asyncio.to_thread(
                    completion.tokenizer.encode, request.prompt or "",
                    add_special_tokens=request.add_special_tokens)
            # A long prompt's token strings and JSON take seconds too: off the event loop.
            return await asyncio.to_thread(_tokenize_response, tokens, request.return_token_strs)

        return await _answer(work())

    def _tokenize_response(tokens: list[int], with_strs: bool) -> Response:
        strs = completion.tokenizer.convert_ids_to_tokens(tokens) if with_strs else None
        body = TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len,
                                tokens=list(tokens), token_strs=strs)
        return JSONResponse(body.model_dump())

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> Response:
        # vLLM serves it only behind --enable-tokenizer-info-endpoint (off by default).
        return error_response("/tokenizer_info is not available on pagedllm.", 404)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> Response:
        async def work() -> Response:
            completion.model_name(request.model)
            completion.check_prompt(request.tokens, "tokens")
            text = completion.tokenizer.decode(request.tokens, skip_special_tokens=False)
            return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

        return await _answer(work())

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    return app


class _Server(uvicorn.Server):
    """uvicorn that drains on SIGTERM or Ctrl-C: new requests get a 503, requests in flight
    finish (up to ``shutdown_timeout`` seconds, then end with an error event), then it stops.
    A second Ctrl-C stops at once. It also stops, with exit code 1, if the engine core dies."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, engine: AsyncLLM,
                 shutdown_timeout: float) -> None:
        super().__init__(config)
        self.app, self.engine, self.shutdown_timeout = app, engine, shutdown_timeout
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.engine.on_dead(self._engine_died)
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.app.state.draining or self._loop is None:
            self.force_exit = self.should_exit = True
            return
        self.app.state.draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        logger.info("Shutting down: waiting up to %.0f s for %d requests in flight",
                    self.shutdown_timeout, self.engine.num_unfinished_requests)
        while self.engine.num_unfinished_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine.num_unfinished_requests:
            logger.warning("Aborting %d requests still in flight",
                           self.engine.num_unfinished_requests)
            self.engine.abort_all(EngineDeadError(
                "The server is shutting down; the request was aborted."))
        self.should_exit = True

    def _engine_died(self) -> None:  # on the front-end thread
        self.exit_code = 1
        if self._loop is not None:
            self._loop.call_soon_threadsafe(setattr, self, "should_exit", True)


def main(args: argparse.Namespace) -> int:
    start = time.monotonic()
    prometheus_client.disable_created_metrics()  # no *_created series next to every metric
    kwargs = engine_kwargs_from_args(args)
    if quantization := serve_default_quantization(kwargs):  # the CPU's default: docs there
        kwargs["quantization"] = quantization
    chat_options = ChatOptions(args.enable_auto_tool_choice, args.tool_call_parser,
                               args.reasoning_parser)
    logger.info("Starting the engine: %s", kwargs or "defaults")
    engine = AsyncLLM.from_engine_args(log_stats=not args.disable_log_stats, **kwargs)
    info = engine.core_info
    logger.info("Engine ready in %.1f s: model %s, max_model_len %d, KV cache %d blocks of %d "
                "tokens", time.monotonic() - start, engine.model_name, engine.max_model_len,
                info.num_blocks, info.block_size)
    app = build_app(engine, api_key=args.api_key or os.environ.get("PAGEDLLM_API_KEY"),
                    chat_options=chat_options)
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=args.uvicorn_log_level,
                            access_log=not args.disable_uvicorn_access_log)
    server = _Server(config, app, engine, args.shutdown_timeout)
    freeze_gc_heap()
    try:
        server.run()
    finally:
        engine.shutdown()
    if server.exit_code:
        logger.error("Exiting: the engine core died")
    return server.exit_code
