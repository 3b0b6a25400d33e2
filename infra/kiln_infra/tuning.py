"""TuningRecords: the shared tuning database in S3 (docs/adr/0009, 0023).

Every tuning-capable compiler container gets ``KILN_TUNING_DB=s3://<bucket>/records/<runner>``: a job's
tuning (or, fanned out, its workers' seeds and its build's merged records) lands where the next job on the
same runner finds it. One prefix per runner because a record is a measurement of that runner's hardware:
a c5 instance's timings say nothing about a c6g's. The compiler's own role reads and writes these
prefixes and nothing else of the bucket; users' data never goes there (workers hand their records to
the build under the job's S3OutputLocation, with the job's role).
"""

from __future__ import annotations

from aws_cdk import Aws, Duration, RemovalPolicy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct
from kiln.catalog import Runner

from kiln_infra.config import KilnConfig
from kiln_infra.key import KilnKey

RECORDS_PREFIX = "records"
# Overwritten record files stay recoverable this long (the compiler replaces whole files: last writer wins).
NONCURRENT_DAYS = 30


class TuningRecords(Construct):
    """A versioned, KMS-encrypted, TLS-only bucket of MetaSchedule records, with server access logs."""

    def __init__(self, scope: Construct, construct_id: str, *, config: KilnConfig, key: KilnKey,
                 removal_policy: RemovalPolicy) -> None:
        super().__init__(scope, construct_id)
        # Server access logs cannot go to an SSE-KMS bucket: this one is SSE-S3, kept as long as Kiln's logs.
        self.access_logs = s3.Bucket(
            self, "AccessLogs", encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL, enforce_ssl=True, minimum_tls_version=1.2,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED, removal_policy=removal_policy,
            lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(config.log_retention_days))])
        self.key = key.key
        self.bucket = s3.Bucket(
            self, "Bucket", encryption=s3.BucketEncryption.KMS, encryption_key=key.key, bucket_key_enabled=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL, enforce_ssl=True, minimum_tls_version=1.2,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED, versioned=True,
            server_access_logs_bucket=self.access_logs, server_access_logs_prefix="tuning-records/",
            removal_policy=removal_policy,
            lifecycle_rules=[s3.LifecycleRule(noncurrent_version_expiration=Duration.days(NONCURRENT_DAYS),
                                              abort_incomplete_multipart_upload_after=Duration.days(1))])

    def location(self, runner: Runner) -> str:
        """KILN_TUNING_DB of ``runner``'s containers: its own prefix of the bucket."""
        return f"s3://{self.bucket.bucket_name}/{RECORDS_PREFIX}/{runner}"

    def grant_records(self, role: iam.Role) -> None:
        """Read and write record files under ``records/`` (no delete, no other key of the bucket)."""
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ReadWriteSharedTuningRecords", actions=["s3:GetObject", "s3:PutObject"],
            resources=[self.bucket.arn_for_objects(f"{RECORDS_PREFIX}/*")]))
        # a missing record file is then a 404 (an empty database), not an AccessDenied
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ListSharedTuningRecords", actions=["s3:ListBucket"], resources=[self.bucket.bucket_arn],
            conditions={"StringLike": {"s3:prefix": [f"{RECORDS_PREFIX}/*"]}}))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="SharedTuningRecordsKey", actions=["kms:Decrypt", "kms:GenerateDataKey"],
            resources=[self.key.key_arn],
            conditions={"StringEquals": {"kms:ViaService": f"s3.{Aws.REGION}.amazonaws.com",
                                         "kms:EncryptionContext:aws:s3:arn": self.bucket.bucket_arn}}))
