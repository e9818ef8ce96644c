"""Errors that say which file, which field and what is wrong, so users can fix their input."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (a file, a manifest row, an upload). Services map it to HTTP 4xx / INVALID_ARGUMENT.

    The message is built before raising and always names the source and the problem.
    """

    def __init__(self, problem: str, *, source: str | None = None, field: str | None = None) -> None:
        self.problem = problem
        self.source = source
        self.field = field
        parts = []
        if source:
            parts.append(str(source))
        if field:
            parts.append(f"field {field!r}")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {problem}" if prefix else problem)

    def public_message(self) -> str:
        """The message without the source path (upload names may identify patients): for responses, logs."""
        return f"field {self.field!r}: {self.problem}" if self.field else self.problem


class IntegrityError(RuntimeError):
    """A model artifact does not match its manifest (tampered or corrupted): refuse to load it."""
