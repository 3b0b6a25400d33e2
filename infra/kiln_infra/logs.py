"""Encrypted log groups with the configured retention (one helper, so every group is alike)."""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from constructs import Construct

from kiln_infra.config import LOG_RETENTION_DAYS

# RetentionDays lists CloudWatch's allowed periods in ascending order, then INFINITE.
_RETENTION = dict(zip(LOG_RETENTION_DAYS, list(logs.RetentionDays)[: len(LOG_RETENTION_DAYS)], strict=True))


def encrypted_log_group(scope: Construct, construct_id: str, *, key: kms.IKey, retention_days: int,
                        removal_policy: RemovalPolicy, name: str | None = None) -> logs.LogGroup:
    """A log group encrypted with Kiln's key (the key policy lets CloudWatch Logs use it)."""
    return logs.LogGroup(scope, construct_id, log_group_name=name, encryption_key=key,
                         retention=_RETENTION[retention_days], removal_policy=removal_policy)
