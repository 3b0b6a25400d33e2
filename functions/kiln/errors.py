"""Domain errors. Each maps to one SageMaker wire error code, in one place (``wire_error``)."""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error the API reports to a caller."""

    code = "InternalFailure"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(KilnError):
    code = "ValidationException"
    status = 400


class ResourceInUse(KilnError):
    code = "ResourceInUse"
    status = 400


class ResourceNotFound(KilnError):
    code = "ResourceNotFound"
    status = 400


class ResourceLimitExceeded(KilnError):
    code = "ResourceLimitExceeded"
    status = 400


class UnknownOperation(KilnError):
    code = "UnknownOperationException"
    status = 400


class SerializationError(KilnError):
    code = "SerializationException"
    status = 400


class AccessDenied(KilnError):
    code = "AccessDeniedException"
    status = 400


class ConflictError(KilnError):
    """A guarded job update lost a race (the job moved on). Internal: not sent on the wire as is."""

    code = "ConflictException"
    status = 400


def wire_error(exc: Exception) -> tuple[int, dict[str, str]]:
    """The HTTP status and JSON 1.1 error body for an exception."""
    if isinstance(exc, KilnError):
        return exc.status, {"__type": exc.code, "message": exc.message}
    return 500, {"__type": "InternalFailure", "message": "An internal error occurred; see the service logs."}
