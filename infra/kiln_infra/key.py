"""KilnKey: the customer managed KMS key for Kiln's own data (table, logs, secret, queues)."""

from __future__ import annotations

from aws_cdk import Aws, RemovalPolicy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

# The explicit actions CloudWatch Logs needs on a key that encrypts log groups (no wildcards).
LOGS_KEY_ACTIONS = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo",
                    "kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:DescribeKey"]


class KilnKey(Construct):
    """One KMS key with yearly automatic rotation; CloudWatch Logs may use it for this account's log groups."""

    def __init__(self, scope: Construct, construct_id: str, *, removal_policy: RemovalPolicy) -> None:
        super().__init__(scope, construct_id)
        self.key = kms.Key(self, "Key", description="Kiln: job table, logs, pagination secret, queues",
                           enable_key_rotation=True, removal_policy=removal_policy)
        self.key.add_to_resource_policy(iam.PolicyStatement(
            sid="CloudWatchLogsOfThisAccount",
            principals=[iam.ServicePrincipal(f"logs.{Aws.REGION}.amazonaws.com")],
            actions=LOGS_KEY_ACTIONS,
            resources=["*"],  # in a key policy, "*" is this key
            conditions={"ArnLike": {"kms:EncryptionContext:aws:logs:arn":
                                    f"arn:{Aws.PARTITION}:logs:{Aws.REGION}:{Aws.ACCOUNT_ID}:log-group:*"}},
        ))

    def grant_data(self, grantee: iam.IGrantable) -> None:
        """Read and write data encrypted with the key (DynamoDB, SQS, Lambda environment)."""
        self.key.grant(grantee, "kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey")
