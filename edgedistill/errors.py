"""User-facing errors. Library code raises these; only the CLI prints them and exits 2."""
from __future__ import annotations


class EdgeDistillError(Exception):
    """An error the user can fix: a message saying what is wrong and a hint saying how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class CheckpointError(EdgeDistillError):
    """The teacher checkpoint is missing, corrupt or of an unsupported architecture."""


class DataError(EdgeDistillError):
    """The transfer set is missing, empty, undecodable or malformed."""


class ProfileError(EdgeDistillError):
    """A target profile is unknown or malformed."""


class ExportError(EdgeDistillError):
    """Export or quantization produced a graph that does not match its source."""


class BudgetError(EdgeDistillError):
    """The artifact missed the target profile's accuracy budget."""


class ArtifactError(EdgeDistillError):
    """An artifact directory is missing files, or its files do not match the manifest."""
