"""API key check: ``Authorization: Bearer <key>`` on every path but the operational ones.

A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``), so streaming responses and
client disconnects pass through untouched.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from pagedllm.entrypoints.openai.errors import error_response

OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" \
                or scope.get("path", "") in OPEN_PATHS or self._authorized(scope):
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
