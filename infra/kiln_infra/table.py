"""JobTable: the DynamoDB table of compilation jobs, mirroring kiln.store.table_definition."""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from constructs import Construct

from kiln_infra.key import KilnKey

# Kept in step with kiln.store.INDEXES (tests/infrastructure asserts both agree).
INDEXES = {
    "ByCreationTime": ("CreationTime", dynamodb.AttributeType.NUMBER),
    "ByName": ("JobName", dynamodb.AttributeType.STRING),
    "ByStatus": ("StatusKey", dynamodb.AttributeType.STRING),
}
# Every item action the job store uses (TransactWriteItems is authorised per item action).
DATA_ACTIONS = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem",
                "dynamodb:ConditionCheckItem", "dynamodb:Query"]


class JobTable(Construct):
    """On-demand, encrypted with KilnKey, point-in-time recovery, optional deletion protection."""

    def __init__(self, scope: Construct, construct_id: str, *, key: KilnKey, deletion_protection: bool) -> None:
        super().__init__(scope, construct_id)
        self.key = key
        self.table = dynamodb.Table(
            self, "Table",
            partition_key=dynamodb.Attribute(name="JobName", type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            encryption=dynamodb.TableEncryption.CUSTOMER_MANAGED, encryption_key=key.key,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True),
            deletion_protection=deletion_protection,
            removal_policy=RemovalPolicy.RETAIN if deletion_protection else RemovalPolicy.DESTROY,
        )
        for index, (sort_key, kind) in INDEXES.items():
            self.table.add_global_secondary_index(
                index_name=index,
                partition_key=dynamodb.Attribute(name="Partition", type=dynamodb.AttributeType.STRING),
                sort_key=dynamodb.Attribute(name=sort_key, type=kind),
                projection_type=dynamodb.ProjectionType.ALL)

    def index_arns(self) -> list[str]:
        return [f"{self.table.table_arn}/index/{index}" for index in INDEXES]

    def grant_jobs(self, grantee: iam.IGrantable) -> None:
        """What the job store does: item reads/writes/transactions on the table, queries on its indexes."""
        iam.Grant.add_to_principal(grantee=grantee, actions=DATA_ACTIONS,
                                   resource_arns=[self.table.table_arn, *self.index_arns()])
        self.key.grant_data(grantee)
