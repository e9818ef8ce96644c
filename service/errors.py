"""Map bad input to protocol status codes, and log rejections without anything that could identify a patient.

Every client-side problem is a `core.errors.InputError`; this module decides its HTTP status (400 bad
request shape, 413 too large, 415 unsupported format, 422 unusable content) and gRPC code.
"""

from __future__ import annotations

import logging

import grpc

from core.errors import InputError

log = logging.getLogger("service.requests")


class RequestError(InputError):
    """A malformed request (missing part, wrong option, bad tensor) rather than bad image content."""

    http_status = 400


class PayloadTooLarge(RequestError):
    """A body, file, tensor or image above a configured limit."""

    http_status = 413


class UnsupportedFormat(RequestError):
    """An upload whose format is none of the supported ones."""

    http_status = 415


def http_status(exc: InputError) -> int:
    """HTTP status for `exc`: its own `http_status`, 413 for core's size limits, else 422."""
    status = getattr(exc, "http_status", None)
    if isinstance(status, int):
        return status
    problem = exc.problem.lower()
    if "above the" in problem and "limit" in problem:
        return 413
    if "unrecognised" in problem and "format" in problem:
        return 415
    return 422


def grpc_code(exc: InputError) -> grpc.StatusCode:
    """Every bad input is INVALID_ARGUMENT, as the Open Inference Protocol expects."""
    return grpc.StatusCode.INVALID_ARGUMENT


def error_body(exc: InputError) -> dict[str, str]:
    """The JSON error: the public message (never the upload's file name) and the offending field."""
    body = {"error": exc.public_message()}
    if exc.field:
        body["field"] = exc.field
    return body


def log_rejection(channel: str, exc: InputError, status: int | str) -> None:
    """Log a rejected request by category only: the message may quote zip member names or header text."""
    log.info(
        "rejected %s request: status=%s field=%s kind=%s", channel, status, exc.field, type(exc).__name__
    )
