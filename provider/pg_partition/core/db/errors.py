"""Project exceptions: every refusal says what was wrong, where, and what to do about it."""

from __future__ import annotations


class PartitionError(Exception):
    """Base error. ``fix`` tells the user what to do; it is appended to the message."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        parts = [f"{where}: {what}" if where else what]
        if fix:
            parts.append(f"How to fix: {fix}")
        super().__init__("\n".join(parts))


class PreflightError(PartitionError):
    """The table is not safe to convert as asked; nothing was changed."""


class InvalidInputError(PartitionError):
    """A parameter (identifier, filter, period, ...) is malformed; nothing was changed."""


class LockTimeoutExhausted(PartitionError):
    """A DDL statement could not get its lock within lock_timeout after every retry."""


class VerificationError(PartitionError):
    """Copied or archived data does not match its source."""


class StateError(PartitionError):
    """The recorded state disagrees with the catalog (a different conversion, a half-done step, ...)."""
