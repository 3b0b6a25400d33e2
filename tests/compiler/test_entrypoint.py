"""``python -m kiln_compiler`` as the container runs it, against a moto server."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import boto3
import kiln.runtime
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.compiler.conftest import entrypoint_job as _job
from tests.compiler.conftest import make_tar
from tests.compiler.conftest import run_entrypoint as _run


def test_compiles_onnx_end_to_end(buckets: Any, aws_env: dict[str, str], squeezenet: onnx.ModelProto,
                                  tmp_path: Path) -> None:
    # GIVEN a user's model archive in S3 and a KMS key for the output
    arc = make_tar(tmp_path / "squeeze.tar.gz", {"model/model.onnx": squeezenet.SerializeToString(),
                                                 "labels.txt": b"\n".join(b"c%d" % i for i in range(1000))})
    buckets.upload_file(str(arc), "user-models", "in/squeeze.tar.gz")
    key_id = boto3.client("kms").create_key()["KeyMetadata"]["KeyId"]
    job = _job("e2e-squeeze", "s3://user-models/in/squeeze.tar.gz", KmsKeyId=key_id,
               CompilerOptions="{'class_labels': 'labels.txt'}")
    # WHEN the container entrypoint runs
    t0 = time.monotonic()
    proc = _run(job, aws_env, tmp_path)
    elapsed = time.monotonic() - t0
    # THEN it exits 0 and prints the result as its last stdout line
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["S3ModelArtifacts"] == "s3://user-out/compiled/squeeze-ml_c4.tar.gz"
    assert json.loads(result["DerivedDataInputConfig"]) == {"data_0": [1, 3, 224, 224]}
    assert {"download", "unpack", "load", "build", "package", "upload", "total"} <= set(result["Timings"])
    assert sum(result["Tuning"].values()) > 0
    head = buckets.head_object(Bucket="user-out", Key="compiled/squeeze-ml_c4.tar.gz")
    assert head["ServerSideEncryption"] == "aws:kms" and key_id in head["SSEKMSKeyId"]
    # AND the uploaded artifact's digest matches and it computes what onnxruntime computes
    body = buckets.get_object(Bucket="user-out", Key="compiled/squeeze-ml_c4.tar.gz")["Body"].read()
    import hashlib

    assert result["ArtifactDigest"] == "sha256:" + hashlib.sha256(body).hexdigest()
    (tmp_path / "a.tar.gz").write_bytes(body)
    model = kiln.runtime.load(tmp_path / "a.tar.gz")
    x = np.random.default_rng(3).random((1, 3, 224, 224), dtype=np.float32)
    t1 = time.perf_counter()
    (out,) = model.run({"data_0": x})
    latency = time.perf_counter() - t1
    (ref,) = ort.InferenceSession(squeezenet.SerializeToString()).run(None, {"data_0": x})
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)
    assert model.class_labels is not None and len(model.class_labels) == 1000
    print(f"\nsqueezenet ml_c4: job {elapsed:.1f}s, stages {result['Timings']}, latency {latency * 1000:.0f} ms")
    # AND nothing was left in the work dir
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("kiln-")] == []


def test_missing_model_file_is_client_error(buckets: Any, aws_env: dict[str, str], tmp_path: Path) -> None:
    # GIVEN an archive without any model file
    arc = make_tar(tmp_path / "empty.tar.gz", {"README.md": b"forgot the model"})
    buckets.upload_file(str(arc), "user-models", "in/empty.tar.gz")
    # WHEN the entrypoint runs
    proc = _run(_job("e2e-missing", "s3://user-models/in/empty.tar.gz"), aws_env, tmp_path)
    # THEN exit 1 with a SageMaker-style reason and no stack trace in it
    assert proc.returncode == 1, proc.stderr[-2000:]
    failure = json.loads(proc.stdout.strip().splitlines()[-1])
    assert failure["Error"] == "ClientError"
    assert failure["Cause"].startswith("ClientError: InputConfiguration: no ONNX model file found")
    assert "README.md" in failure["Cause"] and "Traceback" not in failure["Cause"]


def test_missing_s3_object_and_hostile_archive(buckets: Any, aws_env: dict[str, str], tmp_path: Path) -> None:
    # GIVEN a job whose S3Uri does not exist, and one whose archive escapes with ../
    make_tar(tmp_path / "evil.tar.gz", {"../../escape.onnx": b"x"})
    buckets.upload_file(str(tmp_path / "evil.tar.gz"), "user-models", "in/evil.tar.gz")
    # WHEN the entrypoint runs each
    missing = _run(_job("e2e-nos3", "s3://user-models/in/nope.tar.gz"), aws_env, tmp_path)
    hostile = _run(_job("e2e-evil", "s3://user-models/in/evil.tar.gz"), aws_env, tmp_path)
    # THEN both are ClientErrors saying what to fix, and nothing escaped
    assert missing.returncode == 1 and "cannot read the model artifact" in missing.stdout
    assert hostile.returncode == 1 and "leaves the archive" in hostile.stdout
    assert not (tmp_path.parent / "escape.onnx").exists()


def test_unsupported_target_is_client_error(buckets: Any, aws_env: dict[str, str], tmp_path: Path) -> None:
    # GIVEN a job for Inferentia
    job = _job("e2e-inf", "s3://user-models/in/whatever.tar.gz", TargetDevice="ml_inf1")
    # WHEN the entrypoint runs
    proc = _run(job, aws_env, tmp_path)
    # THEN ClientError about the output configuration, before any download
    assert proc.returncode == 1
    assert "ClientError: OutputConfiguration: Target 'ml_inf1' is not supported" in proc.stdout


def test_task_token_reports_through_step_functions(buckets: Any, aws_env: dict[str, str],
                                                  squeezenet: onnx.ModelProto, tmp_path: Path) -> None:
    # GIVEN a job started by Step Functions with a task token
    arc = make_tar(tmp_path / "s.tar.gz", {"model.onnx": squeezenet.SerializeToString()})
    buckets.upload_file(str(arc), "user-models", "in/s.tar.gz")
    # WHEN the entrypoint runs with heartbeats every second (moto's Step Functions does not know this
    # token and answers InvalidToken: the grace for unregistered tokens is stretched past the compile)
    proc = _run(_job("e2e-token", "s3://user-models/in/s.tar.gz"), aws_env, tmp_path,
                KILN_TASK_TOKEN="token-123", KILN_HEARTBEAT_SECONDS="1", KILN_LOG_LEVEL="DEBUG",
                KILN_TOKEN_GRACE_SECONDS="600")
    # THEN it compiles, reports through SendTaskSuccess (not stdout) and uploads the artifact. No execution
    # waits on this made-up token: moto may accept or refuse the answer, and the exit code must say which
    refused = "the workflow no longer waits for this job" in proc.stderr
    assert proc.returncode == (3 if refused else 0), proc.stderr[-2000:]
    assert proc.stdout.strip() == ""
    assert "SendTaskHeartbeat" in proc.stderr and "SendTaskSuccess" in proc.stderr
    assert buckets.head_object(Bucket="user-out", Key="compiled/s-ml_c4.tar.gz")["ContentLength"] > 0


class _FakeSfn:
    def __init__(self, heartbeat_error: str | None) -> None:
        self.heartbeat_error = heartbeat_error
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def send_task_heartbeat(self, **kw: Any) -> None:
        self.calls.append(("heartbeat", kw))
        if self.heartbeat_error and len(self.calls) > 1:  # the first heartbeat is accepted
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": self.heartbeat_error, "Message": "x"}}, "SendTaskHeartbeat")

    def send_task_success(self, **kw: Any) -> None:
        self.calls.append(("success", kw))

    def send_task_failure(self, **kw: Any) -> None:
        self.calls.append(("failure", kw))


@pytest.mark.parametrize("code", ["TaskTimedOut", "TaskDoesNotExist", "InvalidToken"])
def test_dead_token_heartbeat_aborts(code: str) -> None:
    # GIVEN a reporter whose token dies after its first accepted heartbeat
    from kiln_compiler.aws import Reporter

    aborted: list[str] = []
    sfn = _FakeSfn(code)
    reporter = Reporter("tok", 0.05, aborted.append, client=sfn)
    # WHEN it starts
    reporter.start()
    deadline = time.monotonic() + 5
    while not aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    reporter.stop()
    # THEN the abort callback fired at once with the code (main() then exits 3)
    assert aborted == [code]
    assert sfn.calls[:2] == [("heartbeat", {"taskToken": "tok"})] * 2


def test_reporter_failure_keeps_error_and_cause() -> None:
    # GIVEN a live token
    from kiln_compiler.aws import Reporter

    sfn = _FakeSfn(None)
    reporter = Reporter("tok", 60, lambda _c: None, client=sfn)
    reporter.start()
    # WHEN the job fails
    reporter.failure("ClientError", "ClientError: InputConfiguration: bad")
    # THEN SendTaskFailure carries the error code and the reason
    assert ("failure", {"taskToken": "tok", "error": "ClientError",
                        "cause": "ClientError: InputConfiguration: bad"}) in sfn.calls
