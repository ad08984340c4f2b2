"""API key check: ``Authorization: Bearer <key>`` on the OpenAI API (``/v1/...``) only.

As in vLLM, whose middleware checks only paths under ``/v1``: ``/health``, ``/metrics``,
``/version``, ``/docs``, ``/openapi.json``, ``/tokenize`` and ``/detokenize`` are open.

A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``), so streaming responses and
client disconnects pass through untouched.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from pagedllm.entrypoints.openai.errors import error_response

PROTECTED_PREFIX = "/v1"


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" \
                or not _protected(scope.get("path", "")) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = error_response("Invalid or missing API key: send 'Authorization: Bearer "
                                  "<key>'.", 401, code="invalid_api_key")
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                return secrets.compare_digest(value, self._expected)
        return False


def _protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")
