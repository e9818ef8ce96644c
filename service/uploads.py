"""Upload hygiene: a request-body size limit enforced while streaming, and neutral file-name hints.

Why a middleware: BentoML parses multipart bodies (spooling files to disk) before our handler runs, so
the limit must act on the byte stream itself. It checks Content-Length up front and counts chunked
bodies as they arrive; either way the client gets 413 with a JSON error and nothing more is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

KNOWN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".zip", ".dcm", ".npy")


def neutral_name(field: str, original: str | PurePath | None) -> str:
    """`field` plus the original's known suffix (e.g. 'image.nii.gz'): the format survives, the name does not.

    Upload names can identify patients; only this neutral name reaches readers, errors and logs.
    """
    name = PurePath(original).name.lower() if original else ""
    suffix = next((s for s in KNOWN_SUFFIXES if name.endswith(s)), "")
    return field + suffix


class _BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """ASGI middleware: answer 413 when an HTTP request body exceeds `max_bytes`."""

    def __init__(self, app: Any, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        state = {"received": 0, "too_large": False, "started": False}

        async def limited_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["too_large"] = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            # The app may turn our exception into its own 500: replace that with the 413.
            if state["too_large"]:
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await self._reject(send)
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not state["started"]:
                state["started"] = True
                await self._reject(send)

    async def _reject(self, send: Callable) -> None:
        limit_mb = self.max_bytes / (1024 * 1024)
        body = json.dumps({"error": f"request body is above the {limit_mb:g} MiB upload limit"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
