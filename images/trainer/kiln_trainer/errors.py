"""Trainer errors that carry the spec field they are about and the exit code the operator sees.

Why: the operator turns the termination message into a TrainingJob condition, and decides from the
exit code whether a retry can help (2: the spec or the data is wrong, a retry cannot fix it; 1: anything else).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RETRYABLE = 1
EXIT_SPEC = 2


class TrainerError(Exception):
    """A failure with a one-line message, the spec field it concerns (or None) and an exit code."""

    def __init__(self, message: str, field: str | None = None, exit_code: int = EXIT_RETRYABLE) -> None:
        super().__init__(message)
        self.message = " ".join(str(message).split())
        self.field = field
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class SpecError(TrainerError):
    """The TrainingJob spec asks for something the trainer cannot do (retry will not help)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field, exit_code=EXIT_SPEC)


class DataError(TrainerError):
    """The dataset is missing, unreadable or does not fit the spec (retry will not help)."""

    def __init__(self, message: str, field: str | None = "spec.dataset.uri") -> None:
        super().__init__(message, field, exit_code=EXIT_SPEC)


class Terminated(BaseException):
    """SIGTERM (pod deleted or preempted). A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way (progress reporting, library code) swallows it."""

    exit_code = 128 + 15
    message = "terminated by SIGTERM (pod deleted or preempted); a restart resumes from the checkpoint"
