"""Domain errors. Each maps to one SageMaker wire error code, in one place (``wire_error``)."""

from __future__ import annotations

from botocore.exceptions import ClientError

# AWS error codes that mean "try again later" (throttling, a lost transaction race, a transient
# service fault), for every client Kiln's functions call. The one list: the workflow steps, the
# workflow handler and the registry hook all decide retries with :func:`is_retryable`.
RETRYABLE_ERROR_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "TooManyRequestsException",
    "RequestLimitExceeded", "RequestThrottled", "ProvisionedThroughputExceededException", "SlowDown",
    "TransactionConflictException", "InternalServerError", "InternalFailure", "InternalError",
    "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException",
})


# Reasons a DynamoDB transaction is cancelled that a retry can clear (a ConditionalCheckFailed cannot).
TRANSIENT_CANCELLATION_REASONS = frozenset({"TransactionConflict", "ProvisionedThroughputExceeded", "ThrottlingError"})


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError``; the exception's class name otherwise."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "ClientError"))
    return type(exc).__name__


def is_retryable(exc: BaseException) -> bool:
    """Whether an AWS call failed transiently: its code is in :data:`RETRYABLE_ERROR_CODES`, or it is a
    DynamoDB transaction cancelled only for :data:`TRANSIENT_CANCELLATION_REASONS`."""
    if not isinstance(exc, ClientError):
        return False
    code = error_code(exc)
    if code == "TransactionCanceledException":
        reasons = {r.get("Code") for r in exc.response.get("CancellationReasons", [])}
        return bool(reasons & TRANSIENT_CANCELLATION_REASONS) and "ConditionalCheckFailed" not in reasons
    return code in RETRYABLE_ERROR_CODES


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


class RequestTooLarge(KilnError):
    """A body far beyond any valid request (API Gateway answers 413 too, for over 10 MB)."""

    code = "RequestEntityTooLargeException"
    status = 413


class AccessDenied(KilnError):
    code = "AccessDeniedException"
    status = 400


class ConflictError(KilnError):
    """A guarded update lost a race.

    Job transitions catch it (the job moved on; the winner's state stands). AddTags and DeleteTags
    send it when the job's tags kept changing under them for every retry: HTTP 400
    ``ConflictException``, the error SageMaker's API model defines for a conflicting modification
    (botocore raises it as ``client.exceptions.ConflictException``); the caller retries."""

    code = "ConflictException"
    status = 400


def wire_error(exc: Exception) -> tuple[int, dict[str, str]]:
    """The HTTP status and JSON 1.1 error body for an exception."""
    if isinstance(exc, KilnError):
        return exc.status, {"__type": exc.code, "message": exc.message}
    return 500, {"__type": "InternalFailure", "message": "An internal error occurred; see the service logs."}
