"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure leaves the server through here, with OpenAI's status codes: 400 for anything the
client sent wrong (bad JSON included; FastAPI's 422 is not OpenAI's), 401, 404, and 500 for our
own failures. None of them stops the server. Admission control's refusals (``--max-num-queued-*``)
are 503s in vLLM's shape (type "Service Unavailable", code 503) with a ``Retry-After`` header.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm.engine.async_llm import EngineBusyError, EngineDeadError
from pagedllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
          404: "invalid_request_error", 503: "server_error", 500: "server_error"}


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | int | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type  # None: OpenAI's type for the status
        self.headers = headers

    def body(self) -> ErrorResponse:
        return error_body(self.message, self.status, self.param, self.code, self.type)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status,
                            headers=self.headers)


class ModelNotFound(APIError):
    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", 404, "model", "model_not_found")


def error_body(message: str, status: int = 400, param: str | None = None,
               code: str | int | None = None, type: str | None = None) -> ErrorResponse:
    """``type``: None for OpenAI's type for the status."""
    if type is None:
        type = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))


def error_response(message: str, status: int = 400, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code).model_dump(), status_code=status)


def to_api_error(e: BaseException) -> APIError:
    """A request handler's exception as the error the client sees."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValidationError):
        return _validation_error(e.errors())
    if isinstance(e, ValueError):  # SamplingParams or engine.add_request refused the input
        return APIError(str(e), 400)
    if isinstance(e, EngineDeadError):
        return APIError(str(e), 503, code="engine_dead")
    if isinstance(e, EngineBusyError):  # vLLM's body for QueueOverflowError and its sibling
        return APIError(str(e), 503, code=HTTPStatus.SERVICE_UNAVAILABLE.value,
                        type=HTTPStatus.SERVICE_UNAVAILABLE.phrase,
                        headers={"Retry-After": str(e.retry_after)})
    logger.error("Request failed: %s: %s", type(e).__name__, e)
    return APIError(f"Internal server error: {type(e).__name__}: {e}", 500, code="internal_error")


def _validation_error(errors: list | tuple) -> APIError:  # type: ignore[type-arg]
    if not errors:
        return APIError("Invalid request.")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(f"Malformed JSON body: {first.get('msg', '')}", 400, code="invalid_json")
    where = ".".join(loc)
    message = f"{where}: {first.get('msg', 'invalid value')}" if where else \
        str(first.get("msg", "Invalid request."))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return APIError(message, 400, param=loc[0] if loc else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e.errors()).response()

    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(e.status_code).phrase
        except ValueError:
            phrase = "Error"
        return error_response(str(e.detail or phrase), e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("Unhandled error on %s", request.url.path)
        return to_api_error(e).response()
