"""Every cdk-nag acknowledgement of Kiln, each scoped to one resource path and one finding, with a reason."""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Stack
from cdk_nag import NagPackSuppression, NagSuppressions


@dataclass(frozen=True)
class Suppression:
    path: str  # construct path below the stack, e.g. "JobApi/Api/Resource"
    finding: str  # e.g. "AwsSolutions-IAM5"
    reason: str
    applies_to: tuple[str, ...] = ()  # for IAM4/IAM5: the exact policy/resource strings acknowledged


SUPPRESSIONS: list[Suppression] = []


def apply_suppressions(stack: Stack) -> None:
    for s in SUPPRESSIONS:
        NagSuppressions.add_resource_suppressions_by_path(
            stack, f"/{stack.stack_name}/{s.path}",
            [NagPackSuppression(id=s.finding, reason=s.reason, applies_to=list(s.applies_to) or None)])
