"""AWS plumbing for a job: the user's role, S3 transfer and Step Functions callbacks."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from botocore.exceptions import BotoCoreError
from botocore.exceptions import ClientError as BotoClientError
from kiln.errors import is_retryable

from .errors import ClientError, ServerError

log = logging.getLogger(__name__)
_ABORT_CODES = {"TaskTimedOut", "TaskDoesNotExist", "InvalidToken"}


# How long a never-accepted token is retried before the job counts as abandoned (KILN_TOKEN_GRACE_SECONDS).
_TOKEN_GRACE_SECONDS = float(os.environ.get("KILN_TOKEN_GRACE_SECONDS", "20"))


def _s3_server_side(exc: BotoClientError) -> bool:
    """Whether an S3 answer left after botocore's retries is S3's (or the network's) fault: a
    transient code (Kiln's one list) or a 5xx. Everything else (AccessDenied, NoSuchBucket, KMS.*)
    is the user's to fix."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return is_retryable(exc) or status >= 500 or (code.isdigit() and int(code) >= 500)


# What a failed transfer could not do, for its messages: (verb, gerund).
_TRANSFER_VERBS = {"download": ("read", "reading"), "upload": ("write", "writing")}


@contextmanager
def _s3_failures(transfer: Literal["download", "upload"], server_what: str, client_what: str, fix: str,
                 section: str = "InputConfiguration") -> Iterator[None]:
    """Map a failed S3 ``transfer``: S3's own failures left after botocore's retries become a
    ServerError (retry the job), every other answer a ClientError naming what could not be read or
    written and how the user fixes it (``fix``), in ``section``."""
    verb, gerund = _TRANSFER_VERBS[transfer]
    try:
        yield
    except BotoClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if _s3_server_side(exc):
            raise ServerError(f"S3 kept failing while {gerund} {server_what} ({code}); retry the job") from None
        raise ClientError(f"cannot {verb} {client_what} ({code or exc}); {fix}", section=section) from None
    except (BotoCoreError, RetriesExceededError) as exc:
        raise ServerError(f"S3 {transfer} failed ({exc})") from None


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    m = re.fullmatch(r"s3://([^/]+)/?(.*)", uri or "")
    if not m:
        raise ClientError(f"'{uri}' is not an S3 URI (s3://bucket/key)")
    return m.group(1), m.group(2)


def assume_job_role(role_arn: str, job_name: str) -> boto3.Session:
    """A session with the job role's credentials (Kiln's own role cannot read users' buckets)."""
    session_name = re.sub(r"[^\w+=,.@-]", "-", job_name)[:64] or "kiln-job"
    try:
        creds = boto3.client("sts").assume_role(RoleArn=role_arn, RoleSessionName=session_name)["Credentials"]
    except BotoClientError as exc:
        raise ClientError(
            f"Kiln could not assume RoleArn {role_arn} ({exc.response.get('Error', {}).get('Code')}); let the "
            "Kiln service principal assume the role in its trust policy", section="RoleArn") from None
    except BotoCoreError as exc:
        raise ServerError(f"STS is unreachable ({exc})") from None
    return boto3.Session(aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
                         aws_session_token=creds["SessionToken"])


def download(session: boto3.Session, uri: str, dest: Path) -> Path:
    """Download the model archive at ``uri`` to ``dest``."""
    bucket, key = split_s3_uri(uri)
    with _s3_failures("download", "the model artifact", f"the model artifact {uri}",
                      "check S3Uri and that RoleArn may s3:GetObject it"):
        session.client("s3").download_file(bucket, key, str(dest))
    return dest


def download_capped(session: boto3.Session, uri: str, dest: Path, max_bytes: int, member: str) -> Path:
    """Download a file the user named at ``member`` (``s3://bucket/key``) to ``dest``, refusing one over
    ``max_bytes`` before reading it (and after, should the object have grown meanwhile)."""
    bucket, key = split_s3_uri(uri)
    client = session.client("s3")
    with _s3_failures("download", uri, f"{uri} named at '{member}'",
                      "check the URI and that RoleArn may s3:GetObject it", section="OutputConfiguration"):
        size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        if size <= max_bytes:
            client.download_file(bucket, key, str(dest))
    if size > max_bytes or dest.stat().st_size > max_bytes:
        dest.unlink(missing_ok=True)
        raise ClientError(f"{uri} named at '{member}' is {size} bytes; at most {max_bytes} are read",
                          section="OutputConfiguration")
    return dest


def download_if_present(session: boto3.Session, uri: str, dest: Path) -> bool:
    """Download ``uri`` to ``dest`` if it exists and may be read; False otherwise (the reason is logged)."""
    bucket, key = split_s3_uri(uri)
    try:
        session.client("s3").download_file(bucket, key, str(dest))
    except (BotoClientError, BotoCoreError, RetriesExceededError) as exc:
        log.info("not downloaded: %s (%s)", uri, exc)
        return False
    return True


def upload(session: boto3.Session, path: Path, uri: str, kms_key_id: str | None,
           content_type: str = "application/gzip") -> None:
    """Upload the artifact; SSE-KMS with ``kms_key_id`` when given."""
    bucket, key = split_s3_uri(uri)
    extra: dict[str, str] = {"ContentType": content_type}
    if kms_key_id:
        extra.update(ServerSideEncryption="aws:kms", SSEKMSKeyId=kms_key_id)
    with _s3_failures("upload", "the compiled model", f"the compiled model to {uri}",
                      "check S3OutputLocation, KmsKeyId and that RoleArn may s3:PutObject there",
                      section="OutputConfiguration"):
        try:
            session.client("s3").upload_file(str(path), bucket, key, ExtraArgs=extra)
        except S3UploadFailedError as failed:  # boto3 wraps the ClientError; its answer is what matters
            if isinstance(failed.__context__, BotoClientError):
                raise failed.__context__ from None
            raise ServerError(f"S3 upload failed ({failed})") from None


class Reporter:
    """Reports to the workflow: Step Functions task token callbacks, or stdout without a token."""

    def __init__(self, token: str | None, interval: float, on_abort: Callable[[str], None],
                 client: Any = None) -> None:
        self.token = token
        self.interval = interval
        self.on_abort = on_abort
        self._client = client
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = boto3.client("stepfunctions")
        return self._client

    def start(self) -> None:
        """Begin heartbeats at once (the first one tells the workflow the container started)."""
        if not self.token:
            return
        self._thread = threading.Thread(target=self._beat, name="kiln-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        accepted = False
        started = time.monotonic()
        while not self._stop.is_set():
            wait = self.interval
            try:
                self.client.send_task_heartbeat(taskToken=self.token)
                accepted = True
            except BotoClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                # The workflow may not have registered a brand-new token yet: until one heartbeat
                # is accepted, InvalidToken is retried for a grace period instead of aborting.
                if code == "InvalidToken" and not accepted and time.monotonic() - started < _TOKEN_GRACE_SECONDS:
                    wait = 0.5
                elif code in _ABORT_CODES:
                    self.on_abort(code)
                    return
                else:
                    log.warning("heartbeat failed: %s", exc)
            except Exception as exc:  # network blips must not kill the job
                log.warning("heartbeat failed: %s", exc)
            self._stop.wait(wait)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def success(self, output: dict[str, Any]) -> bool:
        """Report the result; False when the workflow no longer takes it (stopped or timed out)."""
        self.stop()
        if self.token:
            try:
                self.client.send_task_success(taskToken=self.token, output=json.dumps(output))
            except BotoClientError as exc:
                log.error("SendTaskSuccess refused (%s): the workflow no longer waits for this job",
                          exc.response.get("Error", {}).get("Code"))
                return False
        else:
            print(json.dumps(output), flush=True)
        return True

    def failure(self, error: str, cause: str) -> None:
        self.stop()
        if self.token:
            try:
                self.client.send_task_failure(taskToken=self.token, error=error[:256], cause=cause[:32768])
            except BotoClientError as exc:
                log.error("SendTaskFailure failed: %s", exc)
        else:
            print(json.dumps({"Error": error, "Cause": cause}), flush=True)
