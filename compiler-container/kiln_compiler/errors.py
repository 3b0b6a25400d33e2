"""Job errors in SageMaker's failure-reason style."""

from __future__ import annotations


class CompilationError(Exception):
    """Base of every error that ends a job with a failure reason."""

    error_code = "ServerError"
    exit_code = 2

    @property
    def reason(self) -> str:
        """The failure reason shown to the user."""
        return f"{self.error_code}: {self}"


class ClientError(CompilationError):
    """The user's fault: the reason says what is wrong and what to fix."""

    error_code = "ClientError"
    exit_code = 1

    def __init__(self, message: str, *, section: str = "InputConfiguration") -> None:
        self.section = section
        super().__init__(message)

    @property
    def reason(self) -> str:
        return f"ClientError: {self.section}: {self}"


class ServerError(CompilationError):
    """Kiln's fault (a bug or an infrastructure failure)."""


# Exit code of a compiler the workflow stopped or timed out (its task token was refused): nobody
# waits for its result, so it exits without reporting.
ABORTED_EXIT_CODE = 3
