"""The shared tuning database in S3 (kiln_infra.tuning): where every tuning-capable runner reads and writes its
records, how the bucket is protected, and that the compiler's role reaches only that prefix."""

from __future__ import annotations

import json
from typing import Any

from kiln.catalog import Runner

from .conftest import Synthesized, as_list, resolve, statements

# Runners whose containers tune (every CPU runner of the default deployment); CUDA builds are not tuned.
DEFAULT_TUNING_RUNNERS = {"fargate", "batch-c4", "batch-m4", "batch-c5", "batch-m5", "batch-c6i"}


def _bucket_id(synth: Synthesized) -> str:
    (logical_id,) = [k for k in synth.of_type("AWS::S3::Bucket") if k.startswith("TuningRecordsBucket")]
    return logical_id


def _compiler_environments(synth: Synthesized) -> dict[str, dict[str, Any]]:
    """KILN_RUNNER -> the static environment of that runner's compiler container (Fargate task, Batch jobs)."""
    found: dict[str, dict[str, Any]] = {}
    for task in synth.of_type("AWS::ECS::TaskDefinition").values():
        for container in task["Properties"]["ContainerDefinitions"]:
            env = {e["Name"]: e["Value"] for e in container.get("Environment", [])}
            found[env["KILN_RUNNER"]] = env
    for job in synth.of_type("AWS::Batch::JobDefinition").values():
        env = {e["Name"]: e["Value"] for e in job["Properties"]["ContainerProperties"]["Environment"]}
        found[env["KILN_RUNNER"]] = env
    return found


def _compiler_role_statements(synth: Synthesized) -> list[dict[str, Any]]:
    (role_id,) = [k for k in synth.of_type("AWS::IAM::Role") if k.startswith("CompilerRunnersCompilerRole")]
    return [s for policy in synth.of_type("AWS::IAM::Policy").values()
            if {"Ref": role_id} in policy["Properties"]["Roles"]
            for s in statements(policy["Properties"]["PolicyDocument"])]


def test_every_tuning_runner_reads_and_writes_its_own_prefix(synth: Synthesized) -> None:
    # GIVEN the default deployment's compiler containers
    environments = _compiler_environments(synth)
    bucket = _bucket_id(synth)
    # THEN every CPU runner's container names the shared database: its own prefix of the tuning bucket
    tuning = {runner: resolve(env["KILN_TUNING_DB"]) for runner, env in environments.items() if "KILN_TUNING_DB" in env}
    assert set(tuning) == DEFAULT_TUNING_RUNNERS
    for runner, location in tuning.items():
        assert location == f"s3://<{bucket}>/records/{runner}"
    # AND the GPU runner (CUDA builds are not tuned) gets none
    assert "KILN_TUNING_DB" not in environments[str(Runner.BATCH_GPU)]


def test_tuning_bucket_is_encrypted_versioned_private_tls_only_and_logged(synth: Synthesized) -> None:
    # GIVEN the tuning bucket and its policy
    bucket_id = _bucket_id(synth)
    props = synth.resources[bucket_id]["Properties"]
    # THEN it is encrypted with Kiln's key (bucket keys: few KMS calls), versioned, closed to the public
    (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms" and rule["BucketKeyEnabled"] is True
    assert resolve(rule["ServerSideEncryptionByDefault"]["KMSMasterKeyID"]).startswith("<KilnKey")
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert all(props["PublicAccessBlockConfiguration"][k] for k in
               ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"))
    # AND overwritten record files expire after a while, unfinished uploads after a day
    lifecycle = props["LifecycleConfiguration"]["Rules"][0]
    assert lifecycle["NoncurrentVersionExpiration"]["NoncurrentDays"] == 30
    assert lifecycle["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1
    # AND its server access logs go to a bucket of their own
    assert resolve(props["LoggingConfiguration"]["DestinationBucketName"]).startswith("<TuningRecordsAccessLogs")
    # AND its policy denies every request without TLS, or with TLS older than 1.2
    (policy,) = [p for p in synth.of_type("AWS::S3::BucketPolicy").values() if p["Properties"]["Bucket"] == {"Ref": bucket_id}]
    denies = [s for s in statements(policy["Properties"]["PolicyDocument"]) if s["Effect"] == "Deny"]
    conditions = [s["Condition"] for s in denies]
    assert {"Bool": {"aws:SecureTransport": "false"}} in conditions
    assert {"NumericLessThan": {"s3:TlsVersion": 1.2}} in conditions


def test_compiler_role_reaches_only_the_records_prefix(synth: Synthesized) -> None:
    # GIVEN every statement of the compiler role that names the tuning bucket or Kiln's key
    bucket = _bucket_id(synth)
    found = [s for s in _compiler_role_statements(synth)
             if any(bucket in json.dumps(r) or "KilnKey" in json.dumps(r) for r in as_list(s["Resource"]))]
    by_sid = {s["Sid"]: s for s in found}
    # THEN it may get and put objects under records/ only (no delete, no other key), and list only that prefix
    assert set(by_sid) == {"ReadWriteSharedTuningRecords", "ListSharedTuningRecords", "SharedTuningRecordsKey"}
    objects = by_sid["ReadWriteSharedTuningRecords"]
    assert sorted(as_list(objects["Action"])) == ["s3:GetObject", "s3:PutObject"]
    assert [resolve(r) for r in as_list(objects["Resource"])] == [f"<{bucket}.Arn>/records/*"]
    listing = by_sid["ListSharedTuningRecords"]
    assert listing["Action"] == "s3:ListBucket" and resolve(listing["Resource"]) == f"<{bucket}.Arn>"
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["records/*"]}}
    # AND it may use Kiln's key only through S3, and only for this bucket's objects
    key = by_sid["SharedTuningRecordsKey"]
    assert sorted(as_list(key["Action"])) == ["kms:Decrypt", "kms:GenerateDataKey"]
    condition = key["Condition"]["StringEquals"]
    assert resolve(condition["kms:ViaService"]) == "s3.<AWS::Region>.amazonaws.com"
    assert resolve(condition["kms:EncryptionContext:aws:s3:arn"]) == f"<{bucket}.Arn>"


def test_no_other_role_touches_the_tuning_bucket(synth: Synthesized) -> None:
    # GIVEN every IAM policy of the stack but the compiler role's
    (role_id,) = [k for k in synth.of_type("AWS::IAM::Role") if k.startswith("CompilerRunnersCompilerRole")]
    bucket = _bucket_id(synth)
    others = [policy for policy in synth.of_type("AWS::IAM::Policy").values()
              if {"Ref": role_id} not in policy["Properties"]["Roles"]]
    # THEN none of them names the tuning bucket (functions, the workflow and the execution roles never read records)
    assert others and not any(bucket in json.dumps(policy) for policy in others)


def test_the_config_turns_the_shared_database_off(synth_cpu_only_imported_vpc: Synthesized) -> None:
    # GIVEN a deployment with "shared_tuning_database": false
    synth = synth_cpu_only_imported_vpc
    # THEN there is no bucket, no container names a tuning database (each job tunes into its own), and the
    # compiler role has no S3 statement at all
    assert not synth.of_type("AWS::S3::Bucket")
    environments = _compiler_environments(synth)
    assert set(environments) == {"fargate", "batch-c5", "batch-c6g", "batch-c7g"}
    assert not [runner for runner, env in environments.items() if "KILN_TUNING_DB" in env]
    assert not [s for s in _compiler_role_statements(synth) if "s3:" in json.dumps(s["Action"])]
